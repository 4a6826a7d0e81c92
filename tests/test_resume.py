"""A run killed with SIGKILL part-way and rerun has every sample exactly once and equals an uninterrupted run."""

from __future__ import annotations

from functools import partial

import h5py
import numpy as np
import pytest

from halp.data import read_samples
from halp.extract import run_extraction
from halp.store import RunMismatchError, RunStore, feature_datasets
from halp.testing import make_vqa_set
from halp.testing.runs import cli_args, cpu_extract_config, read_run
from halp.testing.slow_cli import kill_after_commits

_config = partial(cpu_extract_config, batch_size=2, max_new_tokens=4)


_read = read_run


def _assert_same_run(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return make_vqa_set(tmp_path_factory.mktemp("data16"), n=16, seed=3)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, checkpoint_dir, data16):
    table, images = data16
    out = tmp_path_factory.mktemp("reference")
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out))
    assert summary.finished and summary.processed == 16
    return _read(out / "features.h5")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, checkpoint_dir, data16, reference_run):
    table, images = data16
    out = tmp_path / "run"
    args = ["extract", *cli_args(_config(checkpoint_dir("qwen2_vl"), table, images, out))]
    store = RunStore(out)
    committed = kill_after_commits(args, store, commits=3)
    assert committed == 3, f"the killed run must hold exactly the 3 parts it committed, found {committed}"
    assert not (out / "features.h5").exists()
    assert len(store.committed_ids()) == 2 * committed

    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out))
    assert summary.finished
    assert summary.already_done == 2 * committed
    assert summary.processed == 16 - 2 * committed
    resumed = _read(out / "features.h5")
    ids = resumed["question_id"]
    assert ids == [sample.question_id for sample in read_samples(table)]  # every sample once, in table order
    _assert_same_run(resumed, reference_run)
    assert not store.part_paths()


def test_rerun_of_finished_run_does_nothing_and_limit_extends(tmp_path, checkpoint_dir, data16, reference_run):
    table, images = data16
    out = tmp_path / "run"
    first = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, limit=6))
    assert first.finished and first.processed == 6
    again = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, limit=6))
    assert again.processed == 0 and again.already_done == 6
    extended = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out))
    assert extended.already_done == 6 and extended.processed == 10
    _assert_same_run(_read(out / "features.h5"), reference_run)


def test_rerun_with_other_settings_is_refused_and_overwrite_starts_afresh(tmp_path, checkpoint_dir, data16):
    table, images = data16
    out = tmp_path / "run"
    run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, limit=2))
    with pytest.raises(RunMismatchError, match="layers"):
        run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, limit=2, layers="0,1"))
    with pytest.raises(RunMismatchError, match="model"):
        run_extraction(_config(checkpoint_dir("qwen2_5_vl"), table, images, out, limit=2))
    fresh = run_extraction(
        _config(checkpoint_dir("qwen2_vl"), table, images, out, limit=2, layers="0,1", overwrite=True)
    )
    assert fresh.processed == 2 and fresh.already_done == 0
    with h5py.File(out / "features.h5", "r") as handle:
        assert sorted(n for n in feature_datasets(handle) if n.startswith("query_token")) == [
            "query_token/layer_0",
            "query_token/layer_1",
        ]


def test_batch_size_does_not_change_the_result(tmp_path, checkpoint_dir, data16, reference_run):
    table, images = data16
    out = tmp_path / "run"
    run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=5))
    batched = _read(out / "features.h5")
    for name, value in reference_run.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(batched[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
        else:
            assert batched[name] == value, name
