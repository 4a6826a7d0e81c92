"""`halp serve` under load, what scoring costs against plain generation, and the decode that `abstain` saves.

    python benchmarks/bench_serve.py --clients 4 --requests 8 --max-batch 4 --target-coverage 0.7

1. Service: starts `halp serve RUN` (a real process on loopback, policy annotate), then `--clients` threads each
   send `--requests` chat completions one after another (images as data: URLs, the run's questions in turn),
   stopping early at `--time-limit` seconds. Prints throughput, p50/p95 latency, errors (must be 0) and the batch
   sizes the server formed (from its /metrics).
2. Overhead of scoring: in this process, the same rows in the same batches of `--max-batch`, alternately through
   plain greedy `generate` (encode + generate, no hooks, no probe) and through the service's engine under annotate
   (encode + prefill with hooks + risk + decoding from the same cache), `--repeats` times; prints the median
   seconds per batch of each and the overhead (goal: under 5 %).
3. Abstain at the chosen coverage: the same batches under abstain; prints the requests abstained, the decode tokens
   saved (max_tokens per abstained request, as /metrics counts them) and the engine's seconds against annotate.

Without `--run`, a small `halp world` run is made first (halp.testing.serving: the shipped world model, a new
study set, exact labels, logistic probes). Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from halp.data import load_image, read_samples
from halp.serve.engine import Engine, Job
from halp.serve.policy import Policy
from halp.serve.settings import ServeSettings
from halp.testing.serving import SERVED_FEATURES, make_world_run


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load_line() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def service_phase(run: Path, images: Path, table: Path, args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable, "-m", "halp", "serve", str(run), "--port", "0", "--device", "cpu", "--name", "bench",
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(max(64, args.clients * 2)), "--target-coverage", str(args.target_coverage),
    ]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"halp serve did not start: {server.stderr.read()[-2000:]}")
        print(f"server ready in {time.perf_counter() - started:.1f}s at {url}")
        samples = read_samples(table)
        bodies = [
            {
                "model": "bench", "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                        (images / sample.image_id).read_bytes()).decode()}},
                    {"type": "text", "text": sample.question},
                ]}],
            }
            for sample in samples
        ]  # fmt: skip
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + args.time_limit

        def client(index: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                for number in range(args.requests):
                    if time.perf_counter() > deadline:
                        return
                    body = bodies[(index * args.requests + number) % len(bodies)]
                    start = time.perf_counter()
                    reply = http.post("/chat/completions", json=body)
                    elapsed = time.perf_counter() - start
                    with lock:
                        if reply.status_code == 200 and "halp" in reply.json():
                            latencies.append(elapsed)
                        else:
                            errors.append(f"{reply.status_code} {reply.text[:200]}")

        print(f"load average before: {load_line()}")
        begin = time.perf_counter()
        threads = [threading.Thread(target=client, args=(index,)) for index in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - begin
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=60).text
        batches = float(re.search(r"^halp_serve_batch_size_count (\S+)$", metrics, re.M).group(1))
        rows = float(re.search(r"^halp_serve_batch_size_sum (\S+)$", metrics, re.M).group(1))
        print(f"load average after:  {load_line()}")
        print(
            f"service: {args.clients} clients x {args.requests} requests: {len(latencies)} answered, "
            f"{len(errors)} errors in {wall:.1f}s -> {len(latencies) / wall:.2f} requests/s; latency p50 "
            f"{percentile(latencies, 50):.3f}s p95 {percentile(latencies, 95):.3f}s; {batches:.0f} batches, "
            f"{rows / batches if batches else float('nan'):.2f} rows per batch"
        )
        for error in errors[:5]:
            print("  error:", error)
    finally:
        server.terminate()
        server.wait(timeout=120)


def engine_phase(run: Path, images: Path, table: Path, args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)  # idle intra-op threads spin on a shared machine; both sides get the same
    engine = Engine.load(ServeSettings(run, device="cpu", target_coverage=args.target_coverage))
    threshold = engine.policy.threshold
    print(
        f"engine: {engine.describe()['feature']} ({engine.describe()['probe']}), threshold {threshold:.4g} at "
        f"out-of-fold coverage {engine.choice.coverage:.3f} (expected error among the answered "
        f"{engine.choice.expected_error:.3f}); torch threads {torch.get_num_threads()}"
    )
    samples = read_samples(table)[: args.rows]
    images_of = [load_image(images, sample.image_id) for sample in samples]
    batches = [list(range(start, min(start + args.max_batch, len(samples))))
               for start in range(0, len(samples), args.max_batch)]  # fmt: skip
    model, extractor = engine.model, engine.extractor

    def plain(batch: list[int]) -> None:
        inputs = extractor.adapter.encode([images_of[i] for i in batch], [samples[i].question for i in batch])
        with torch.inference_mode():
            model.generate(**extractor.device_inputs(inputs), max_new_tokens=args.max_tokens,
                           **extractor.greedy_settings())  # fmt: skip

    def served(batch: list[int], mode: str) -> list[Job]:
        engine.policy = Policy(mode, threshold, engine.policy.refusal)
        jobs = [Job(images_of[i], samples[i].question, args.max_tokens) for i in batch]
        engine.run_batch(jobs)
        return jobs

    for batch in batches[:1]:  # warm-up: allocator, kernels, lazy imports
        plain(batch)
        served(batch, "annotate")
    names = ("plain", "annotate", "abstain")
    # seconds[name][b]: the runs of batch b; the minimum over repeats is the batch's cost without the interference
    # of other processes (a shared machine only ever adds time), the median what a busy machine gives.
    seconds: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in names}
    decided: dict[str, list[Job]] = {"annotate": [], "abstain": []}
    for repeat in range(args.repeats):
        for index, batch in enumerate(batches):
            for name in names:  # interleaved: drift of a shared machine hits all alike
                start = time.perf_counter()
                jobs = plain(batch) if name == "plain" else served(batch, name)
                seconds[name][index].append(time.perf_counter() - start)
                if name != "plain" and repeat == 0:
                    decided[name] += jobs
    best = {name: sum(min(runs) for runs in seconds[name]) for name in names}
    typical = {name: statistics.median([run for runs in seconds[name] for run in runs]) for name in names}
    print(
        f"overhead of scoring: {len(batches)} batches of <= {args.max_batch} rows x {args.repeats} repeats, "
        f"max_tokens {args.max_tokens}: sum over batches of the fastest run: plain generate {best['plain']:.3f}s, "
        f"halp serve engine (annotate) {best['annotate']:.3f}s -> overhead "
        f"{100 * (best['annotate'] / best['plain'] - 1):+.1f} %; median per batch {typical['plain'] * 1000:.1f} ms vs "
        f"{typical['annotate'] * 1000:.1f} ms ({100 * (typical['annotate'] / typical['plain'] - 1):+.1f} %)"
    )
    abstained = [job for job in decided["abstain"] if job.outcome.decision == "abstained"]
    accounted = sum(job.outcome.decode_tokens_saved for job in abstained)
    # Decode steps actually run: every answer token after the prefill's first one.
    decoded = {name: sum(max(job.outcome.completion_tokens - 1, 0) for job in jobs) for name, jobs in decided.items()}
    print(
        f"abstain at coverage {engine.choice.coverage:.3f}: {len(abstained)} of {len(samples)} requests abstained, "
        f"{accounted} decode tokens saved as /metrics counts them (max_tokens {args.max_tokens} each); decode tokens "
        f"run: annotate {decoded['annotate']}, abstain {decoded['abstain']}; engine time (sum of fastest runs) "
        f"{best['abstain']:.3f}s vs annotate {best['annotate']:.3f}s "
        f"({100 * (best['abstain'] / best['annotate'] - 1):+.1f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="A halp world run (its data/ beside it); default: make one")
    parser.add_argument("--images-count", type=int, default=24, help="Study-set images of the run made (2 q. each)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="Requests per client")
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds after which clients stop")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--target-coverage", type=float, default=0.7)
    parser.add_argument("--rows", type=int, default=32, help="Rows of the overhead and abstain measurements")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of phases 2-3 (0: torch's default)")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; load average {load_line()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is None:
            start = time.perf_counter()
            made = make_world_run(Path(tmp) / "world", n_images=args.images_count, features=SERVED_FEATURES[:1])
            run, images, table = made.run_dir, made.images, made.table
            print(f"made a halp world run of {2 * args.images_count} questions in {time.perf_counter() - start:.0f}s")
        else:
            run = args.run
            images, table = run.parent / "data" / "images", run.parent / "data" / "vqa.csv"
        service_phase(run, images, table, args)
        engine_phase(run, images, table, args)


if __name__ == "__main__":
    main()
