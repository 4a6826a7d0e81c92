"""The world model's trained weights that ship with halp, and how they were made.

Training the default recipe (`WorldModelConfig()`) from scratch takes 20 minutes on 2 quiet CPU cores and an
hour under load, over `halp world`'s 15-minute budget, so halp ships its result: `shipped/<config hash>/` holds
the `save_pretrained` checkpoint (safetensors, tokenizer, processor), the training record (`training.json`, as
`train` writes it) and `manifest.json` (the config, the SHA-256 of every file, and the versions it was trained
with). It is loaded through `from_pretrained` like any checkpoint. A config hash covers every setting that
changes the weights and halp's world version, so weights are only ever used for the exact recipe that made them.

`benchmarks/world_reproduce.py` is the code that reproduces them: it trains the same config from scratch with
`train(config, shipped=False)`, compares the result with the shipped model, and with `--ship` writes a model
trained that way here (`ship`). Training is seeded and repeats exactly on one machine and torch build, but float
round-off differs between CPUs and library versions and grows over 4000 steps: a model retrained elsewhere is
another draw of the recipe (two runs ended at 0.646 and 0.727 held-out, docs/world.md), not these bits.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from halp.data import file_sha256
from halp.errors import WorldError
from halp.layout import atomic_directory, write_text_atomic
from halp.world.recipe import CHECKPOINT_DIR, TRAINING_FILE, WORLD_VERSION, WorldModelConfig, heldout_set
from halp.world.scoring import Encoder, evaluate

#: Where the package keeps shipped models, one folder per config hash.
SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST_FILE = "manifest.json"


def shipped_home(config: WorldModelConfig, root: Path | None = None) -> Path | None:
    """The verified folder of the shipped model trained with `config`, or None when halp ships none for it.

    Every file the manifest lists must be there with its SHA-256, and nothing else may be in the checkpoint: a
    damaged or altered installation fails here with the file it is about, never loads quietly.
    """
    home = (root or SHIPPED_DIR) / config.digest()
    manifest_path = home / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("config_hash") != config.digest() or manifest.get("config") != json.loads(
        json.dumps(asdict(config))
    ):
        raise WorldError(f"{manifest_path} describes another config than the folder's hash {config.digest()}")
    listed = set(manifest["files"])
    present = {path.relative_to(home).as_posix() for path in (home / CHECKPOINT_DIR).rglob("*") if path.is_file()} | (
        {TRAINING_FILE} if (home / TRAINING_FILE).is_file() else set()
    )
    if listed != present:
        missing, extra = sorted(listed - present), sorted(present - listed)
        raise WorldError(
            f"the shipped world model {home} does not hold the files of its manifest "
            f"(missing: {missing or 'none'}; not listed: {extra or 'none'}); reinstall halp (the halp-vlm "
            "distribution) or train it yourself with `halp world --no-shipped`"
        )
    for name, expected in manifest["files"].items():
        actual = file_sha256(home / name)
        if actual != expected:
            raise WorldError(
                f"the shipped world model file {home / name} has SHA-256 {actual}, its manifest says {expected}; "
                "reinstall halp (the halp-vlm distribution) or train it yourself with `halp world --no-shipped`"
            )
    return home


def shipped_record(home: Path) -> dict[str, Any]:
    """The training record the shipped model was saved with (losses, held-out accuracy, time, threads)."""
    return json.loads((home / TRAINING_FILE).read_text())


def ship(trained_home: Path, root: Path | None = None, note: str = "") -> Path:
    """Copy a model `train` wrote (`<cache>/<config hash>/`) into `root` with its manifest; return the new folder.

    The manifest records the SHA-256 of every file, the config, and the versions and machine that trained it.
    """
    import torch
    import transformers

    record = json.loads((trained_home / TRAINING_FILE).read_text())
    config_hash = record["config_hash"]
    if trained_home.name != config_hash:
        raise WorldError(f"{trained_home} is not the folder of config {config_hash} that its training record names")
    root = root or SHIPPED_DIR
    root.mkdir(parents=True, exist_ok=True)
    home = root / config_hash
    with atomic_directory(home, replace=True) as staging:  # the folder appears whole, manifest included
        shutil.copytree(trained_home / CHECKPOINT_DIR, staging / CHECKPOINT_DIR)
        record["checkpoint"] = CHECKPOINT_DIR  # relative: the cache path of the training machine means nothing here
        write_text_atomic(staging / TRAINING_FILE, json.dumps(record, indent=2))
        files = {
            path.relative_to(staging).as_posix(): file_sha256(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "config_hash": config_hash,
            "config": record["config"],
            "world_version": WORLD_VERSION,
            "heldout_accuracy": record["heldout_accuracy"],
            "trained_with": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "threads": record["threads"],
                "seconds": record["seconds"],
            },
            "note": note,
            "files": files,
        }
        write_text_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return home


def compare_models(first: Path, second: Path, config: WorldModelConfig) -> dict[str, Any]:
    """Two checkpoints of one config, side by side: held-out accuracy of each, how often their answers agree on it
    (right/wrong per question), and the largest difference between any two corresponding weights."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    items = heldout_set(config, config.heldout)
    correct, weights = [], []
    for checkpoint in (first, second):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(checkpoint)
        correct.append(evaluate(model, Encoder(processor, model.config.model_type), items))
        weights.append(model.state_dict())
    if weights[0].keys() != weights[1].keys():
        raise WorldError(f"{first} and {second} do not hold the same weights")
    largest = max(float((weights[0][name] - weights[1][name]).abs().max()) for name in weights[0])
    return {
        "heldout": len(items),
        "heldout_accuracy": [float(np.mean(hits)) for hits in correct],
        "answers_agree": float(np.mean(correct[0] == correct[1])),
        "max_weight_difference": largest,
    }
