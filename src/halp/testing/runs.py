"""Helpers for tests and benchmarks that run `halp extract` on tiny checkpoints and compare runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.extract import ExtractConfig
from halp.store import STRING_FIELDS, feature_datasets, meta_columns, read_strings


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


#: Rows of the data set on which sharded, Ray and single-process runs are compared (tests/conftest.py's `run_*`).
COMPARED_ROWS = 12


def compared_run_config(
    checkpoint: str | Path, table: Path, images: Path, out: Path, **overrides: Any
) -> ExtractConfig:
    """The settings under which engines (single process, shards, Ray) are compared: batches of 2, 3 new tokens."""
    return cpu_extract_config(checkpoint, table, images, out, **{"batch_size": 2, "max_new_tokens": 3, **overrides})


def assert_run_equals(run_dir: Path, reference: dict[str, Any]) -> None:
    """The run's features.h5 holds the reference's rows, in table order, once each, with the same values.

    Float arrays are float32 and agree within rtol = atol = 1e-5 (separate processes may sum in another
    order); strings and metadata must be equal.
    """
    got = read_run(Path(run_dir) / "features.h5")
    assert got["question_id"] == reference["question_id"], "rows missing, duplicated or out of table order"
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        if isinstance(value, np.ndarray):
            assert got[name].dtype == np.float32, name
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            assert got[name] == value, name


def read_run(path: Path) -> dict[str, Any]:
    """Every dataset of a features.h5: float arrays, and strings (metadata columns included) as lists."""
    with h5py.File(path, "r") as handle:
        content: dict[str, Any] = {name: handle[name][()] for name in feature_datasets(handle)}
        for name in STRING_FIELDS:
            content[name] = read_strings(handle[name])
        for column, dataset in meta_columns(handle).items():
            content[f"meta/{column}"] = read_strings(dataset)
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
