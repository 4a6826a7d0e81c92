"""Crash consistency: a real extraction killed with SIGKILL at random moments, resumed each time."""

from __future__ import annotations

import h5py
import numpy as np

from halp.extract import ExtractConfig, run_extraction
from halp.store import feature_datasets, read_strings
from halp.testing import make_vqa_set
from halp.testing.faults import kill_and_resume


def _content(path):
    with h5py.File(path, "r") as handle:
        return (
            read_strings(handle["question_id"]),
            read_strings(handle["answer"]),
            {name: handle[name][()] for name in feature_datasets(handle)},
        )


def test_random_kills_lose_and_duplicate_nothing(tmp_path, checkpoint_dir):
    table, images = make_vqa_set(tmp_path / "data", n=40, seed=5)
    checkpoint = str(checkpoint_dir("qwen2_vl"))
    common = dict(
        model=checkpoint,
        data=table,
        images=images,
        batch_size=1,
        max_new_tokens=3,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    run_extraction(ExtractConfig(out=tmp_path / "reference", **common))

    out = tmp_path / "run"
    args = [
        "--model",
        checkpoint,
        "--data",
        str(table),
        "--images",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    report = kill_and_resume(args, out, trials=10, seed=1, max_delay=0.25, pause=0.05)
    assert report.trials == 10 and report.kills >= 8, report
    assert not report.unexpected_exits, report.unexpected_exits
    assert report.committed_rows_lost == 0 and report.duplicate_rows == 0, report
    assert report.committed_after_each_kill == sorted(report.committed_after_each_kill)

    summary = run_extraction(ExtractConfig(out=out, **common))
    assert summary.finished
    ids, answers, features = _content(out / "features.h5")
    ref_ids, ref_answers, ref_features = _content(tmp_path / "reference" / "features.h5")
    assert ids == ref_ids and len(set(ids)) == 40
    assert answers == ref_answers
    for name, values in ref_features.items():
        np.testing.assert_allclose(features[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
