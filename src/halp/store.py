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

The `features.h5` contract (rows, digests, damaged files) is in halp.rows; the locks in halp.locks.

Content identity: a committed row is "done" for a rerun only while its `row_sha256` equals the digest of the
table's row and image now; assembly keeps exactly the current table's rows, in its order, and drops copies of
rows that changed (`assemble(..., digests)`). `run.json` records the model's content fingerprint
(`halp.loading.model_fingerprint`); `check_model` refuses other content. A file that cannot be read is a
`RunDamagedError` naming it and what to do (`open_run_file`, `read_json_file`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.compact import CommittedDigests
from halp.errors import RunDamagedError, RunLockedError, RunMismatchError, StoreWriteError  # noqa: F401  (re-exported)
from halp.layout import (
    DONE_FILE,
    ERRORS_FILE,
    FEATURES_FILE,
    PARTS_DIR,
    RAY_DIR,
    RUN_FILE,
    SHARDS_DIR,
    atomic_write,
    fsync_dir,
    part_name,
    part_number,
    write_text_atomic,
)
from halp.locks import SYNC_TIMEOUT_S, RunLocks  # noqa: F401  (SYNC_TIMEOUT_S re-exported)
from halp.rows import (  # noqa: F401  (re-exported: halp.store was their home)
    PART_RE,
    ROW_DIGEST,
    STR,
    STRING_FIELDS,
    Rows,
    RunAttributes,
    _strings_or_blank,
    _texts_or_blank,
    concat_rows,
    damage_advice,
    feature_datasets,
    from_hdf5_name,
    hdf5_name,
    meta_columns,
    open_run_file,
    read_json_file,
    read_rows,
    read_strings,
    row_digest,
    rows_for,
    table_text_digest,
    write_rows,
)

#: Settings that change the numbers; a rerun into the same directory must agree on them.
IDENTITY_KEYS = ("model", "layers", "dtype", "max_new_tokens", "prompt_format", "exif_orientation", "data")
#: Identity keys added after runs already existed: a run.json without them gets the present value recorded.
LATER_IDENTITY_KEYS = ("exif_orientation", "model_sha256", "data")

log = logging.getLogger(__name__)


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


class RunStore(RunLocks):
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

    def reading(self, path: Path) -> Any:
        """Open one of the run's HDF5 files for reading (see `open_run_file`)."""
        return open_run_file(path)

    # ----- identity ------------------------------------------------------------------------
    def read_identity(self) -> dict[str, Any] | None:
        if not self.run_path.exists():
            return None
        return read_json_file(self.run_path)

    def _write_identity(self, identity: dict[str, Any]) -> None:
        write_text_atomic(self.run_path, json.dumps(identity, indent=2, sort_keys=True))

    def open(self, identity: dict[str, Any], overwrite: bool = False) -> None:
        """Create the directory, or check that an existing one was made with the same settings.

        Call with the run lock held. `identity["num_shards"]` (default 1) is the shard layout: it may change between
        runs (finish an 8-GPU run on one GPU) once no writer of the old layout is alive; committed rows are kept.
        """
        if overwrite and self.root.exists():
            self._require_no_live_writers("overwrite=True would delete the files of other writers")
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
                    f"{self.root} holds extraction data but no {RUN_FILE}; use overwrite=True to start afresh"
                )
            self._write_identity(identity)
            return
        adopted = {key: identity[key] for key in LATER_IDENTITY_KEYS if key not in existing and key in identity}
        if adopted:  # a run made before these keys existed: record them now (its past cannot be checked)
            existing = {**existing, **adopted}
            self._write_identity(existing)
        differences = [
            f"{key}: run has {existing.get(key)!r}, now {identity.get(key)!r}"
            for key in IDENTITY_KEYS
            if existing.get(key) != identity.get(key)
        ]
        if differences:
            raise RunMismatchError(
                f"{self.root} was created with other settings ({'; '.join(differences)}). "
                "Use another out=, or overwrite=True to discard it."
            )
        self.check_model(identity.get("model_sha256"), identity.get("model_files"))
        before, now = int(existing.get("num_shards", 1)), int(identity.get("num_shards", 1))
        if before != now:
            self._require_no_live_writers(f"this run asks for {now} shard(s) where the run directory has {before}")
            for directory in self.writer_dirs():
                (directory / DONE_FILE).unlink(missing_ok=True)  # done markers belong to the old layout
            self._write_identity({**existing, "num_shards": now})
            log.info("%s: shard layout changes from %d to %d; committed rows are kept", self.root, before, now)

    def check_model(self, fingerprint: str | None, files: dict[str, Any] | None = None) -> None:
        """Refuse a checkpoint whose content differs from the run's (other weights at the same path or hub id);
        record the fingerprint if the run has none yet. Call with the run lock held."""
        if fingerprint is None:
            return
        existing = self.read_identity() or {}
        recorded = existing.get("model_sha256")
        if recorded is not None and recorded != fingerprint:
            changed = _changed_files(existing.get("model_files") or {}, files or {})
            raise RunMismatchError(
                f"{self.root} was extracted from other model content than {existing.get('model')} has now "
                f"(model_sha256 {str(recorded)[:12]}…, now {fingerprint[:12]}…"
                f"{'; changed: ' + ', '.join(changed[:5]) if changed else ''}). "
                "Use another out= for the new checkpoint, or overwrite=True to discard this run."
            )
        if recorded != fingerprint or (files and existing.get("model_files") != files):
            self._write_identity({**existing, "model_sha256": fingerprint, "model_files": files or {}})

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
            with self.reading(path) as handle:
                done.update(read_strings(handle["question_id"]))
        return done

    def committed_digests(self) -> CommittedDigests:
        """Each committed question_id with the content digest it is committed with (several while a changed row
        awaits assembly), in compact arrays (halp.compact): a resume of a large run does not hold a set per row."""
        found = CommittedDigests()
        sources = [*self.all_part_paths(), self.features_path] if self.features_path.exists() else self.all_part_paths()
        for path in sources:
            with self.reading(path) as handle:
                ids = read_strings(handle["question_id"])
                digests = _texts_or_blank(handle, ROW_DIGEST, len(ids))
            found.add(ids, digests)
        return found.seal()

    def assembled_as(self, order: Sequence[str], digests: dict[str, str]) -> bool:
        """Whether features.h5 holds exactly the rows of `order`, in that order, with these content digests."""
        if not self.features_path.exists():
            return False
        with self.reading(self.features_path) as handle:
            ids = read_strings(handle["question_id"])
            stored = _texts_or_blank(handle, ROW_DIGEST, len(ids))
        return ids == list(order) and stored == [digests.get(qid) for qid in order]

    def is_current(self, order: Sequence[str], digests: dict[str, str]) -> bool:
        """features.h5 is the finished run of exactly these rows and contents, and nothing waits to be assembled."""
        return self.assembled_as(order, digests) and not self.all_part_paths()

    def reopen_finished(self) -> None:
        """Turn a finished features.h5 back into a part, so a larger rerun can extend it."""
        if self.features_path.exists():
            target = self.parts_dir / part_name(self._next_part_number())
            os.replace(self.features_path, target)
            fsync_dir(self.parts_dir)

    def _next_part_number(self) -> int:
        numbers = [part_number(path) for path in self.part_paths()]
        return max(numbers, default=-1) + 1

    def commit(self, rows: Rows, attrs: RunAttributes | dict[str, Any]) -> Path:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        path = self.parts_dir / part_name(self._next_part_number())
        write_rows(path, rows, attrs)
        return path

    def remove_assembled_parts(self) -> None:
        """Drop parts already merged into features.h5 (a kill can land between the rename and the clean-up).

        Call with the run lock held. Parts of live shards that hold rows not yet assembled are left alone; a part
        that is only partly assembled is an inconsistency, except from Ray, which may run a task twice.
        """
        if not self.features_path.exists():
            return
        assembled = self._row_pairs(self.features_path)
        for path in self.all_part_paths():
            rows = self._row_pairs(path)  # (question_id, content digest): a changed row's new copy is not assembled
            if rows <= assembled:
                path.unlink()
            elif rows & assembled and not self._is_ray_part(path):
                raise RunDamagedError(
                    f"{path} holds rows that are not in {self.features_path} beside rows that are: the run is "
                    f"inconsistent; {damage_advice(path)}"
                )

    def _row_pairs(self, path: Path) -> set[tuple[str, str]]:
        with self.reading(path) as handle:
            ids = read_strings(handle["question_id"])
            digests = _texts_or_blank(handle, ROW_DIGEST, len(ids))
        return set(zip(ids, digests, strict=True))

    def tidy(self) -> None:
        """Remove what an interrupted writer left: temporaries of dead writers, parts already assembled. Call with
        the run lock held."""
        self.remove_stale_temporaries()
        self.remove_assembled_parts()

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
        write_text_atomic(self.writer_dir / DONE_FILE, json.dumps(marker))

    def clear_done(self) -> None:
        (self.writer_dir / DONE_FILE).unlink(missing_ok=True)

    def read_done(self, shard_name: str) -> dict[str, Any] | None:
        path = self.root / SHARDS_DIR / shard_name / DONE_FILE
        return read_json_file(path) if path.exists() else None

    def finish_shard(self, marker: dict[str, Any], num_shards: int) -> ShardAssembly:
        """Record that this shard's pass ended (`write_done`), then, under the run lock, assemble features.h5 if every
        shard of the layout is done (`assemble_shards`)."""
        self.write_done(marker)
        with self.sync():
            return self.assemble_shards(num_shards)

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
                f"{self.root}: the shards read different tables or limit= values ({seen}); "
                "rerun every shard with the same data= and limit="
            )
        table_rows = next(iter(digests))[0]
        row_digests: dict[str, str] | None = {}
        for marker in markers.values():
            if "row_sha256" not in marker:  # a shard of an older halp: no content check for this assembly
                row_digests = None
                break
            row_digests.update(zip(marker["question_ids"], marker["row_sha256"], strict=True))
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
        if parts or not self.features_path.exists() or (
            row_digests is not None and not self.assembled_as(order, row_digests)
        ):
            attributes = self.recorded_attributes()
            attributes.complete, attributes.num_failed = not result.failed, len(result.failed)
            attributes.num_shards = num_shards
            self.assemble(order, attributes, row_digests)
            result.assembled = True
        with self.reading(self.features_path) as handle:
            result.num_samples = int(handle["question_id"].shape[0])
        return result

    def recorded_attributes(self) -> RunAttributes:
        """The run's attributes as its writers recorded them (model, layers, dtype, ...): features.h5's, completed
        by the parts' (a run assembled before holds them all)."""
        attrs: dict[str, Any] = {}
        for path in [*([self.features_path] if self.features_path.exists() else []), *self.all_part_paths()]:
            with self.reading(path) as handle:
                attrs = {key: value for key, value in handle.attrs.items() if key != "num_samples"} | attrs
            if "model_id" in attrs:
                break
        return RunAttributes.from_hdf5(attrs)

    # ----- assembly ------------------------------------------------------------------------
    def assemble(self, order: Sequence[str], attributes: RunAttributes, digests: dict[str, str] | None = None) -> int:
        """Write features.h5 with the committed rows in `order`, streaming source by source, then drop the parts.

        Sources: an existing features.h5 (a sharded run assembles again when shards add rows), then every part.
        With `digests` (question_id -> the table's content digest), a committed copy whose digest differs (the row
        changed and was extracted again) is dropped. Rows not in `order` (removed from the table) are dropped too.
        A row may be committed twice only by Ray (a retried task); the first copy is kept.
        """
        parts = self.all_part_paths()
        existing = [self.features_path] if self.features_path.exists() else []
        sources = [*existing, *sorted(parts, key=self._is_ray_part)]
        ids_per_source = []
        digests_per_source = []
        for path in sources:
            with self.reading(path) as handle:
                ids = read_strings(handle["question_id"])
                ids_per_source.append(ids)
                digests_per_source.append(_texts_or_blank(handle, ROW_DIGEST, len(ids)))
        rank = {qid: i for i, qid in enumerate(order)}
        owner: dict[str, int] = {}
        repeated = stale = 0
        for index, (path, ids) in enumerate(zip(sources, ids_per_source, strict=True)):
            for qid, digest in zip(ids, digests_per_source[index], strict=True):
                if digests is not None and qid in rank and digests.get(qid) != digest:
                    stale += 1
                elif qid not in owner:
                    owner[qid] = index
                elif self._is_ray_part(path):
                    repeated += 1
                else:
                    raise RunDamagedError(
                        f"{self.root}: question_id {qid!r} is committed twice with the same content; the run is "
                        "inconsistent. Rerun with overwrite=True to extract it afresh."
                    )
        if repeated:
            log.info("%s: %d row(s) committed twice by retried Ray tasks; keeping one copy", self.root, repeated)
        if stale:
            log.info("%s: %d committed row(s) of an earlier version of the table dropped", self.root, stale)
        kept = sorted((qid for qid in owner if qid in rank), key=rank.__getitem__)
        destination = {qid: i for i, qid in enumerate(kept)}
        total = len(kept)

        try:
            with atomic_write(self.features_path, "w+b") as raw, h5py.File(raw, "w") as out:
                for index, (path, ids) in enumerate(zip(sources, ids_per_source, strict=True)):
                    rows_here = [
                        (destination[qid], i) for i, qid in enumerate(ids) if qid in destination and owner[qid] == index
                    ]
                    if not rows_here:
                        continue
                    rows_here.sort()
                    dest = np.array([d for d, _ in rows_here], dtype=np.int64)
                    src = np.array([s for _, s in rows_here], dtype=np.int64)
                    with self.reading(path) as part:
                        count = len(ids)
                        for name in [*STRING_FIELDS, *(f"meta/{c}" for c in part.get("meta", {}))]:
                            if name not in out:
                                out.create_dataset(name, shape=(total,), dtype=STR)
                            values = _strings_or_blank(part, name, count)
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
                # The feature sizes are those of the rows written (README: "hidden sizes" among the attributes).
                for name, key in (("vision_projected", "hidden_size"), ("vision_only", "vision_hidden_size")):
                    if name in out:
                        setattr(attributes, key, int(out[name].shape[1]))
                for key, value in {**attributes.as_hdf5(), "num_samples": total}.items():
                    out.attrs[key] = value
        except OSError as err:
            raise StoreWriteError(
                f"could not write {self.features_path}: {err}. The committed parts in {self.parts_dir} are intact; "
                "free disk space or fix permissions, then rerun the same command to assemble them."
            ) from err
        for path in parts:
            path.unlink()
        return total


def _changed_files(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names of checkpoint files added, removed or with other bytes between two fingerprint records."""
    names = sorted(set(before) | set(now))
    return [name for name in names if (before.get(name) or [None] * 4)[3] != (now.get(name) or [None] * 4)[3]]


def _parts_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if part_number(path) is not None)


def _write_errors(path: Path, failed: Sequence[dict[str, str]]) -> None:
    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in failed))
