"""Reproduce the world model halp ships: train its recipe from scratch and compare the two.

Trains `WorldModelConfig()` (the default recipe; 20 minutes on 2 quiet CPU cores, one torch thread) with
`train(config, shipped=False)` into the cache (`--cache-dir`, default halp's), or reuses a model trained there
before, then prints the held-out accuracy of it and of the shipped model, how often their right/wrong answers
agree on the held-out questions, and the largest weight difference. `--ship` then writes the trained model into
the package (`halp.world.shipped.ship`): that is how the shipped weights were made.

    python benchmarks/world_reproduce.py [--cache-dir DIR] [--ship --note "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from halp.world.model import CHECKPOINT_DIR, WorldModelConfig, train
    from halp.world.shipped import compare_models, ship, shipped_home

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ship", action="store_true", help="write the trained model into the package")
    parser.add_argument("--note", default="", help="a line for the shipped manifest (machine, date)")
    args = parser.parse_args()
    config = WorldModelConfig()
    trained = train(config, cache_dir=args.cache_dir, threads=args.threads, say=print, shipped=False)
    figures = {
        "config_hash": config.digest(),
        "trained": str(trained.checkpoint),
        "cached": trained.cached,
        "training_seconds": round(trained.seconds),
        "training_cpu_seconds": round(trained.cpu_seconds),
        "threads": trained.threads,
        "heldout_accuracy": trained.heldout_accuracy,
        "heldout_by_type": trained.heldout_by_type,
        "vision_scores": trained.vision_scores,
    }
    packaged = shipped_home(config)
    if packaged is not None:
        figures["against_shipped"] = compare_models(packaged / CHECKPOINT_DIR, trained.checkpoint, config)
    print(json.dumps(figures, indent=2))
    if args.ship:
        home = ship(trained.checkpoint.parent, note=args.note)
        print(f"shipped {home}")


if __name__ == "__main__":
    main()
