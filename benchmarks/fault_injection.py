"""Crash-consistency figures: SIGKILL a real `halp extract` at random moments, resume, compare.

    python benchmarks/fault_injection.py --trials 20 --samples 60

Prints trials, kills, committed rows lost (must be 0), duplicates (must be 0) and whether the resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from halp.extract import ExtractConfig, run_extraction
from halp.store import feature_datasets, read_strings
from halp.testing import build_checkpoint, make_vqa_set
from halp.testing.faults import kill_and_resume


def read(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with h5py.File(path, "r") as handle:
        return read_strings(handle["question_id"]), {name: handle[name][()] for name in feature_datasets(handle)}


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
        run_extraction(ExtractConfig(out=root / "reference", **common))
        out = root / "run"
        cli_args = [
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
        start = time.perf_counter()
        report = kill_and_resume(cli_args, out, trials=args.trials, seed=args.seed, max_delay=args.max_delay)
        run_extraction(ExtractConfig(out=out, **common))
        ids, features = read(out / "features.h5")
        ref_ids, ref_features = read(root / "reference" / "features.h5")
        equal = ids == ref_ids and all(
            np.allclose(features[name], ref_features[name], rtol=1e-5, atol=1e-6) for name in ref_features
        )
        print(
            f"trials={report.trials} kills={report.kills} committed_rows_lost={report.committed_rows_lost} "
            f"duplicates={report.duplicate_rows} unexpected_exits={len(report.unexpected_exits)} "
            f"rows={len(ids)}/{args.samples} equal_to_uninterrupted={equal} "
            f"committed_after_each_kill={report.committed_after_each_kill} ({time.perf_counter() - start:.0f}s)"
        )


if __name__ == "__main__":
    main()
