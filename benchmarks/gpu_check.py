"""One prepared GPU check (run by benchmarks/gpu_check.sh): halp's extraction at full Qwen2.5-VL-7B shapes.

    bash benchmarks/gpu_check.sh              # one H200 (or any CUDA card): under 8 minutes, no download
    bash benchmarks/gpu_check.sh --reduced    # CPU, tiny model: checks the script itself (the test suite runs it)

Random weights with the real Qwen2.5-VL-7B shapes in bfloat16 (bench_extract.py's 7b preset; the tiny fixture's
tokenizer and processor, 224-448 px images). It runs the real `run_extraction` (input workers, writer thread)
on a synthetic VQA set written to disk, and prints:

- samples/s of halp at batch sizes 1, 8, 16, 32, with 32 answer tokens and with --no-generate;
- the seeds' three-pass method (bench_extract.seeds_method) on the same card, and halp's ratio to it;
- the fraction of bf16 dense peak reached with --no-generate (2 x parameters x tokens, decoder and vision tower);
- the model's input-stall fraction, and peak GPU memory per setting;
- the study-size probe cell: 10,000 x 3,584, both probes (11 fits each), the MLP on cuda: seconds per fit and the
  fraction of the card's measured float32 matmul rate the fits' arithmetic reaches (benchmarks/bench_probes.py).

Goals (docs/benchmarks.md): >= 10x the seeds' method with generation, >= 40% of bf16 peak at batch >= 16,
stall < 5%, the probe cell in under a minute at >= 50% of the measured matmul rate. --json PATH also writes every
figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_extract import load, seeds_method  # the script's directory is on sys.path
from bench_pipeline import write_set

from halp.capture import parse_layers
from halp.data import load_image, read_samples
from halp.extract import ExtractConfig, run_extraction
from halp.loading import load_model
from halp.models import adapter_for
from halp.testing import build_checkpoint


@dataclass
class Setting:
    batch_size: int
    mode: str
    samples: int
    samples_per_second: float
    stall_fraction: float
    steady_stall_fraction: float
    padding_fraction: float
    peak_memory_gib: float
    tflops: float | None = None
    fraction_of_peak: float | None = None


def model_and_processor(reduced: bool, device: str, dtype: torch.dtype, workdir: Path):
    """(model, processor, processor checkpoint): the 7B shapes with random weights, or the tiny fixture."""
    if reduced:
        path = build_checkpoint("qwen2_5_vl", workdir / "tiny", min_pixels=224 * 224, max_pixels=448 * 448)
        model, processor = load_model(str(path), device, str(dtype).removeprefix("torch."))
        return model, processor, path
    model, processor = load("7b", device, dtype, workdir)
    return model, processor, workdir / "proc"  # where load("7b") built the processor's checkpoint


def flops_per_sample(model, adapter, table: Path, images: Path, rows: int) -> tuple[float, float, float]:
    """Matmul work of one sample's prefill (2 x weights x tokens, decoder and vision tower), and the tokens."""
    samples = read_samples(table)[:rows]
    encoded = adapter.encode([load_image(images, s.image_id) for s in samples], [s.question for s in samples])
    text_tokens = float(encoded["attention_mask"].sum()) / len(samples)
    patches = float(encoded["image_grid_thw"].prod(-1).sum()) / len(samples)
    lm_params = sum(p.numel() for p in adapter.layer_modules().parameters())
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    return 2 * (lm_params * text_tokens + vision_params * patches), text_tokens, patches


def probe_cell(reduced: bool, device: str, workdir: Path) -> tuple[float, dict]:
    """Wall seconds of one bench_probes.py run of the study-size cell (10,000 x 3,584, 1 feature, both probes: 11
    fits each, the MLP on `device`) and its figures (seconds per fit, fraction of the measured matmul rate)."""
    script = Path(__file__).parent / "bench_probes.py"
    size = ["--samples", "300", "--dim", "32", "--epochs", "2"] if reduced else ["--samples", "10000", "--dim", "3584"]
    figures_path = workdir / "probe-cell.json"
    command = [sys.executable, str(script), *size, "--features", "1", "--probe", "both", "--device", device]
    start = time.perf_counter()
    subprocess.run([*command, "--json", str(figures_path)], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(figures_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="CPU, tiny model, batch sizes 1 and 2: a script check")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workers", type=int, default=None, help="input workers (default: halp's)")
    args = parser.parse_args()
    started = time.perf_counter()
    reduced = args.reduced
    if not reduced and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --reduced for the CPU check of the script")
    device = "cpu" if reduced else "cuda"
    dtype = torch.float32 if reduced else torch.bfloat16
    batch_sizes = [1, 2] if reduced else [1, 8, 16, 32]
    new_tokens = 2 if reduced else 32
    torch.manual_seed(0)
    figures: dict = {"reduced": reduced, "device": torch.cuda.get_device_name() if not reduced else "cpu"}
    print(f"gpu_check ({'reduced, CPU' if reduced else 'full'}): {figures['device']}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="halp-gpu-check-") as scratch:
        root = Path(scratch)
        model, processor, processor_path = model_and_processor(reduced, device, dtype, root)
        adapter = adapter_for(model, processor)
        layers = parse_layers("halp", adapter.num_layers)
        most = max(max(2 * b, 4 if reduced else 16) for b in batch_sizes)
        table, images = write_set(root / "data", most)
        flops, text_tokens, patches = flops_per_sample(model, adapter, table, images, min(most, 8))
        billions = sum(p.numel() for p in model.parameters()) / 1e9
        print(
            f"model ready in {time.perf_counter() - started:.0f}s: {billions:.2f}B parameters, "
            f"{text_tokens:.0f} prompt tokens and {patches:.0f} vision patches per sample, "
            f"{flops / 1e12:.2f} TFLOP per prefill"
        )

        def extract(batch_size: int, rows: int, generate: bool, name: str):
            config = ExtractConfig(
                model=str(processor_path),
                data=table,
                images=images,
                out=root / "runs" / name,
                batch_size=batch_size,
                max_new_tokens=new_tokens,
                generate=generate,
                device=device,
                dtype=str(dtype).removeprefix("torch."),
                limit=rows,
                progress=False,
                workers=args.workers,
                preloaded=(model, processor),
            )
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            return run_extraction(config)

        extract(1, 2, True, "warm-up")  # kernels, allocator, the workers' forkserver
        settings: list[Setting] = []
        for batch_size in batch_sizes:
            rows = max(2 * batch_size, 4 if reduced else 16)
            for generate in (True, False):
                mode = f"{new_tokens} new tokens" if generate else "--no-generate"
                summary = extract(batch_size, rows, generate, f"b{batch_size}-{'gen' if generate else 'prefill'}")
                stages = summary.stages
                rate = summary.processed / stages.wall if stages.wall else 0.0
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
                setting = Setting(
                    batch_size,
                    mode,
                    summary.processed,
                    rate,
                    stages.stall_fraction,
                    stages.steady_stall_fraction,
                    stages.padding_fraction,
                    peak,
                )
                if not generate:
                    setting.tflops = rate * flops / 1e12
                    setting.fraction_of_peak = setting.tflops / args.peak_tflops
                settings.append(setting)
                peak_text = f"{setting.fraction_of_peak:.1%} of bf16 peak, " if setting.fraction_of_peak else ""
                print(
                    f"halp batch {batch_size:>2} {mode:>14}: {rate:8.2f} samples/s, {peak_text}"
                    f"stall {setting.stall_fraction:.1%} (after the first batch {setting.steady_stall_fraction:.1%}), "
                    f"padding {setting.padding_fraction:.1%}, peak memory {peak:.1f} GiB"
                )
        figures["halp"] = [asdict(setting) for setting in settings]

        seeds_rows = read_samples(table)[: 2 if reduced else 16]
        seeds_images = [load_image(images, s.image_id) for s in seeds_rows]
        seeds_method(model, processor, adapter, seeds_images[:1], ["warm up"], layers, 2)
        start = time.perf_counter()
        seeds_method(model, processor, adapter, seeds_images, [s.question for s in seeds_rows], layers, new_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        seeds_rate = len(seeds_rows) / (time.perf_counter() - start)
        best = max(s.samples_per_second for s in settings if s.mode != "--no-generate")
        figures["seeds_samples_per_second"] = seeds_rate
        figures["ratio_to_seeds"] = best / seeds_rate
        print(
            f"seeds' method ({new_tokens} new tokens, batch 1): {seeds_rate:.2f} samples/s; "
            f"halp's best with generation / seeds = {best / seeds_rate:.1f}x (goal >= 10x)"
        )

    with tempfile.TemporaryDirectory(prefix="halp-gpu-check-probes-") as scratch:
        seconds, cell = probe_cell(reduced, device, Path(scratch))
    figures["probe_cell_seconds"] = seconds
    figures["probe_cell"] = cell
    shape = "300 x 32, reduced" if reduced else "10,000 x 3,584"
    print(
        f"probe cell ({shape}, both, MLP on {device}): {seconds:.0f}s with the data written (goal < 60s); "
        f"matmul rate {cell['matmul_gflops']:.0f} GFLOP/s"
    )
    for kind, total in cell["totals"].items():
        print(
            f"  {kind}: {total['fits']} fits in {total['seconds']:.1f}s = {total['seconds_per_fit']:.2f}s per fit, "
            f"{total['gflops']:.0f} GFLOP/s = {total['fraction_of_matmul_rate']:.0%} of the matmul rate (goal >= 50%)"
        )
    figures["seconds"] = time.perf_counter() - started
    print(f"gpu_check done in {figures['seconds']:.0f}s (goal < 480s on one H200)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
