"""Helpers for tests and benchmarks that run `halp extract` on tiny checkpoints and compare runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from halp.extract import ExtractConfig
from halp.store import STRING_FIELDS, feature_datasets, read_strings


def cpu_extract_config(checkpoint: str | Path, table: Path, images: Path, out: Path, **overrides: Any) -> ExtractConfig:
    """An extraction on CPU in float32 without a progress bar: the settings under which runs compare exactly."""
    settings: dict[str, Any] = dict(
        model=str(checkpoint),
        data=table,
        images=images,
        out=out,
        batch_size=2,
        max_new_tokens=4,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    settings.update(overrides)
    return ExtractConfig(**settings)


def read_run(path: Path) -> dict[str, Any]:
    """Every dataset of a features.h5: float arrays, and strings (metadata columns included) as lists."""
    with h5py.File(path, "r") as handle:
        content: dict[str, Any] = {name: handle[name][()] for name in feature_datasets(handle)}
        for name in STRING_FIELDS:
            content[name] = read_strings(handle[name])
        for column in handle.get("meta", {}):
            content[f"meta/{column}"] = read_strings(handle["meta"][column])
    return content


def cli_args(config: ExtractConfig) -> list[str]:
    """The `halp extract` command-line arguments equivalent to `config` (the options tests and benchmarks set)."""
    args = [
        "--model",
        config.model,
        "--data",
        str(config.data),
        "--images",
        str(config.images),
        "--out",
        str(config.out),
        "--layers",
        config.layers,
        "--batch-size",
        str(config.batch_size),
        "--max-new-tokens",
        str(config.max_new_tokens),
        "--device",
        config.device,
        "--dtype",
        config.dtype,
    ]
    if not config.generate:
        args.append("--no-generate")
    if config.workers is not None:
        args += ["--workers", str(config.workers)]
    if config.limit is not None:
        args += ["--limit", str(config.limit)]
    return args
