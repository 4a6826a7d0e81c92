"""The run directory and the `features.h5` contract.

While a run is in progress, each committed batch is one HDF5 part file under `parts/`, written to a
temporary name, fsynced and atomically renamed. A `kill -9` therefore loses at most the batch in
flight and never leaves a half-written part under a committed name. When every sample is done the
parts are assembled, in input-table order, into `features.h5` (again via a temporary file and an
atomic rename), and the parts are removed.

Layout of a finished run::

    RUN_DIR/run.json        what was run (model, layers, dtype, ..., num_shards); reruns must match it
    RUN_DIR/features.h5     the contract below
    RUN_DIR/extract.log     the log
    RUN_DIR/errors.jsonl    rows that failed (empty when none)

Several writers (see docs/scaling.md). A single-process run (and a Ray driver) holds `RUN_DIR/.lock`
for its whole life and commits to `RUN_DIR/parts/`. A shard `i` of `k` holds
`RUN_DIR/shards/<i>-of-<k>/.lock` for its life and commits to that directory's `parts/`; it takes
`RUN_DIR/.lock` only briefly (the "run lock"): to check the run's identity and list what is committed
when it starts, and to assemble when it finishes. Its `done.json` says that its last pass ended
(which table rows it owns, which failed); the writer that finds every shard of the layout done
assembles `features.h5` from all parts. A Ray worker commits to `RUN_DIR/ray/<worker>/parts/`.
Every parts directory has exactly one live writer, so part numbers never collide. Committed rows
are global: a shard never extracts a row committed anywhere in the run directory.

`features.h5`: 1-D UTF-8 string datasets `question_id`, `image_id`, `question`, `ground_truth`,
`answer`, `meta/<column>`; float32 (N, dim) datasets `vision_only`, `vision_projected`,
`vision_token/layer_<k>`, `vision_token_mean/layer_<k>`, `query_token/layer_<k>`; root attributes
describing the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from halp.data import Sample
from halp.errors import RunLockedError, RunMismatchError, StoreWriteError
from halp.layout import (
    DONE_FILE,
    ERRORS_FILE,
    FEATURES_FILE,
    LOCK_FILE,
    PARTS_DIR,
    RAY_DIR,
    RUN_FILE,
    SHARDS_DIR,
)

#: How long a shard waits for another shard's brief hold of the run lock (an assembly of a large run).
SYNC_TIMEOUT_S = 3600.0
STRING_FIELDS = ("question_id", "image_id", "question", "ground_truth", "answer")
STR = h5py.string_dtype("utf-8")
_PART_RE = re.compile(r"^part-(\d{6})\.h5$")

#: Settings that change the numbers; a rerun into the same directory must agree on them.
IDENTITY_KEYS = ("model", "layers", "dtype", "max_new_tokens", "prompt_format", "data")
#: Brief holders of the run lock write "<pid> brief <writer>" in the lock file; lifetime holders just "<pid>".
_BRIEF = " brief "

log = logging.getLogger(__name__)





def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in dataset[()]]


@dataclass
class Rows:
    """Rows of a part or a finished run, in memory."""

    strings: dict[str, list[str]]
    meta: dict[str, list[str]]
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.strings["question_id"])


def write_rows(path: Path, rows: Rows, attrs: dict[str, Any]) -> None:
    """Write rows to `path` atomically (temporary file, fsync, rename); on failure nothing is left behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # h5py writes through a Python file object so that a failed write (disk full, file-size limit) is a
        # plain OSError here instead of an HDF5 library state that can crash the interpreter at exit.
        with open(tmp, "w+b") as raw:
            with h5py.File(raw, "w") as handle:
                for key, value in attrs.items():
                    handle.attrs[key] = value
                for name in STRING_FIELDS:
                    _write_strings(handle, name, rows.strings[name])
                meta = handle.create_group("meta")
                for column, values in rows.meta.items():
                    _write_strings(meta, column, values)
                for name, array in rows.features.items():
                    handle.create_dataset(name, data=np.asarray(array, dtype=np.float32))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError(
            f"could not write {path}: {err}. Everything committed before is intact; "
            "free disk space or fix permissions, then rerun the same command to resume."
        ) from err


def feature_datasets(handle: h5py.File) -> list[str]:
    """Paths of the float feature datasets, in a stable order."""
    names: list[str] = []

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and item.dtype.kind == "f":
            names.append(name)

    handle.visititems(visit)
    return sorted(names, key=_feature_sort_key)


def _feature_sort_key(name: str) -> tuple[int, str, int]:
    order = ["vision_only", "vision_projected", "vision_token", "vision_token_mean", "query_token"]
    group, _, leaf = name.partition("/")
    rank = order.index(group) if group in order else len(order)
    layer = int(leaf.split("_")[-1]) if leaf.startswith("layer_") else -1
    return rank, group, layer


def read_rows(path: Path) -> Rows:
    with h5py.File(path, "r") as handle:
        strings = {name: read_strings(handle[name]) for name in STRING_FIELDS}
        meta = {column: read_strings(handle["meta"][column]) for column in handle.get("meta", {})}
        features = {name: handle[name][()] for name in feature_datasets(handle)}
    return Rows(strings, meta, features)


def concat_rows(parts: Iterable[Rows]) -> Rows:
    """Rows of several parts, one after the other."""
    parts = list(parts)
    first = parts[0]
    return Rows(
        {name: [v for part in parts for v in part.strings[name]] for name in first.strings},
        {column: [v for part in parts for v in part.meta[column]] for column in first.meta},
        {name: np.concatenate([part.features[name] for part in parts]) for name in first.features},
    )


def rows_for(samples: Sequence[Sample], answers: Sequence[str], features: dict[str, np.ndarray]) -> Rows:
    meta_columns = list(samples[0].meta) if samples else []
    return Rows(
        strings={
            "question_id": [s.question_id for s in samples],
            "image_id": [s.image_id for s in samples],
            "question": [s.question for s in samples],
            "ground_truth": [s.ground_truth for s in samples],
            "answer": list(answers),
        },
        meta={column: [s.meta.get(column, "") for s in samples] for column in meta_columns},
        features=features,
    )


def table_digest(question_ids: Sequence[str]) -> str:
    """Fingerprint of a table's rows in order: shards of one run must have read the same table."""
    digest = hashlib.sha256()
    for qid in question_ids:
        digest.update(qid.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _try_lock(path: Path) -> IO[str] | None:
    """An open handle holding an exclusive lock on `path`, or None if another open file holds it."""
    handle = open(path, "a+")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _release(handle: IO[str]) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass
class ShardAssembly:
    """What the assembly of a sharded run found: shards not done yet, or the assembled rows."""

    missing: list[str] = field(default_factory=list)
    assembled: bool = False
    num_samples: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not self.missing


class RunStore:
    """A run directory: identity, committed parts, assembly into features.h5.

    `writer` names the parts directory this object commits to: None for the single-process writer
    (RUN_DIR/parts), `shards/<i>-of-<k>` for a shard, `ray/<worker id>` for a Ray worker. Reads
    (committed ids, assembly) always cover every parts directory of the run.
    """

    def __init__(self, root: str | Path, writer: str | None = None) -> None:
        self.root = Path(root)
        self.writer = writer
        self.writer_dir = self.root / writer if writer else self.root
        self.parts_dir = self.writer_dir / PARTS_DIR

    @classmethod
    def for_shard(cls, root: str | Path, shard_name: str) -> RunStore:
        return cls(root, f"{SHARDS_DIR}/{shard_name}")

    @classmethod
    def for_ray_worker(cls, root: str | Path, worker_id: str) -> RunStore:
        return cls(root, f"{RAY_DIR}/{worker_id}")

    @property
    def features_path(self) -> Path:
        return self.root / FEATURES_FILE

    @property
    def run_path(self) -> Path:
        return self.root / RUN_FILE

    # ----- one writer ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock for this process's lifetime; the OS drops it if the process dies (no stale locks).

        The single-process writer locks RUN_DIR/.lock (the run lock); a shard or Ray worker locks its own directory.
        """
        self.writer_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.writer_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process ends or unlock()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            what = f"{self.root}" if self.writer is None else f"{self.writer} of {self.root}"
            raise RunLockedError(
                f"{what} is being written by another halp process (pid {holder.split()[0]}); "
                "wait for it to finish or stop it, then rerun"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._lock_handle = None

    @contextmanager
    def sync(self, timeout: float = SYNC_TIMEOUT_S) -> Iterator[None]:
        """Hold the run lock briefly (a shard's start and finish). The single-process writer already holds it."""
        if self.writer is None:
            yield
            return
        with self.hold_run_lock(self.writer, timeout):
            yield

    @contextmanager
    def hold_run_lock(self, holder_name: str, timeout: float = SYNC_TIMEOUT_S) -> Iterator[None]:
        """Hold the run lock briefly, as `holder_name` (a shard, `merge`).

        Waits while another shard holds it briefly; fails at once if a single-process run or a Ray driver holds it
        for its lifetime (a shard cannot join such a run: both would extract the same rows).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        deadline = time.monotonic() + timeout
        lifetime_seen: str | None = None
        while (handle := _try_lock(path)) is None:
            holder = _holder(path)
            if holder.isdigit():
                # A bare pid: a lifetime holder, unless a new brief holder has not rewritten the file yet;
                # seeing the same pid twice, half a second apart, rules that out.
                if lifetime_seen == holder:
                    raise RunLockedError(
                        f"{self.root} is being written by a single-process run or a Ray driver (pid {holder}); "
                        "a shard cannot join it. Wait for it to finish, or stop it and rerun the shards."
                    )
                lifetime_seen = holder
                time.sleep(0.5)
                continue
            lifetime_seen = None
            if time.monotonic() > deadline:
                raise RunLockedError(f"{self.root}: the run lock was held by {holder or 'another process'} too long")
            time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}{_BRIEF}{holder_name}")
            handle.flush()
            yield
        finally:
            _release(handle)

    # ----- other writers -------------------------------------------------------------------
    def writer_dirs(self) -> list[Path]:
        """Directories of shards and Ray workers, past and present."""
        found: list[Path] = []
        for group in (SHARDS_DIR, RAY_DIR):
            base = self.root / group
            if base.is_dir():
                found += sorted(path for path in base.iterdir() if path.is_dir())
        return found

    def live_writers(self) -> dict[Path, str]:
        """Directories of shards and Ray workers, other than this one, whose lock is held right now -> holder pid."""
        live = {}
        for directory in self.writer_dirs():
            if directory == self.writer_dir or not (directory / LOCK_FILE).exists():
                continue
            handle = _try_lock(directory / LOCK_FILE)
            if handle is None:
                live[directory] = (_holder(directory / LOCK_FILE).split() or ["unknown"])[0]
            else:
                _release(handle)
        return live

    def _require_no_live_writers(self, why: str) -> None:
        live = self.live_writers()
        if live:
            running = ", ".join(f"{path.relative_to(self.root)} (pid {pid})" for path, pid in live.items())
            raise RunLockedError(f"{self.root}: {why}, but {running} is still running. Wait for it or stop it.")

    # ----- identity ------------------------------------------------------------------------
    def read_identity(self) -> dict[str, Any] | None:
        if not self.run_path.exists():
            return None
        return json.loads(self.run_path.read_text())

    def _write_identity(self, identity: dict[str, Any]) -> None:
        tmp = self.run_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
        os.replace(tmp, self.run_path)

    def open(self, identity: dict[str, Any], overwrite: bool = False) -> None:
        """Create the directory, or check that an existing one was made with the same settings.

        Call with the run lock held. `identity["num_shards"]` (default 1) is the shard layout: it may change between
        runs (finish an 8-GPU run on one GPU) once no writer of the old layout is alive; committed rows are kept.
        """
        if overwrite and self.root.exists():
            self._require_no_live_writers("--overwrite would delete the files of other writers")
            for name in (FEATURES_FILE, RUN_FILE, PARTS_DIR, ERRORS_FILE, SHARDS_DIR, RAY_DIR):
                target = self.root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = self.read_identity()
        if existing is None:
            if self.features_path.exists() or self.all_part_paths():
                raise RunMismatchError(
                    f"{self.root} holds extraction data but no {RUN_FILE}; use --overwrite to start afresh"
                )
            self._write_identity(identity)
            return
        differences = [
            f"{key}: run has {existing.get(key)!r}, now {identity.get(key)!r}"
            for key in IDENTITY_KEYS
            if existing.get(key) != identity.get(key)
        ]
        if differences:
            raise RunMismatchError(
                f"{self.root} was created with other settings ({'; '.join(differences)}). "
                "Use another --out, or --overwrite to discard it."
            )
        before, now = int(existing.get("num_shards", 1)), int(identity.get("num_shards", 1))
        if before != now:
            self._require_no_live_writers(f"this run asks for {now} shard(s) where the run directory has {before}")
            for directory in self.writer_dirs():
                (directory / DONE_FILE).unlink(missing_ok=True)  # done markers belong to the old layout
            self._write_identity({**existing, "num_shards": now})
            log.info("%s: shard layout changes from %d to %d; committed rows are kept", self.root, before, now)

    # ----- parts ---------------------------------------------------------------------------
    def part_paths(self) -> list[Path]:
        """Parts committed by this writer (its own parts directory)."""
        return _parts_in(self.parts_dir)

    def all_part_paths(self) -> list[Path]:
        """Parts of every writer of the run: single-process, shards, Ray workers."""
        paths = _parts_in(self.root / PARTS_DIR)
        for directory in self.writer_dirs():
            paths += _parts_in(directory / PARTS_DIR)
        return paths

    def _is_ray_part(self, path: Path) -> bool:
        return path.is_relative_to(self.root / RAY_DIR)

    def committed_ids(self) -> set[str]:
        done: set[str] = set()
        sources = [*self.all_part_paths(), self.features_path] if self.features_path.exists() else self.all_part_paths()
        for path in sources:
            with h5py.File(path, "r") as handle:
                done.update(read_strings(handle["question_id"]))
        return done

    def reopen_finished(self) -> None:
        """Turn a finished features.h5 back into a part, so a larger rerun can extend it."""
        if self.features_path.exists():
            target = self.parts_dir / f"part-{self._next_part_number():06d}.h5"
            os.replace(self.features_path, target)
            _fsync_dir(self.parts_dir)

    def _next_part_number(self) -> int:
        numbers = [int(_PART_RE.match(path.name).group(1)) for path in self.part_paths()]
        return max(numbers, default=-1) + 1

    def commit(self, rows: Rows, attrs: dict[str, Any]) -> Path:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        path = self.parts_dir / f"part-{self._next_part_number():06d}.h5"
        write_rows(path, rows, attrs)
        return path

    def remove_assembled_parts(self) -> None:
        """Drop parts already merged into features.h5 (a kill can land between the rename and the clean-up).

        Call with the run lock held. Parts of live shards that hold rows not yet assembled are left alone; a part
        that is only partly assembled is an inconsistency, except from Ray, which may run a task twice.
        """
        if not self.features_path.exists():
            return
        with h5py.File(self.features_path, "r") as handle:
            assembled = set(read_strings(handle["question_id"]))
        for path in self.all_part_paths():
            with h5py.File(path, "r") as handle:
                ids = set(read_strings(handle["question_id"]))
            if ids <= assembled:
                path.unlink()
            elif ids & assembled and not self._is_ray_part(path):
                raise RuntimeError(f"{path} holds rows that are not in {self.features_path}; the run is inconsistent")

    def remove_stale_temporaries(self) -> None:
        """Remove temporaries of dead writers. Call with the run lock held."""
        directories = [self.root, self.root / PARTS_DIR, self.writer_dir, self.parts_dir]
        live = self.live_writers()
        for directory in self.writer_dirs():
            if directory not in live:
                directories += [directory, directory / PARTS_DIR]
        for directory in dict.fromkeys(directories):
            if directory.exists():
                for path in directory.glob(".*.tmp-*"):
                    path.unlink(missing_ok=True)

    # ----- shards: done markers --------------------------------------------------------------
    def write_done(self, marker: dict[str, Any]) -> None:
        """Record that this shard's pass ended: the rows it owns (table positions, ids) and those that failed."""
        path = self.writer_dir / DONE_FILE
        tmp = path.with_name(f".{DONE_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(marker))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.writer_dir)

    def clear_done(self) -> None:
        (self.writer_dir / DONE_FILE).unlink(missing_ok=True)

    def read_done(self, shard_name: str) -> dict[str, Any] | None:
        path = self.root / SHARDS_DIR / shard_name / DONE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def assemble_shards(self, num_shards: int) -> ShardAssembly:
        """If every shard of the layout is done, assemble features.h5 in table order. Call with the run lock held.

        The table order comes from the shards' done markers (each lists its rows' table positions), so this needs
        neither the table nor the model: `halp merge` calls it too.
        """
        names = [f"{index}-of-{num_shards}" for index in range(num_shards)]
        markers = {name: self.read_done(name) for name in names}
        result = ShardAssembly(missing=[name for name, marker in markers.items() if marker is None])
        if result.missing:
            return result
        digests = {(marker["table_rows"], marker["table_sha256"]) for marker in markers.values()}
        if len(digests) != 1:
            seen = ", ".join(f"{name}: {marker['table_rows']} rows" for name, marker in markers.items())
            raise RunMismatchError(
                f"{self.root}: the shards read different tables or --limit values ({seen}); "
                "rerun every shard with the same --data and --limit"
            )
        table_rows = next(iter(digests))[0]
        positions: dict[int, str] = {}
        for marker in markers.values():
            positions.update(zip(marker["positions"], marker["question_ids"], strict=True))
        if sorted(positions) != list(range(table_rows)):
            raise RunMismatchError(f"{self.root}: the shards' rows do not cover the table exactly once")
        order = [positions[position] for position in range(table_rows)]
        table_position = {qid: position for position, qid in positions.items()}
        result.failed = sorted(
            (entry for marker in markers.values() for entry in marker["failed"]),
            key=lambda entry: table_position.get(entry["question_id"], -1),
        )

        _write_errors(self.root / ERRORS_FILE, result.failed)
        parts = self.all_part_paths()
        if parts or not self.features_path.exists():
            attrs = self.recorded_attrs(parts)
            attrs.update(complete=not result.failed, num_failed=len(result.failed), num_shards=num_shards)
            self.assemble(order, attrs)
            result.assembled = True
        with h5py.File(self.features_path, "r") as handle:
            result.num_samples = int(handle["question_id"].shape[0])
        return result

    def recorded_attrs(self, parts: Sequence[Path]) -> dict[str, Any]:
        """The run's attributes as the writers recorded them (model, layers, dtype, ...), plus feature sizes."""
        attrs: dict[str, Any] = {}
        for path in [*([self.features_path] if self.features_path.exists() else []), *parts]:
            with h5py.File(path, "r") as handle:
                attrs = {key: value for key, value in handle.attrs.items() if key != "num_samples"} | attrs
                for name, key in (("vision_projected", "hidden_size"), ("vision_only", "vision_hidden_size")):
                    if name in handle and key not in attrs:
                        attrs[key] = int(handle[name].shape[1])
            if "model_id" in attrs and "hidden_size" in attrs:
                break
        return attrs

    # ----- assembly ------------------------------------------------------------------------
    def assemble(self, order: Sequence[str], attrs: dict[str, Any]) -> Path:
        """Write features.h5 with the committed rows in `order`, streaming source by source, then drop the parts.

        Sources: an existing features.h5 (a sharded run assembles again when shards add rows), then every part.
        A row may be committed twice only by Ray (a retried task); the first copy is kept.
        """
        parts = self.all_part_paths()
        existing = [self.features_path] if self.features_path.exists() else []
        sources = [*existing, *sorted(parts, key=self._is_ray_part)]
        ids_per_source = []
        for path in sources:
            with h5py.File(path, "r") as handle:
                ids_per_source.append(read_strings(handle["question_id"]))
        rank = {qid: i for i, qid in enumerate(order)}
        owner: dict[str, int] = {}
        repeated = 0
        for index, (path, ids) in enumerate(zip(sources, ids_per_source, strict=True)):
            for qid in ids:
                if qid not in owner:
                    owner[qid] = index
                elif self._is_ray_part(path):
                    repeated += 1
                else:
                    raise RuntimeError(f"{self.root}: question_id {qid!r} is committed twice; the run is inconsistent")
        if repeated:
            log.info("%s: %d row(s) committed twice by retried Ray tasks; keeping one copy", self.root, repeated)
        kept = sorted((qid for qid in owner if qid in rank), key=rank.__getitem__)
        destination = {qid: i for i, qid in enumerate(kept)}
        total = len(kept)

        tmp = self.features_path.with_name(f".{FEATURES_FILE}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w+b") as raw:
                with h5py.File(raw, "w") as out:
                    for key, value in {**attrs, "num_samples": total}.items():
                        out.attrs[key] = value
                    for index, (path, ids) in enumerate(zip(sources, ids_per_source, strict=True)):
                        rows_here = [
                            (destination[qid], i)
                            for i, qid in enumerate(ids)
                            if qid in destination and owner[qid] == index
                        ]
                        if not rows_here:
                            continue
                        rows_here.sort()
                        dest = np.array([d for d, _ in rows_here], dtype=np.int64)
                        src = np.array([s for _, s in rows_here], dtype=np.int64)
                        with h5py.File(path, "r") as part:
                            for name in [*STRING_FIELDS, *(f"meta/{c}" for c in part.get("meta", {}))]:
                                if name not in out:
                                    out.create_dataset(name, shape=(total,), dtype=STR)
                                values = part[name][()]
                                out[name][dest] = values[src]
                            for name in feature_datasets(part):
                                array = part[name][()]
                                if name not in out:
                                    out.create_dataset(name, shape=(total, array.shape[1]), dtype=np.float32)
                                out[name][dest] = array[src]
                    if total == 0:
                        for name in STRING_FIELDS:
                            out.create_dataset(name, shape=(0,), dtype=STR)
                    out.require_group("meta")
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, self.features_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreWriteError(
                f"could not write {self.features_path}: {err}. The committed parts in {self.parts_dir} are intact; "
                "free disk space or fix permissions, then rerun the same command to assemble them."
            ) from err
        _fsync_dir(self.root)
        for path in parts:
            path.unlink()
        return self.features_path


def _parts_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if _PART_RE.match(path.name))


def _write_errors(path: Path, failed: Sequence[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in failed))
    os.replace(tmp, path)
