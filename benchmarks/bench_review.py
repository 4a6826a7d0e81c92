"""How fast `halp review` answers: start-up on a large run, and the time from a key press's request to a saved decision.

    python benchmarks/bench_review.py --rows 20000 --decisions 200

Builds a run of `--rows` rows (answers that the rules partly label; images reused from a small synthetic set),
starts a real `halp review` process, and times over HTTP: the page's first queue request, then `--decisions`
decisions (each one a POST that appends and fsyncs a line of reviews.jsonl, then the next row's GET, as the page
does). Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from halp.data import Sample
from halp.store import rows_for, write_rows
from halp.testing import make_vqa_set

ANSWERS = [
    ("Is there a red shape in the image?", "yes", "Yes, there is."),
    ("Is there a red shape in the image?", "no", "There is a reddish blob."),
    ("What color is the shape?", "blue", "It is navy."),
    ("How many shapes are there?", "1", "One."),
    ("Describe the image.", "a green shape", "A green ball on grass."),
]


def build(root: Path, rows: int) -> tuple[Path, Path]:
    _, images = make_vqa_set(root / "data", n=12)
    samples = [
        Sample(f"q{i:06d}", f"img_{i % 12:04d}.png", ANSWERS[i % 5][0], ANSWERS[i % 5][1], {"category": f"c{i % 7}"})
        for i in range(rows)
    ]
    features = {"vision_only": np.zeros((rows, 8), dtype=np.float32)}
    run = root / "run"
    run.mkdir()
    answers = [ANSWERS[i % 5][2] for i in range(rows)]
    write_rows(run / "features.h5", rows_for(samples, answers, features), {"model_id": "bench", "generated": True})
    return run, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--decisions", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, images = build(Path(tmp), args.rows)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "halp", "review", str(run), "--images", str(images), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        try:
            url = server.stdout.readline().strip()
            ready = time.perf_counter() - started
            # http.client sends a small request in one packet, as browsers do (httpx splits headers and body,
            # and the split costs a delayed ACK that is the client's, not the server's).
            client = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)

            def call(method: str, path: str, body: dict | None = None) -> dict:
                payload = json.dumps(body).encode() if body is not None else None
                client.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
                response = client.getresponse()
                content = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{method} {path}: {response.status} {content[:200]!r}")
                return json.loads(content)

            began = time.perf_counter()
            indices = call("GET", "/api/queue")["indices"]
            first_queue = time.perf_counter() - began
            latencies = []
            for n in range(min(args.decisions, len(indices) - 1)):
                began = time.perf_counter()
                call("POST", "/api/decide", {"index": indices[n], "label": "correct"})
                call("GET", f"/api/item/{indices[n + 1]}")
                latencies.append((time.perf_counter() - began) * 1000)
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"rows {args.rows}, unknown queue {len(indices)}")
    print(f"server ready (process start, rules on every row, port bound): {ready:.2f} s")
    print(f"first queue request: {first_queue * 1000:.0f} ms")
    median = statistics.median(latencies)
    print(
        f"decision saved (fsynced) + next row fetched, {len(latencies)} decisions: median {median:.1f} ms, "
        f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
