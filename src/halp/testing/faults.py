"""Crash-consistency harness: SIGKILL a real `halp extract` process at random moments, resume, repeat.

Used by the test suite (a few trials) and `benchmarks/fault_injection.py` (many trials, figures for the docs).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from halp.extract import ExtractConfig
from halp.store import RunStore, read_strings
from halp.testing.runs import cli_args


@dataclass
class FaultReport:
    trials: int = 0
    kills: int = 0
    committed_rows_lost: int = 0
    duplicate_rows: int = 0
    finished_during_trials: bool = False
    committed_after_each_kill: list[int] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)


def kill_and_resume(
    config: ExtractConfig, trials: int, seed: int = 0, max_delay: float = 1.5, pause: float = 0.05
) -> FaultReport:
    """Start `halp extract` with `config` `trials` times, SIGKILL each at a random moment, check nothing committed
    is lost or duplicated. The caller finishes the run afterwards and compares it with an uninterrupted one."""
    run_dir = Path(config.out)
    extract_args = cli_args(config)
    rng = random.Random(seed)
    store = RunStore(run_dir)
    report = FaultReport()
    env = {**os.environ, "HALP_COMMIT_PAUSE": str(pause)}
    for _ in range(trials):
        before = store.committed_ids() if run_dir.exists() else set()
        report.trials += 1
        with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
            process = subprocess.Popen(
                [sys.executable, "-m", "halp.testing.slow_cli", "extract", *extract_args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            # Wait until the model is loaded and writing (a new part appears), then kill at a random moment
            # within max_delay: inside a commit, between commits, or during the final assembly.
            deadline = time.monotonic() + 120
            start_parts = len(store.part_paths()) if run_dir.exists() else 0
            while process.poll() is None and time.monotonic() < deadline:
                if run_dir.exists() and len(store.part_paths()) > start_parts:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, max_delay))
            if process.poll() is None:
                process.kill()
                report.kills += 1
            process.wait()
            if process.returncode not in (0, -9):
                log.seek(0)
                report.unexpected_exits.append(f"exit {process.returncode}: {log.read()[-2000:]}")
        after = store.committed_ids()
        report.committed_rows_lost += len(before - after)
        ids = []
        for path in store.part_paths():
            with h5py.File(path, "r") as handle:
                ids += read_strings(handle["question_id"])
        report.duplicate_rows += len(ids) - len(set(ids))
        report.committed_after_each_kill.append(len(after))
        if store.features_path.exists() and not store.part_paths():
            report.finished_during_trials = True
            break
    return report


#: The first bytes of an image file that makes `crash_decoder_on_marker`'s decoder crash its process.
CRASH_MARKER = b"HALP-CRASH-DECODER"


def crash_decoder_on_marker() -> None:
    """Input-worker fault injection (`ExtractConfig.worker_init="halp.testing.faults:crash_decoder_on_marker"`):
    the worker's image reading aborts the whole process (as a native decoder crash does, no Python exception)
    on a file starting with CRASH_MARKER."""
    from halp import data
    from halp.data import resolve_image_path

    real_read = data.read_image  # what FolderImages reads each image file with

    def read(images_dir: str | Path, image_id: str, *args: Any, **kwargs: Any) -> Any:
        path = resolve_image_path(images_dir, image_id)
        if path.is_file() and path.read_bytes()[: len(CRASH_MARKER)] == CRASH_MARKER:
            os.abort()
        return real_read(images_dir, image_id, *args, **kwargs)

    data.read_image = read



#: The first bytes of an image file on which `hang_decoder_on_marker`'s decoder never returns.
HANG_MARKER = b"HALP-HANG-DECODER"


def release_path(image: str | Path) -> Path:
    """The file whose creation lets a decoder hung by `hang_decoder_on_marker` on `image` return (tests that must
    not leave a process behind when the deadline they check is missing)."""
    image = Path(image)
    return image.with_name(image.name + ".release")


def hang_decoder_on_marker() -> None:
    """Input-worker fault injection: the worker's image reading never returns on a file starting with HANG_MARKER
    (as a decoder stuck in a loop, or a read from a hung network file system) until `release_path` appears."""
    from halp import data
    from halp.data import resolve_image_path

    real_read = data.read_image

    def read(images_dir: str | Path, image_id: str, *args: Any, **kwargs: Any) -> Any:
        path = resolve_image_path(images_dir, image_id)
        if path.is_file() and path.read_bytes()[: len(HANG_MARKER)] == HANG_MARKER:
            while not release_path(path).exists():
                time.sleep(0.05)
        return real_read(images_dir, image_id, *args, **kwargs)

    data.read_image = read


def hang_in_worker() -> None:
    """Input-worker fault injection: the worker never becomes ready and ignores SIGTERM (as a worker stuck in
    native code that answers no signal would). Tests see the ignored SIGTERM in /proc/PID/status (SigIgn)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)


def corrupt_parquet_column(path: str | Path, column: str, row_group: int) -> None:
    """Overwrite one column chunk of a Parquet file (its pages, dictionary page included) with 0xFF bytes, in place:
    the page header no longer deserializes, as on a disk or a download that damaged those bytes. The footer and the
    other column chunks stay intact, so the file opens and the other columns read."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    group = metadata.row_group(row_group)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\xff" * chunk.total_compressed_size)


def damaged_copies(path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Three damaged versions of a file, under its own name in out_dir/<kind>/: `cut` (its first half, as a copy
    or a download that stopped), `empty` (0 bytes) and `garbage` (the same number of bytes that are no format)."""
    path, out_dir = Path(path), Path(out_dir)
    data = path.read_bytes()
    contents = {
        "cut": data[: len(data) // 2],
        "empty": b"",
        "garbage": bytes(random.Random(len(data)).getrandbits(8) for _ in range(max(len(data), 64))),
    }
    copies = {}
    for kind, content in contents.items():
        target = out_dir / kind / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        copies[kind] = target
    return copies
