"""What the world model's vision tower learns to see in its pretraining stage, per group of token bits.

Builds the world's Qwen2-VL at the given sizes, runs `halp.world.model.pretrain_vision` for `--steps` batches
of fresh scenes (one thread, scenes drawn in a DataLoader worker as `halp world` does) and prints the stage's
scores: the mean average precision of the colour, shape and object-centre bits on the next, unseen batch
(chance: each bit's rate, ~0.1-0.2), and the time it took.

    python benchmarks/world_vision.py --steps 600 --vision-dim 64 --vision-depth 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from transformers import AutoModelForImageTextToText

    from halp.testing import build_checkpoint
    from halp.world.model import (
        VOCAB_SIZE,
        TrainingStream,
        WorldModelConfig,
        pretrain_vision,
        tokenizer_corpus,
    )
    from halp.world.scene import IMAGE_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--vision-dim", type=int, default=64)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = WorldModelConfig(
        vision_steps=args.steps,
        vision_dim=args.vision_dim,
        vision_depth=args.vision_depth,
        vision_learning_rate=args.learning_rate,
    )
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory)
        build_checkpoint(
            "qwen2_vl", checkpoint, seed=config.seed, hidden_size=config.hidden_size, num_layers=config.num_layers,
            vision_dim=config.vision_dim, vision_depth=config.vision_depth, rope_theta=config.rope_theta,
            min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2, tokenizer_corpus=tokenizer_corpus(),
            vocab_size=VOCAB_SIZE,
        )  # fmt: skip
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
        stream = TrainingStream(replace(config, steps=0), checkpoint, model.config.model_type)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=1, multiprocessing_context="forkserver", prefetch_factor=4
        )
        torch.manual_seed(config.seed)
        started = time.perf_counter()
        losses, scores = pretrain_vision(model, iter(loader), config, progress=False)
        seconds = time.perf_counter() - started
    print(json.dumps({"settings": vars(args), "seconds": round(seconds, 1), "final_loss": losses[-1], **scores}))


if __name__ == "__main__":
    main()
