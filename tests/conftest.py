"""Shared fixtures: tiny checkpoints are built once per session, offline, by halp.testing."""

from __future__ import annotations

from pathlib import Path

import pytest

from halp.testing import build_checkpoint, make_vqa_set


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
