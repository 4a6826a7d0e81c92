"""Crash-consistency figures: SIGKILL a real `halp extract` at random moments, resume, compare.

    python benchmarks/fault_injection.py --trials 20 --samples 60

Prints trials, kills, committed rows lost (must be 0), duplicates (must be 0) and whether the resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from halp.extract import run_extraction
from halp.testing import build_checkpoint, make_vqa_set
from halp.testing.faults import kill_and_resume
from halp.testing.runs import cpu_extract_config, read_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = str(build_checkpoint("qwen2_vl", root / "model"))
        table, images = make_vqa_set(root / "data", n=args.samples, seed=args.seed)
        config = cpu_extract_config(checkpoint, table, images, root / "run", batch_size=1, max_new_tokens=3)
        run_extraction(replace(config, out=root / "reference"))
        start = time.perf_counter()
        report = kill_and_resume(config, trials=args.trials, seed=args.seed, max_delay=args.max_delay)
        run_extraction(config)
        got, reference = read_run(root / "run" / "features.h5"), read_run(root / "reference" / "features.h5")
        ids = got["question_id"]
        equal = ids == reference["question_id"] and all(
            np.allclose(got[name], value, rtol=1e-5, atol=1e-6)
            for name, value in reference.items()
            if isinstance(value, np.ndarray)
        )
        print(
            f"trials={report.trials} kills={report.kills} committed_rows_lost={report.committed_rows_lost} "
            f"duplicates={report.duplicate_rows} unexpected_exits={len(report.unexpected_exits)} "
            f"rows={len(ids)}/{args.samples} equal_to_uninterrupted={equal} "
            f"committed_after_each_kill={report.committed_after_each_kill} ({time.perf_counter() - start:.0f}s)"
        )


if __name__ == "__main__":
    main()
