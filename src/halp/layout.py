"""The run directory: every file and folder name halp writes under RUN_DIR, and the one way to write them.

Layout (what writes it)::

    RUN_DIR/run.json             halp extract: the run's identity (model, layers, dtype, ..., num_shards)
    RUN_DIR/features.h5          halp extract: one row per sample (see halp.store)
    RUN_DIR/extract.log          halp extract: the log
    RUN_DIR/errors.jsonl         halp extract: rows that failed (empty when none)
    RUN_DIR/parts/, shards/, ray/  halp extract: committed batches while the run is in progress
    RUN_DIR/labels.csv           halp label
    RUN_DIR/reviews.jsonl        halp review: manual decisions, appended (under .reviews.jsonl.lock)
    RUN_DIR/probes/              halp probe: results.csv, results.json, predictions.csv, groups.csv, models/
    RUN_DIR/report/              halp report: report.html and PNGs
    RUN_DIR/risk/                halp predict: <table name>.csv

Every file is written through `atomic_write` / `atomic_path`: a temporary name beside the target
(`.<name>.tmp-<pid>`), fsync, atomic rename, fsync of the directory. A crash leaves either the old file
or the new one, never half of one, and at most a hidden temporary that the next write replaces. A folder
written as a whole (a checkpoint, a shipped model) goes through `atomic_directory`, the same scheme for a
directory: staged under the temporary name, every file fsynced, renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

RUN_FILE = "run.json"
FEATURES_FILE = "features.h5"
LOG_FILE = "extract.log"
ERRORS_FILE = "errors.jsonl"
PARTS_DIR = "parts"
SHARDS_DIR = "shards"
RAY_DIR = "ray"
LOCK_FILE = ".lock"
DONE_FILE = "done.json"
LABELS_FILE = "labels.csv"
REVIEWS_FILE = "reviews.jsonl"
PROBES_DIR = "probes"
RESULTS_FILE = "results.csv"
PREDICTIONS_FILE = "predictions.csv"
GROUPS_FILE = "groups.csv"
RESULTS_JSON_FILE = "results.json"
PROBE_MODELS_DIR = "models"
REPORT_DIR = "report"
#: The report page in REPORT_DIR (or in `halp report --out`).
REPORT_PAGE = "report.html"
RISK_DIR = "risk"
#: A committed batch: `parts/part-000042.h5`, numbered in commit order per writer.
PART_RE = re.compile(r"^part-(\d{6})\.h5$")


def part_name(number: int) -> str:
    return f"part-{number:06d}.h5"


def part_number(path: str | Path) -> int | None:
    """The number of a part file's name, None for any other name."""
    match = PART_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def run_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def features_path(run_dir: str | Path) -> Path:
    """Where features.h5 is or will be (no check)."""
    return Path(run_dir) / FEATURES_FILE


def committed_part_files(run_dir: str | Path) -> list[Path]:
    """Parts committed by any writer of an unfinished run (single process, shards, Ray workers)."""
    root = Path(run_dir)
    pattern = f"{PARTS_DIR}/part-*.h5"
    found = [*root.glob(pattern), *root.glob(f"{SHARDS_DIR}/*/{pattern}"), *root.glob(f"{RAY_DIR}/*/{pattern}")]
    return sorted(path for path in found if part_number(path) is not None)


def features_file(run: str | Path) -> Path:
    """The features.h5 of a finished run, given its directory or the file itself; a clear error otherwise."""
    from halp.errors import RunNotFoundError
    from halp.userfiles import check_user_file

    path = Path(run)
    if path.is_file():
        return path
    if features_path(path).is_file():
        return features_path(path)
    if not path.exists():
        raise RunNotFoundError(f"{path} does not exist (expected a run directory holding {FEATURES_FILE})")
    for candidate in (path, features_path(path)):
        if candidate.exists() and not candidate.is_dir():  # not a regular file: a FIFO, socket or device
            check_user_file(candidate, "run file", RunNotFoundError)
    parts = committed_part_files(path)
    if parts:
        raise RunNotFoundError(
            f"{path} is an unfinished run ({len(parts)} committed part(s)); rerun `halp extract` to finish it"
        )
    raise RunNotFoundError(f"no {FEATURES_FILE} in {path}")


def errors_file(run_dir: str | Path, shard: str | None = None) -> Path:
    """The failed rows of the run's last pass, or of one shard's (`shard`: its name, `0-of-2`)."""
    return (shard_dir(run_dir, shard) if shard else Path(run_dir)) / ERRORS_FILE


def shard_dir(run_dir: str | Path, shard: str) -> Path:
    """The directory a shard of a sharded run writes: RUN_DIR/shards/<i>-of-<k>."""
    return Path(run_dir) / SHARDS_DIR / shard


def labels_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / LABELS_FILE


def reviews_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / REVIEWS_FILE


def probes_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / PROBES_DIR


def probe_file(run_dir: str | Path, name: str) -> Path:
    """A file of `halp probe`'s output (RESULTS_FILE, RESULTS_JSON_FILE, PREDICTIONS_FILE, GROUPS_FILE)."""
    return probes_dir(run_dir) / name


def report_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_DIR


def risk_file(run_dir: str | Path, table: str | Path) -> Path:
    """Where `halp predict` writes the risk of a table by default: RUN_DIR/risk/<table stem>.csv."""
    return Path(run_dir) / RISK_DIR / f"{Path(table).stem}.csv"


def lock_file_of(path: str | Path) -> Path:
    """The lock file of an append-only log several processes write: hidden, beside it (`.reviews.jsonl.lock`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def temporary_path(path: str | Path) -> Path:
    """The one temporary-name scheme: hidden, beside the target (same file system), owned by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (for writers that open files themselves, like h5py or
    matplotlib); on success it is fsynced and renamed over `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
                 ) -> Iterator[IO]:
    """Open a temporary file for writing `path`; on success fsync and rename it over `path`."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(
        tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline
    ) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def append_line_durably(path: str | Path, line: str) -> None:
    """Append one line and fsync it (append-only logs such as reviews.jsonl): a crash loses at most this line,
    and a torn last line is recognisable (no trailing newline) by the reader."""
    if "\n" in line:
        raise ValueError("append_line_durably takes one line without newlines")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging directory to fill for `path` (hidden, beside it, `temporary_path`'s name); on success every
    file in it is fsynced and it is renamed to `path`, on failure removed. An existing `path` is replaced only with
    `replace` (its old content is removed just before the rename); otherwise it is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(path)
    shutil.rmtree(staging, ignore_errors=True)  # what a dead process of the same pid left
    staging.mkdir()
    try:
        yield staging
        for file in sorted(staging.rglob("*")):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        for folder in sorted({file.parent for file in staging.rglob("*")} | {staging}):
            fsync_dir(folder)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists; it is not replaced")
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)
