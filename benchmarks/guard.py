"""A guard for every change (issue 24): the headline ratios of halp's main jobs in well under a minute on 2 cores.

    python benchmarks/guard.py            # prints the figures, then a 6-line headline (its last lines)
    python benchmarks/guard.py | tail -6  # the headline only

1. Extraction against the seeds' three-pass method in one run: `halp extract`'s loop (`run_extraction`, default
   flags: input workers as halp chooses them) on the tiny Qwen2.5-VL fixture, batch 8, 16 answer tokens, float32 on
   the CPU, and `bench_extract.seeds_method` on the same rows (bench_pipeline's data set and checkpoint).
2. Probe fits against the arithmetic limit: one (feature, probe) cell per probe type, 11 fits each (5 folds, 5
   control folds, the final fit) at `halp world`'s shape (1,500 x 128), one torch thread as a `halp world` probe
   worker has; fits per second and the fraction of the matmul rate measured here (`bench_probes`).

It is a benchmark that prints, not a test: nothing fails on a slow figure. A machine shared with other jobs gives
lower and noisier figures; compare ratios, and rerun on a quiet machine before claiming a change.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import seeds_method  # the script's directory is on sys.path
from bench_pipeline import checkpoint_for, write_set
from bench_probes import matmul_rate, run_cells, summarize, write_synthetic_run

from halp.capture import parse_layers
from halp.data import load_image
from halp.extract import ExtractConfig, run_extraction
from halp.loading import load_model
from halp.models import adapter_for

EXTRACT_ROWS, SEEDS_ROWS, BATCH, NEW_TOKENS = 96, 24, 8, 16
PROBE_ROWS, PROBE_DIM = 1500, 128


def extraction_ratio(root: Path) -> tuple[float, float, int]:
    """(halp samples/s, seeds' samples/s, halp's input workers) on the tiny fixture, in this process."""
    checkpoint = checkpoint_for("tiny", root)
    table, images = write_set(root / "data", EXTRACT_ROWS)
    config = ExtractConfig(
        model=str(checkpoint),
        data=table,
        images=images,
        out=root / "run",
        batch_size=BATCH,
        max_new_tokens=NEW_TOKENS,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    summary = run_extraction(config)
    halp_rate = summary.processed / summary.stages.wall
    model, processor = load_model(str(checkpoint), "cpu", "float32")
    adapter = adapter_for(model, processor)
    layers = parse_layers("halp", adapter.num_layers)
    rows = list(csv.DictReader(table.open()))[:SEEDS_ROWS]
    loaded = [load_image(images, row["image_id"]) for row in rows]
    seeds_method(model, processor, adapter, loaded[:1], ["warm up"], layers, 2)
    start = time.perf_counter()
    seeds_method(model, processor, adapter, loaded, [row["question"] for row in rows], layers, NEW_TOKENS)
    return halp_rate, len(rows) / (time.perf_counter() - start), summary.stages.workers


def main() -> None:
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"guard: {os.cpu_count()} cores, load average {load:.1f} at the start, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="halp-guard-") as scratch:
        root = Path(scratch)
        halp_rate, seeds_rate, workers = extraction_ratio(root)
        print(f"extraction: halp {halp_rate:.2f} samples/s ({workers} input worker(s)), seeds {seeds_rate:.2f}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            write_synthetic_run(root / "probes", PROBE_ROWS, PROBE_DIM, ["query_token/layer_0"])
            rate = matmul_rate(11 * 128, PROBE_DIM, seconds=0.5)
            cells = run_cells(root / "probes", ["query_token/layer_0"], ["logreg", "mlp"], 1, "cpu", 50)
        finally:
            torch.set_num_threads(threads)
    lines = summarize(cells, rate)
    for line in lines:
        print(f"probes: {line}")
    # The headline: the last 6 lines.
    print(f"== guard headline (load average {load:.1f} at the start; compare ratios, not seconds) ==")
    print(
        f"extraction / seeds' method: {halp_rate / seeds_rate:.2f}x ({halp_rate:.1f} vs {seeds_rate:.1f} samples/s; "
        f"tiny Qwen2.5-VL, batch {BATCH}, {NEW_TOKENS} tokens, default flags: {workers} input worker(s))"
    )
    print(f"probe logreg: {lines[0]}")
    print(f"probe mlp: {lines[1]}")
    print(
        f"matmul rate (the limit): {rate / 1e9:.1f} GFLOP/s, "
        f"float32 (1408 x {PROBE_DIM}) @ ({PROBE_DIM} x 512), 1 thread"
    )
    print(f"guard done in {time.perf_counter() - started:.0f}s (goal <= 45s on 2 cores)")


if __name__ == "__main__":
    main()
