"""Wall time of the probe grid (`halp probe`) on CPU, on a synthetic run of the paper's shape.

The paper's grid: 11 features (vision-only + vision token at 5 layers + query token at 5 layers),
10,000 samples, d=3584 (Qwen2.5-VL-7B), 5 folds, both probe types. Every (feature, probe) cell
costs 5 CV fits + 5 shuffled-label control fits + 1 final fit on all rows + the bootstrap.

    python benchmarks/bench_probes.py                      # reduced: 2000 samples, 1 feature, both (minutes)
    python benchmarks/bench_probes.py --full               # the paper's grid (hours on 2 cores)
    python benchmarks/bench_probes.py --samples 10000 --features 1 --probe both   # one full-size cell per type
    python benchmarks/bench_probes.py --features 4 --dim 128 --threads 1 --jobs 2  # features in 2 processes

Features are random with a weak planted signal (10% positives); what is measured is the time,
not the AUROC. Prints the wall time per (feature, probe) cell and the total; results go to a
temporary run directory unless --out is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = ["vision_only"] + [
    f"{group}/layer_{k}" for group in ("vision_token", "query_token") for k in (0, 7, 14, 21, 27)
]


def write_synthetic_run(root: Path, samples: int, dim: int, features: list[str], seed: int = 0) -> None:
    from halp.data import Sample
    from halp.label import Label, write_labels
    from halp.store import rows_for, write_rows

    rng = np.random.default_rng(seed)
    y = (rng.random(samples) < 0.1).astype(int)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    arrays = {}
    for name in features:
        array = rng.standard_normal((samples, dim), dtype=np.float32)
        array += 0.5 * y[:, None].astype(np.float32) * direction
        arrays[name] = array
    rows = [
        Sample(f"q{i:06d}", f"img{i:06d}.jpg", "Is there a dog?", "no", {"category": f"c{i % 5}"})
        for i in range(samples)
    ]
    root.mkdir(parents=True, exist_ok=True)
    write_rows(
        root / "features.h5",
        rows_for(rows, ["no"] * samples, arrays),
        {"model_id": "synthetic", "layers": [0, 7, 14, 21, 27]},
    )
    write_labels(
        root / "labels.csv",
        [row.question_id for row in rows],
        [Label(int(value), "synthetic", "", "yesno") for value in y],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the paper's grid: 10000 samples, 11 features, both")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--features", type=int, default=1, help="how many of the 11 paper features")
    parser.add_argument("--probe", default="both", choices=["logreg", "mlp", "both"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50, help="MLP epochs (paper: 50)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's); set OMP_NUM_THREADS too"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="where the MLP trains: cpu or cuda")
    parser.add_argument("--jobs", type=int, default=1, help="processes evaluating features at once (halp probe --jobs)")
    args = parser.parse_args()
    if args.full:
        args.samples, args.features, args.probe = 10000, len(FEATURES), "both"

    import torch

    from halp.probe import train_probes

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    features = FEATURES[: args.features]
    with tempfile.TemporaryDirectory(prefix="halp-bench-") as scratch:
        run_dir = args.out or Path(scratch) / "run"
        start = time.perf_counter()
        write_synthetic_run(run_dir, args.samples, args.dim, features)
        written = time.perf_counter() - start
        print(f"synthetic run: {args.samples} x {args.dim}, {len(features)} feature(s), written in {written:.1f}s")
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"
        )
        start = time.perf_counter()
        results = train_probes(
            run_dir,
            features=features,
            probe=args.probe,
            folds=args.folds,
            bootstrap=args.bootstrap,
            threads=args.threads,
            device=args.device,
            jobs=args.jobs,
            probe_params={"mlp": {"epochs": args.epochs}},
            progress=print,
        )
        total = time.perf_counter() - start
    print("\nfeature,probe,fit_seconds (5 CV + 5 control + 1 final fit),auroc_mean,control_auroc_mean")
    for row in results.to_dict(orient="records"):
        print(
            f"{row['feature']},{row['probe']},{row['fit_seconds']:.1f},{row['auroc_mean']:.3f},{row['control_auroc_mean']:.3f}"
        )
    for kind, seconds in results.groupby("probe")["fit_seconds"].mean().items():
        print(f"mean per {kind} cell: {seconds:.1f}s")
    print(f"total wall time (train_probes, bootstrap and writing included): {total:.1f}s")


if __name__ == "__main__":
    main()
