"""The probe fits of a study against the machine's arithmetic limit: seconds per fit, and the fraction of the
measured matmul rate that the fits' own arithmetic reaches.

The study's size (issue 24): 10,000 rows x 3,584 dimensions (Qwen2.5-VL-7B), 14 features (vision_only,
vision_projected, and vision_token, vision_token_mean, query_token at 4 layers), both probes, 5 folds and the
shuffled-label control. Every (feature, probe) cell is 11 fits (5 CV folds + 5 control folds + the final fit on all
rows), trained as `halp probe` trains them (`ProbeData.fits` -> `fit_batch`).

    python benchmarks/bench_probes.py                          # the study's size (long on a CPU)
    python benchmarks/bench_probes.py --reduced                # 2,000 x 512, 2 features: about a minute
    python benchmarks/bench_probes.py --samples 10000 --features 1 --probe mlp --threads 2
    python benchmarks/bench_probes.py --device cuda            # the MLP on a GPU (logreg stays on the CPU)

Features are random with a weak planted signal (10% positives); what is measured is time, not AUROC.

The arithmetic counted is what the fits need, from their fitted attributes, not what the program executed:
- MLP: per trained row 2P forward + 2P weight gradients + 2(P - P1) input gradients (the first layer's inputs need
  none), P the weights of the Linear layers and P1 the first's; per held-out row and epoch 2P; epochs as run.
- logreg, batched Newton (d <= 256): per step of each problem 2 m p^2 (its Hessian) + 4 m p (gradient, direction),
  p = d + 1, m the problem's rows, steps as each problem took them (a batch computes converged problems too: not
  counted); batched L-BFGS (d > 256): 4 m p per iteration of each problem (its two matmuls with the features; the
  program multiplies every row and masks the problem's, which is not counted either).
The matmul rate is measured here, with the same threads and device: float32 (rows x d) @ (d x 512), the MLP's first
layer at `--measure-rows` rows (default: 11 fits x 128).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from halp.data import Sample
from halp.features import feature_names
from halp.label import Label, write_labels
from halp.probe import LOGREG_NEWTON_MAX_DIM, LogRegProbe, MLPProbe, ProbeSettings, load_probe_data
from halp.store import rows_for, write_rows

#: 2 + 3 x 4 = 14 features, as the issue's study counts them.
STUDY_LAYERS = [0, 9, 18, 27]
STUDY = {"samples": 10000, "dim": 3584, "features": 14}
REDUCED = {"samples": 2000, "dim": 512, "features": 2}


def study_features(count: int) -> list[str]:
    names = feature_names(STUDY_LAYERS)
    if not 1 <= count <= len(names):
        raise SystemExit(f"--features: 1 to {len(names)}")
    return names[:count]


def write_synthetic_run(root: Path, samples: int, dim: int, features: list[str], seed: int = 0) -> None:
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
        {"model_id": "synthetic", "layers": STUDY_LAYERS},
    )
    write_labels(
        root / "labels.csv",
        [row.question_id for row in rows],
        [Label(int(value), "synthetic", "", "yesno") for value in y],
    )


def matmul_rate(rows: int, dim: int, width: int = 512, device: str = "cpu", seconds: float = 1.0) -> float:
    """FLOP/s of a float32 (rows x dim) @ (dim x width) matmul on `device` with torch's current threads."""
    left = torch.randn(rows, dim, device=device)
    right = torch.randn(dim, width, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    left @ right  # warm-up
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        left @ right
        count += 1
        if device.startswith("cuda") and count % 50 == 0:
            sync()
    sync()
    return 2.0 * rows * dim * width * count / (time.perf_counter() - start)


def mlp_flops(probe: MLPProbe, rows: int) -> float:
    """The training arithmetic of one fitted MLPProbe that trained on a fit of `rows` rows (see the docstring)."""
    linears = [layer for layer in probe.net_ if isinstance(layer, torch.nn.Linear)]
    weights = sum(layer.in_features * layer.out_features for layer in linears)
    first = linears[0].in_features * linears[0].out_features
    epochs = len(probe.loss_history_)
    trained = epochs * probe.rows_per_epoch_ * (4 * weights + 2 * (weights - first))
    return trained + epochs * len(probe.held_out_) * 2 * weights


def logreg_flops(probe: LogRegProbe, rows: int) -> float:
    """The solver arithmetic of one fitted LogRegProbe that fitted `rows` rows (see the docstring)."""
    p = probe.n_features_in_ + 1
    newton = probe.n_features_in_ <= LOGREG_NEWTON_MAX_DIM
    per_row = (2 * p * p + 4 * p) if newton else 4 * p
    folds = probe.n_iter_.shape[0]
    inner = rows * (folds - 1) / folds if folds else 0
    total = float(probe.n_iter_.sum()) * inner * per_row
    if probe.refit_n_iter_ is not None:
        total += probe.refit_n_iter_ * rows * per_row
    return total


@dataclass
class Cell:
    feature: str
    probe: str
    fits: int
    seconds: float
    flops: float

    @property
    def seconds_per_fit(self) -> float:
        return self.seconds / self.fits


def run_cells(
    run_dir: Path, features: list[str], kinds: list[str], threads: int | None, device: str, epochs: int
) -> list[Cell]:
    """Time `fit_batch` over every fit of each (feature, probe), as `train_probes` runs it; count its arithmetic."""
    settings = ProbeSettings(probe="both" if len(kinds) == 2 else kinds[0], device=device, threads=threads)
    data = load_probe_data(run_dir, settings, features=features)
    fits = data.fits()
    cells = []
    for feature in features:
        X = data.matrix(feature)
        for kind in kinds:
            template = settings.template(kind)
            if kind == "mlp":
                template.set_params(epochs=epochs)
            start = time.perf_counter()
            probes = template.fit_batch(X, fits, data.groups)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            count = mlp_flops if kind == "mlp" else logreg_flops
            flops = sum(count(probe, len(fit.rows)) for probe, fit in zip(probes, fits, strict=True))
            cells.append(Cell(feature, kind, len(fits), seconds, flops))
    return cells


def totals(cells: list[Cell], rate: float) -> dict[str, dict[str, float]]:
    """Per probe type and for all cells: fits, seconds, seconds per fit, TFLOP, GFLOP/s, fraction of the matmul rate."""
    groups = {kind: [c for c in cells if c.probe == kind] for kind in dict.fromkeys(c.probe for c in cells)}
    out = {}
    for name, group in [*groups.items(), ("all", cells)]:
        seconds, flops, fits = sum(c.seconds for c in group), sum(c.flops for c in group), sum(c.fits for c in group)
        out[name] = {
            "cells": len(group),
            "fits": fits,
            "seconds": seconds,
            "seconds_per_fit": seconds / fits,
            "tflop": flops / 1e12,
            "gflops": flops / seconds / 1e9,
            "fraction_of_matmul_rate": flops / seconds / rate,
        }
    return out


def summarize(cells: list[Cell], rate: float) -> list[str]:
    """One line per probe type and one for all: seconds per fit, achieved GFLOP/s, fraction of the matmul rate."""
    return [
        f"{name}: {t['cells']} cell(s), {t['fits']} fits, {t['seconds']:.1f}s = {t['seconds_per_fit']:.2f}s per fit "
        f"({t['fits'] / t['seconds']:.2f} fits/s); {t['tflop']:.2f} TFLOP at {t['gflops']:.1f} GFLOP/s "
        f"= {t['fraction_of_matmul_rate']:.0%} of the matmul rate"
        for name, t in totals(cells, rate).items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="2,000 x 512, 2 features (about a minute)")
    parser.add_argument("--samples", type=int, default=None, help=f"rows (study: {STUDY['samples']})")
    parser.add_argument("--dim", type=int, default=None, help=f"dimensions (study: {STUDY['dim']})")
    parser.add_argument("--features", type=int, default=None, help=f"how many features (study: {STUDY['features']})")
    parser.add_argument("--probe", default="both", choices=["logreg", "mlp", "both"])
    parser.add_argument("--epochs", type=int, default=50, help="the MLP's most epochs (default: halp's, 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); BLAS too")
    parser.add_argument("--device", default="cpu", help="where the MLP trains: cpu or cuda")
    parser.add_argument("--measure-rows", type=int, default=11 * 128, help="rows of the matmul the rate is measured on")
    parser.add_argument("--out", type=Path, default=None, help="keep the synthetic run here (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    size = REDUCED if args.reduced else STUDY
    samples, dim = args.samples or size["samples"], args.dim or size["dim"]
    features = study_features(args.features or size["features"])
    kinds = ["logreg", "mlp"] if args.probe == "both" else [args.probe]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    with tempfile.TemporaryDirectory(prefix="halp-bench-") as scratch, threadpool_limits(limits=args.threads):
        run_dir = args.out or Path(scratch) / "run"
        start = time.perf_counter()
        write_synthetic_run(run_dir, samples, dim, features)
        print(
            f"synthetic run: {samples} x {dim}, {len(features)} feature(s), "
            f"written in {time.perf_counter() - start:.1f}s"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, device {args.device}"
        )
        rate = matmul_rate(args.measure_rows, dim, device=args.device)
        print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s (float32 ({args.measure_rows} x {dim}) @ ({dim} x 512))")
        start = time.perf_counter()
        cells = run_cells(run_dir, features, kinds, args.threads, args.device, args.epochs)
        total = time.perf_counter() - start
    print("\nfeature,probe,fits,seconds,seconds_per_fit,TFLOP,GFLOP/s,fraction_of_matmul_rate")
    for cell in cells:
        print(
            f"{cell.feature},{cell.probe},{cell.fits},{cell.seconds:.2f},{cell.seconds_per_fit:.3f},"
            f"{cell.flops / 1e12:.3f},{cell.flops / cell.seconds / 1e9:.1f},{cell.flops / cell.seconds / rate:.3f}"
        )
    print(f"\nall fits in {total:.1f}s (reading the features included); matmul rate {rate / 1e9:.1f} GFLOP/s")
    for line in summarize(cells, rate):
        print(line)
    if args.json:
        figures = {
            "samples": samples,
            "dim": dim,
            "features": len(features),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "matmul_gflops": rate / 1e9,
            "seconds": total,
            "cells": [{**asdict(cell), "seconds_per_fit": cell.seconds_per_fit} for cell in cells],
            "totals": totals(cells, rate),
        }
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
