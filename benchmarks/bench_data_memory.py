"""Peak memory of reading a table that embeds its images, as `halp extract` reads it: 1,000 vs 100,000 rows.

For each size a Parquet file is written the way `datasets` writes one (the Image struct {bytes, path}, row groups
of 100 rows, `datasets`' schema metadata) and, with --formats, a `save_to_disk` folder. A fresh process then does
what `halp extract` does with the table before and around the model: opens it with `halp.data.open_table` (text
columns up front), plans the run as a first run does (`halp.extract.plan_resume` against an empty run directory:
every row's content digest, its image bytes hashed, and the rows to do), and loads every image of the rows to do,
a window of 128 rows at a time (extraction's window: batch size 8 x 16 batches), decoding and dropping them.
Printed: rows, file size, seconds, the RSS after importing halp's extraction modules (torch included: the floor of
any `halp extract` process), the peak RSS (ru_maxrss) after opening the table, after planning and at the end, and
the peak anonymous RSS (RssAnon, sampled after each step and window): a memory-mapped Arrow folder's pages count
in RSS once touched, but they are file-backed and the kernel reclaims them under pressure.

    python benchmarks/bench_data_memory.py                       # 1,000 and 100,000 rows, Parquet
    python benchmarks/bench_data_memory.py --sizes 1000 10000 --formats parquet saved
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOW = 128


def make_image(seed: int, side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, side, dtype=np.float32)
    pixels = (base[None, :, None] + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def write_parquet(path: Path, rows: int, side: int) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    schema = features.arrow_schema
    images = [make_image(seed, side) for seed in range(50)]  # 50 distinct images, reused: writing stays fast
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100):
            stop = min(rows, start + 100)
            writer.write_table(
                pa.table(
                    {
                        "question_id": [f"q{i}" for i in range(start, stop)],
                        "question": [f"Is there a dog in image {i}?" for i in range(start, stop)],
                        "answer": ["yes" if i % 2 else "no" for i in range(start, stop)],
                        "category": [f"c{i % 7}" for i in range(start, stop)],
                        "image": [{"bytes": images[i % 50], "path": f"{i}.jpg"} for i in range(start, stop)],
                    },
                    schema=schema,
                )
            )


def anonymous_rss_mib() -> float:
    """This process's anonymous resident memory (Linux): RSS without file-backed pages such as a memory-mapped
    Arrow file's, which the kernel can drop and reread."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(data: str) -> dict[str, float]:
    """In this process: open the table, plan a first run, then load every image to do a window at a time."""
    from halp.data import open_table
    from halp.extract import plan_resume
    from halp.store import RunStore

    imported_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    table = open_table(data)
    opened_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_anonymous = anonymous_rss_mib()
    with tempfile.TemporaryDirectory(prefix="halp-bench-run-") as run_dir:
        plan = plan_resume(RunStore(Path(run_dir) / "run"), table.samples, table.images)
    planned_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_anonymous = max(peak_anonymous, anonymous_rss_mib())
    pixels = 0
    for begin in range(0, len(plan.todo), WINDOW):
        window = list(plan.todo[begin : begin + WINDOW])
        for image in table.images.load(window):
            if isinstance(image, Exception):
                raise image
            pixels += image.width * image.height
        peak_anonymous = max(peak_anonymous, anonymous_rss_mib())
    return {
        "rows": len(table.samples),
        "seconds": time.perf_counter() - start,
        "peak_rss_mib_after_imports": imported_rss,
        "peak_rss_mib_after_open": opened_rss,
        "peak_rss_mib_after_plan": planned_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anonymous_mib": peak_anonymous,
        "pixels": pixels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--formats", nargs="+", default=["parquet"], choices=["parquet", "saved"])
    parser.add_argument("--side", type=int, default=128, help="Image side in pixels (JPEG).")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="halp-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"{'format':<8} {'rows':>8} {'file MiB':>9} {'seconds':>8} {'RSS imports':>12} {'RSS open MiB':>13} "
        f"{'RSS plan MiB':>13} "
        f"{'peak RSS MiB':>13} {'peak anon MiB':>14}"
    )
    for rows in args.sizes:
        parquet = workdir / f"table-{rows}.parquet"
        if not parquet.exists():
            write_parquet(parquet, rows, args.side)
        for fmt in args.formats:
            target = parquet
            if fmt == "saved":
                import datasets

                target = workdir / f"saved-{rows}"
                if not target.exists():
                    datasets.Dataset.from_parquet(str(parquet), cache_dir=str(workdir / "cache")).save_to_disk(
                        str(target)
                    )
            size = sum(p.stat().st_size for p in ([target] if target.is_file() else target.rglob("*")))
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(target)], check=True, capture_output=True, text=True
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(
                f"{fmt:<8} {result['rows']:>8} {size / 2**20:>9.1f} {result['seconds']:>8.1f} "
                f"{result['peak_rss_mib_after_imports']:>12.0f} "
                f"{result['peak_rss_mib_after_open']:>13.0f} {result['peak_rss_mib_after_plan']:>13.0f} "
                f"{result['peak_rss_mib']:>13.0f} "
                f"{result['peak_anonymous_mib']:>14.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
