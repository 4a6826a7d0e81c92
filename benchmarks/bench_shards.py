"""Throughput of sharded extraction: 1 vs 2 worker processes, and single-GPU throughput vs batch size.

Processes (default): real `halp extract` runs on a small random Qwen2.5-VL (hidden 256, 8 layers), the
same table each time, timed from launch until `features.h5` is assembled:

    1 process,  all cores          halp extract ...                          OMP_NUM_THREADS=<cores>
    1 process,  cores / 2 threads  (what one of two shards gets)            OMP_NUM_THREADS=<cores/2>
    2 processes, cores / 2 each    halp extract --num-shards 2 --shard-index {0,1}   (or torchrun)

It prints, per setting, end-to-end samples/s (rows / wall time, model loading included) and loop
samples/s (rows / the slowest process's extraction loop, as each process reports it), and the ratio
of 2 processes to 1. The machine's load average is printed too: other work on it skews the figures.

    python benchmarks/bench_shards.py                                # 96 samples, batch 8, best of 2
    python benchmarks/bench_shards.py --launcher torchrun            # the 2 processes via torchrun

Batch sweep (`--sweep`): in-process, one model, samples/s at batch sizes 1..64, to show where a single
card saturates; with --preset 7b (full Qwen2.5-VL-7B shapes, random weights, no download):

    python benchmarks/bench_shards.py --sweep --preset 7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from halp.testing import build_checkpoint, make_vqa_set

SMALL = dict(hidden_size=256, num_layers=8, vision_dim=128, vision_depth=4)
_RATE = re.compile(r"processed \d+ samples in ([0-9.]+)s")


def build_small(workdir: Path) -> Path:
    return build_checkpoint("qwen2_5_vl", workdir / "small", **SMALL)


def _extract_args(
    checkpoint: Path, table: Path, images: Path, out: Path, batch_size: int, new_tokens: int
) -> list[str]:
    return [
        "extract",
        "--model",
        str(checkpoint),
        "--data",
        str(table),
        "--images",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        "--max-new-tokens",
        str(new_tokens),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]


def _loop_seconds(run_dir: Path) -> float:
    """The slowest process's extraction loop, from the run's logs ("processed N samples in S s")."""
    logs = [run_dir / "extract.log", *run_dir.glob("shards/*/extract.log")]
    times = [float(match) for path in logs if path.exists() for match in _RATE.findall(path.read_text())]
    if not times:
        raise RuntimeError(f"no extraction timing in the logs of {run_dir}")
    return max(times)


def run_setting(processes: int, threads: int, launcher: str, args: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds until features.h5 exists, and the slowest extraction loop in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    halp = [sys.executable, "-m", "halp"]
    start = time.perf_counter()
    if processes == 1:
        jobs = [subprocess.Popen([*halp, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    elif launcher == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        jobs = [
            subprocess.Popen(
                [*torchrun, "-m", "halp", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        ]
    else:
        jobs = [
            subprocess.Popen(
                [*halp, *args, "--num-shards", str(processes), "--shard-index", str(index)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for index in range(processes)
        ]
    for job in jobs:
        _, err = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(f"halp extract exited {job.returncode}: {err.decode()[-2000:]}")
    wall = time.perf_counter() - start
    if not (out / "features.h5").exists():
        raise RuntimeError(f"{out}/features.h5 was not assembled")
    return wall, _loop_seconds(out)


def bench_processes(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    settings = [(1, cores, f"1 process x {cores} threads"), (1, half, f"1 process x {half} threads")]
    settings.append((2, half, f"2 processes x {half} threads ({args.launcher})"))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = build_small(workdir)
        table, images = make_vqa_set(workdir / "data", n=args.samples, seed=0)
        print(
            f"samples={args.samples} batch_size={args.batch_size} max_new_tokens={args.max_new_tokens} "
            f"cores={cores} repeats={args.repeats} torch={torch.__version__} "
            f"load average before={os.getloadavg()[0]:.2f}"
        )
        # Untimed warm-up: the first process pays for cold file caches (torch, transformers, the checkpoint).
        warm = _extract_args(checkpoint, table, images, workdir / "warm-up", args.batch_size, args.max_new_tokens)
        run_setting(1, cores, "flags", [*warm, "--limit", "4"], workdir / "warm-up")
        best: dict[str, tuple[float, float]] = {}
        for repeat in range(args.repeats):
            for processes, threads, label in settings:
                out = workdir / f"run-{repeat}-{processes}-{threads}"
                extract = _extract_args(checkpoint, table, images, out, args.batch_size, args.max_new_tokens)
                wall, loop = run_setting(processes, threads, args.launcher, extract, out)
                previous = best.get(label, (float("inf"), float("inf")))
                best[label] = (min(previous[0], wall), min(previous[1], loop))
        for label, (wall, loop) in best.items():
            print(
                f"{label:>34}: end-to-end {args.samples / wall:7.2f} samples/s ({wall:6.1f}s) | "
                f"loop {args.samples / loop:7.2f} samples/s ({loop:6.1f}s)"
            )
        one, two = best[settings[0][2]], best[settings[2][2]]
        print(
            f"2 processes / 1 process (all cores): end-to-end {one[0] / two[0]:.2f}x, loop {one[1] / two[1]:.2f}x; "
            f"load average after={os.getloadavg()[0]:.2f}"
        )


def bench_sweep(args: argparse.Namespace) -> None:
    """Single-device samples/s at batch sizes 1..64 (prefill only and with an answer)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_extract import load, make_images  # the 7b preset: full Qwen2.5-VL-7B shapes, random weights

    from halp.capture import FeatureExtractor, parse_layers
    from halp.models import adapter_for
    from halp.testing.vqa import QUESTIONS

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(args.preset, args.device, dtype, Path(tmp))
        adapter = adapter_for(model, processor)
        extractor = FeatureExtractor(adapter, parse_layers("halp", adapter.num_layers))
        sizes = [size for size in (1, 2, 4, 8, 16, 32, 64) if size <= args.max_batch]
        samples = max(args.samples, max(sizes))
        images = make_images(samples)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(samples)]
        print(f"preset={args.preset} device={args.device} dtype={args.dtype} samples={samples}")
        extractor(images[:2], questions[:2], max_new_tokens=2)  # warm-up
        for new_tokens in (0, args.max_new_tokens):
            for size in sizes:
                try:
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for first in range(0, samples, size):
                        extractor(images[first : first + size], questions[first : first + size], new_tokens)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    rate = samples / (time.perf_counter() - start)
                except torch.OutOfMemoryError:
                    print(f"max_new_tokens={new_tokens:3d} batch={size:3d}: out of memory")
                    torch.cuda.empty_cache()
                    break
                on_gpu = torch.cuda.is_available()
                memory = f" peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else ""
                print(f"max_new_tokens={new_tokens:3d} batch={size:3d}: {rate:8.2f} samples/s{memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each setting")
    parser.add_argument("--launcher", choices=["flags", "torchrun"], default="flags")
    parser.add_argument("--sweep", action="store_true", help="batch-size sweep in one process instead")
    parser.add_argument("--preset", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    if args.sweep:
        bench_sweep(args)
    else:
        bench_processes(args)


if __name__ == "__main__":
    main()
