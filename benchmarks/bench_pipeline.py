"""Overlap of the extraction pipeline on CPU, and halp's rate against the seeds' three-pass method.

    python benchmarks/bench_pipeline.py --samples 64 --batch-size 8 --model-delay 0.5 --workers 1

Builds a small random Qwen2.5-VL (as bench_extract.py's small preset) and a synthetic VQA set of 224-448 px
JPEG images on disk, then runs the real `run_extraction` on the same rows:

1. in series (`--workers 0`) and overlapped (`--workers N`), with `--model-delay` seconds added to every model
   call. The delay is a sleep: it stands for device time during which the host is free (a GPU prefill), and
   makes the model the slowest stage. Overlapped, the wall time should be close to
   (slowest stage per batch) x batches, not the sum of the stages; the model's input-stall fraction is printed.
2. without delay, with `--max-new-tokens`, each of `--compare-workers` (default: halp's own default and
   `--workers 0`, alternated `--repeats` times) against the seeds' method (bench_extract.seeds_method: per sample
   generate, a vision pass and a full forward, images loaded from disk) on the same rows.

    python benchmarks/bench_pipeline.py --preset tiny --samples 96 --batch-size 8 --max-new-tokens 16 --skip-overlap

Rates count the extraction loop only (model loading excluded). Figures on a shared machine vary: rerun.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_extract import make_images, seeds_method  # the script's directory is on sys.path

from halp.capture import FeatureExtractor, parse_layers
from halp.data import load_image
from halp.extract import ExtractConfig, ExtractSummary, run_extraction
from halp.loading import load_model
from halp.models import adapter_for
from halp.testing import build_checkpoint
from halp.testing.vqa import QUESTIONS


def write_set(root: Path, samples: int) -> tuple[Path, Path]:
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    table = root / "vqa.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "image_id", "question"])
        for index, image in enumerate(make_images(samples, seed=1)):
            image.save(images_dir / f"{index:05d}.jpg", quality=90)
            writer.writerow([f"q{index:05d}", f"{index:05d}.jpg", QUESTIONS[index % len(QUESTIONS)]])
    return table, images_dir


def checkpoint_for(preset: str, root: Path) -> Path:
    """small: bench_extract.py's small model; tiny: the test fixture (its model step costs little on a CPU, so
    the fixed --model-delay dominates it and the input stage is a visible share of a serial run)."""
    sizes = dict(hidden_size=256, num_layers=8, vision_dim=128, vision_depth=4) if preset == "small" else {}
    return build_checkpoint("qwen2_5_vl", root / "model", min_pixels=224 * 224, max_pixels=448 * 448, **sizes)


def with_model_delay(seconds: float):
    """Patch FeatureExtractor.run to sleep `seconds` per call (device time with the host free); returns undo."""
    real_run = FeatureExtractor.run
    if seconds <= 0:
        return lambda: None

    def slow_run(self, inputs, max_new_tokens=0, positions=None):
        time.sleep(seconds)
        return real_run(self, inputs, max_new_tokens, positions)

    FeatureExtractor.run = slow_run

    def undo() -> None:
        FeatureExtractor.run = real_run

    return undo


def describe(label: str, summary: ExtractSummary) -> float:
    stages = summary.stages
    batches = max(stages.batches, 1)
    workers = max(stages.workers, 1)
    per_batch = {
        "input": (stages.loading_images + stages.processing) / workers / batches,
        "model": stages.model / batches,
        "commit": stages.committing / batches,
    }
    slowest = max(per_batch, key=per_batch.get)
    rate = summary.processed / stages.wall if stages.wall else 0.0
    steady = stages.wall - stages.first_batch_wait
    print(f"{label}: {summary.processed} rows in {stages.wall:.2f}s = {rate:.2f} samples/s")
    print(f"    {stages.line()}")
    print(
        f"    per batch: input {per_batch['input']:.3f}s (per worker), model {per_batch['model']:.3f}s, "
        f"commit {per_batch['commit']:.3f}s; slowest ({slowest}) x {batches} batches = "
        f"{per_batch[slowest] * batches:.2f}s; sum of stages = {sum(per_batch.values()) * batches:.2f}s; "
        f"wall after the first batch arrived = {steady:.2f}s"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="part 1: the overlapped run's workers")
    parser.add_argument(
        "--compare-workers",
        default="default,0",
        help="part 2: comma-separated --workers settings to time against the seeds' method ('default': halp's own)",
    )
    parser.add_argument("--model-delay", type=float, default=0.5, help="seconds added to every model call")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seeds-samples", type=int, default=None, help="rows for the seeds' method (default: all)")
    parser.add_argument("--preset", choices=["small", "tiny"], default="small", help="the model (see checkpoint_for)")
    parser.add_argument("--repeats", type=int, default=1, help="part 1: alternate in series / overlapped this often")
    parser.add_argument("--skip-seeds", action="store_true", help="part 1 only")
    parser.add_argument("--skip-overlap", action="store_true", help="part 2 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="halp-bench-pipeline-") as scratch:
        root = Path(scratch)
        checkpoint = checkpoint_for(args.preset, root)
        table, images = write_set(root / "data", args.samples)
        base = ExtractConfig(
            model=str(checkpoint),
            data=table,
            images=images,
            out=root / "runs",
            batch_size=args.batch_size,
            max_new_tokens=2,
            device="cpu",
            dtype="float32",
            progress=False,
        )
        if not args.skip_overlap:
            undo = with_model_delay(args.model_delay)
            try:
                print(f"\n1. model made slower than the input: +{args.model_delay}s per batch, 2 answer tokens")
                for repeat in range(args.repeats):  # alternated: a shared machine's load drifts between runs
                    serial = run_extraction(replace(base, out=root / f"serial{repeat}", workers=0))
                    describe("   in series (--workers 0)", serial)
                    overlapped = run_extraction(replace(base, out=root / f"overlapped{repeat}", workers=args.workers))
                    describe(f"   overlapped (--workers {args.workers})", overlapped)
                    print(
                        f"   overlapped / in series: {serial.stages.wall / overlapped.stages.wall:.2f}x faster; stall "
                        f"{overlapped.stages.stall_fraction:.1%}, after the first batch "
                        f"{overlapped.stages.steady_stall_fraction:.1%} (goal < 10%)"
                    )
            finally:
                undo()

        if args.skip_seeds:
            return
        print(f"\n2. against the seeds' method, {args.max_new_tokens} answer tokens, no delay")
        settings = [None if item == "default" else int(item) for item in args.compare_workers.split(",")]
        rates: dict[int | None, list[float]] = {setting: [] for setting in settings}
        for repeat in range(args.repeats):  # alternated: a shared machine's load drifts between runs
            for setting in settings:
                config = replace(
                    base, out=root / f"halp-{setting}-{repeat}", workers=setting, max_new_tokens=args.max_new_tokens
                )
                summary = run_extraction(config)
                label = f"default: {summary.stages.workers}" if setting is None else str(setting)
                rates[setting].append(describe(f"   halp (--workers {label})", summary))
        model, processor = load_model(str(checkpoint), "cpu", "float32")
        adapter = adapter_for(model, processor)
        layers = parse_layers("halp", adapter.num_layers)
        rows = list(csv.DictReader(table.open()))[: args.seeds_samples or args.samples]
        seeds_method(model, processor, adapter, [load_image(images, rows[0]["image_id"])], ["warm up"], layers, 2)
        start = time.perf_counter()
        loaded = [load_image(images, row["image_id"]) for row in rows]
        seeds_method(model, processor, adapter, loaded, [row["question"] for row in rows], layers, args.max_new_tokens)
        seeds_rate = len(rows) / (time.perf_counter() - start)
        print(f"   seeds' method: {seeds_rate:.2f} samples/s on {len(rows)} rows")
        for setting, measured in rates.items():
            each = ", ".join(f"{rate:.2f}" for rate in measured)
            print(
                f"   ratio halp (--workers {'default' if setting is None else setting}) / seeds: "
                f"{max(measured) / seeds_rate:.2f}x (best of {len(measured)}: {each} samples/s)"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
