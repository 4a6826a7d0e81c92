"""Shared fixtures: tiny checkpoints are built once per session, offline, by halp.testing."""

from __future__ import annotations

from pathlib import Path

import pytest

from halp.testing import build_checkpoint, make_vqa_set
from halp.testing.runs import COMPARED_ROWS, compared_run_config, read_run


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_checkpoint(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def vqa_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_vqa_set(tmp_path_factory.mktemp("vqa"), n=12)


@pytest.fixture(scope="session")
def loaded(checkpoint_dir):
    """(model, processor) loaded back through the Auto classes, cached per family."""
    from halp.loading import load_model

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(str(checkpoint_dir(family)), device="cpu", dtype="float32")
        return cache[family]

    return get


# ----- engine comparisons (tests/test_shards.py, tests/test_ray.py): one data set, one single-process reference -----
@pytest.fixture(scope="session")
def run_checkpoint(checkpoint_dir) -> Path:
    """The checkpoint every engine comparison runs (Qwen2-VL: M-RoPE positions built inside generate)."""
    return checkpoint_dir("qwen2_vl")


@pytest.fixture(scope="session")
def run_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_vqa_set(tmp_path_factory.mktemp("run_data"), n=COMPARED_ROWS, seed=7)


@pytest.fixture(scope="session")
def run_reference(tmp_path_factory: pytest.TempPathFactory, run_checkpoint, run_data) -> dict:
    """A plain single-process extraction of run_data: what sharded and Ray runs must equal (read-only)."""
    from halp.extract import run_extraction

    table, images = run_data
    out = tmp_path_factory.mktemp("single")
    summary = run_extraction(compared_run_config(run_checkpoint, table, images, out))
    assert summary.finished and summary.processed == COMPARED_ROWS and summary.shard is None
    return read_run(out / "features.h5")


# ----- halp serve (tests/test_serve.py, tests/test_serve_ray.py): one small halp world run with probes -----
@pytest.fixture(scope="session")
def served_world(tmp_path_factory: pytest.TempPathFactory):
    """The shipped world model's run of 32 questions, exactly labelled, with logistic probes (halp.testing.serving)."""
    from halp.testing.serving import make_world_run

    return make_world_run(tmp_path_factory.mktemp("served"), n_images=16)
