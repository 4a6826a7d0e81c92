"""Crash consistency: a real extraction killed with SIGKILL at random moments, resumed each time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from halp.extract import run_extraction
from halp.testing import make_vqa_set
from halp.testing.faults import kill_and_resume
from halp.testing.runs import cpu_extract_config, read_run


def test_random_kills_lose_and_duplicate_nothing(tmp_path, checkpoint_dir):
    table, images = make_vqa_set(tmp_path / "data", n=40, seed=5)
    config = cpu_extract_config(
        checkpoint_dir("qwen2_vl"), table, images, tmp_path / "run", batch_size=1, max_new_tokens=3
    )
    run_extraction(replace(config, out=tmp_path / "reference"))

    report = kill_and_resume(config, trials=10, seed=1, max_delay=0.25, pause=0.05)
    assert report.trials == 10 and report.kills >= 8, report
    assert not report.unexpected_exits, report.unexpected_exits
    assert report.committed_rows_lost == 0 and report.duplicate_rows == 0, report
    assert report.committed_after_each_kill == sorted(report.committed_after_each_kill)

    summary = run_extraction(config)
    assert summary.finished
    got = read_run(tmp_path / "run" / "features.h5")
    reference = read_run(tmp_path / "reference" / "features.h5")
    assert got["question_id"] == reference["question_id"] and len(set(got["question_id"])) == 40
    assert got["answer"] == reference["answer"]
    for name, values in reference.items():
        if isinstance(values, np.ndarray):
            np.testing.assert_allclose(got[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
