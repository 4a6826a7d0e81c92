"""The run directory and the `features.h5` contract.

While a run is in progress, each committed batch is one HDF5 part file under `parts/`, written to a
temporary name, fsynced and atomically renamed. A `kill -9` therefore loses at most the batch in
flight and never leaves a half-written part under a committed name. When every sample is done the
parts are assembled, in input-table order, into `features.h5` (again via a temporary file and an
atomic rename), and the parts are removed.

Layout of a finished run::

    RUN_DIR/run.json        what was run (model, layers, dtype, ...); reruns must match it
    RUN_DIR/features.h5     the contract below
    RUN_DIR/extract.log     the log

`features.h5`: 1-D UTF-8 string datasets `question_id`, `image_id`, `question`, `ground_truth`,
`answer`, `meta/<column>`; float32 (N, dim) datasets `vision_only`, `vision_projected`,
`vision_token/layer_<k>`, `vision_token_mean/layer_<k>`, `query_token/layer_<k>`; root attributes
describing the run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.data import Sample

FEATURES_FILE = "features.h5"
RUN_FILE = "run.json"
PARTS_DIR = "parts"
ERRORS_FILE = "errors.jsonl"
LOCK_FILE = ".lock"
STRING_FIELDS = ("question_id", "image_id", "question", "ground_truth", "answer")
STR = h5py.string_dtype("utf-8")
_PART_RE = re.compile(r"^part-(\d{6})\.h5$")

#: Settings that change the numbers; a rerun into the same directory must agree on them.
IDENTITY_KEYS = ("model", "layers", "dtype", "max_new_tokens", "prompt_format")


class RunMismatchError(RuntimeError):
    """A rerun asks for different settings than the run directory was created with."""


class RunLockedError(RuntimeError):
    """Another live process is writing to this run directory."""


class StoreWriteError(OSError):
    """Writing to the run directory failed (disk full, read-only, ...); committed data is intact."""


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


class RunStore:
    """A run directory: identity, committed parts, assembly into features.h5."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts_dir = self.root / PARTS_DIR

    @property
    def features_path(self) -> Path:
        return self.root / FEATURES_FILE

    @property
    def run_path(self) -> Path:
        return self.root / RUN_FILE

    # ----- one writer ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock for this process's lifetime; the OS drops it if the process dies (no stale locks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process ends or unlock()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(
                f"{self.root} is being written by another halp process (pid {holder}); "
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

    # ----- identity ------------------------------------------------------------------------
    def read_identity(self) -> dict[str, Any] | None:
        if not self.run_path.exists():
            return None
        return json.loads(self.run_path.read_text())

    def open(self, identity: dict[str, Any], overwrite: bool = False) -> None:
        """Create the directory, or check that an existing one was made with the same settings."""
        if overwrite and self.root.exists():
            for name in (FEATURES_FILE, RUN_FILE, PARTS_DIR, ERRORS_FILE):
                target = self.root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        existing = self.read_identity()
        if existing is None:
            if self.features_path.exists() or any(self.parts_dir.iterdir()):
                raise RunMismatchError(
                    f"{self.root} holds extraction data but no {RUN_FILE}; use --overwrite to start afresh"
                )
            tmp = self.run_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
            os.replace(tmp, self.run_path)
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

    # ----- parts ---------------------------------------------------------------------------
    def part_paths(self) -> list[Path]:
        if not self.parts_dir.exists():
            return []
        return sorted(path for path in self.parts_dir.iterdir() if _PART_RE.match(path.name))

    def committed_ids(self) -> set[str]:
        done: set[str] = set()
        sources = [*self.part_paths(), self.features_path] if self.features_path.exists() else self.part_paths()
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
        path = self.parts_dir / f"part-{self._next_part_number():06d}.h5"
        write_rows(path, rows, attrs)
        return path

    def remove_assembled_parts(self) -> None:
        """Drop parts already merged into features.h5 (a kill can land between the rename and the clean-up)."""
        if not self.features_path.exists():
            return
        with h5py.File(self.features_path, "r") as handle:
            assembled = set(read_strings(handle["question_id"]))
        for path in self.part_paths():
            with h5py.File(path, "r") as handle:
                ids = set(read_strings(handle["question_id"]))
            if not ids <= assembled:
                raise RuntimeError(f"{path} holds rows that are not in {self.features_path}; the run is inconsistent")
            path.unlink()

    def remove_stale_temporaries(self) -> None:
        for directory in (self.root, self.parts_dir):
            if directory.exists():
                for path in directory.glob(".*.tmp-*"):
                    path.unlink(missing_ok=True)

    # ----- assembly ------------------------------------------------------------------------
    def assemble(self, order: Sequence[str], attrs: dict[str, Any]) -> Path:
        """Write features.h5 with the committed rows in `order`, streaming part by part, then drop the parts."""
        parts = self.part_paths()
        ids_per_part = []
        for path in parts:
            with h5py.File(path, "r") as handle:
                ids_per_part.append(read_strings(handle["question_id"]))
        rank = {qid: i for i, qid in enumerate(order)}
        committed = [qid for ids in ids_per_part for qid in ids]
        if len(set(committed)) != len(committed):
            raise RuntimeError(f"{self.root}: a question_id is committed twice; the run is inconsistent")
        kept = sorted((qid for qid in committed if qid in rank), key=rank.__getitem__)
        destination = {qid: i for i, qid in enumerate(kept)}
        total = len(kept)

        tmp = self.features_path.with_name(f".{FEATURES_FILE}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w+b") as raw:
                with h5py.File(raw, "w") as out:
                    for key, value in {**attrs, "num_samples": total}.items():
                        out.attrs[key] = value
                    for path, ids in zip(parts, ids_per_part, strict=True):
                        rows_here = [(destination[qid], i) for i, qid in enumerate(ids) if qid in destination]
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
