"""The `features.h5` contract: rows in memory, how they are written to and read from a run's HDF5 files, the
per-row content digest, and what a damaged file of a run directory means.

`features.h5` (and every committed part): 1-D UTF-8 string datasets `question_id`, `image_id`, `question`,
`ground_truth`, `answer`, `row_sha256` (the row's content digest, `row_digest`), `meta/<column>` (the column name
through `hdf5_name`; `meta_columns` reads them back); float32 (N, dim) datasets named by halp.features
(`vision_only`, `vision_projected`, `vision_token/layer_<k>`, `vision_token_mean/layer_<k>`, `query_token/layer_<k>`);
root attributes describing the run. A file that cannot be read is a `RunDamagedError` naming it and what to do
(`open_run_file`, `read_json_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.data import Sample
from halp.errors import HalpError, RunDamagedError, StoreWriteError
from halp.features import sort_features
from halp.layout import DONE_FILE, FEATURES_FILE, RUN_FILE, fsync_dir, temporary_path

STRING_FIELDS = ("question_id", "image_id", "question", "ground_truth", "answer", "row_sha256")
#: The per-row content digest (see `row_digest`); parts written before it existed lack it.
ROW_DIGEST = "row_sha256"
STR = h5py.string_dtype("utf-8")
PART_RE = re.compile(r"^part-(\d{6})\.h5$")


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=STR)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in dataset[()]]


def hdf5_name(text: str) -> str:
    """A name HDF5 can give a dataset or group for any non-empty text: itself when it can, else percent-encoded
    (`%` -> `%25`, `/` -> `%2F`, a leading `.` -> `%2E`). Injective, so names never collide; `from_hdf5_name`
    reverses it. Metadata columns (`meta/<name>`) and the legacy export's groups are named this way."""
    if "/" not in text and "%" not in text and not text.startswith("."):
        return text
    encoded = text.replace("%", "%25").replace("/", "%2F")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def from_hdf5_name(name: str) -> str:
    from urllib.parse import unquote

    return unquote(name) if "%" in name else name


def meta_columns(handle: h5py.Group) -> dict[str, h5py.Dataset]:
    """The metadata columns of a features.h5 or part: the table's column name -> its dataset."""
    group = handle.get("meta")
    if group is None:
        return {}
    return {from_hdf5_name(name): group[name] for name in group}


def _strings_or_blank(handle: h5py.Group, name: str, count: int) -> np.ndarray:
    """A string dataset's values; "" for each row of a file written before the dataset existed (row_sha256)."""
    if name in handle:
        return handle[name][()]
    return np.array([b""] * count, dtype=object)


def _texts_or_blank(handle: h5py.Group, name: str, count: int) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in _strings_or_blank(handle, name, count)]


def row_digest(sample: Sample, image_sha256: str) -> str:
    """The content identity of one row: everything of the table row (ids, question, ground truth, metadata) and
    the image's bytes. A rerun re-extracts a committed row whose digest differs from the table's."""
    text = json.dumps(
        [sample.question_id, sample.image_id, sample.question, sample.ground_truth, sorted(sample.meta.items())],
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{text}\n{image_sha256}".encode("utf-8", "surrogatepass")).hexdigest()


def table_text_digest(samples: Sequence[Sample]) -> str:
    """Fingerprint of a table's text (every row's ids, question, ground truth, metadata) in order: the shards of one
    run must have read the same table. Images are not read here (each shard digests its own rows' images)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(row_digest(sample, "").encode("ascii") + b"\n")
    return digest.hexdigest()


def damage_advice(path: Path) -> str:
    """What to do about a damaged file of a run directory, by what the file is."""
    name = path.name
    if PART_RE.match(name):
        return (
            "remove that part file and rerun the same command: its rows are extracted again, rows committed in "
            "other files are kept"
        )
    if name == FEATURES_FILE:
        return (
            "restore it from a copy, or remove it and rerun the same `halp extract` command to extract the run again "
            "(parts/ still holds any rows not yet assembled)"
        )
    if name == RUN_FILE:
        return "restore it from a copy, or rerun `halp extract` with --overwrite (this discards the run's rows)"
    if name == DONE_FILE:
        return "remove it and rerun that shard: its committed rows are kept"
    return "remove or restore it and rerun"


@contextmanager
def open_run_file(path: str | Path) -> Iterator[h5py.File]:
    """Open an HDF5 file of a run for reading; a truncated or corrupt one is a RunDamagedError naming the file."""
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise RunDamagedError(f"{path} is damaged ({_first_line(err)}); {damage_advice(path)}") from err
    try:
        with handle:
            yield handle
    except (KeyError, OSError, ValueError) as err:
        if isinstance(err, HalpError):
            raise
        raise RunDamagedError(
            f"{path} is damaged (cannot read {_first_line(err)}); {damage_advice(path)}"
        ) from err


def read_json_file(path: Path) -> Any:
    """A JSON file of the run directory (run.json, done.json); a corrupt one is a RunDamagedError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDamagedError(f"{path} is damaged (not JSON: {err}); {damage_advice(path)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    tmp = temporary_path(path)
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
                    _write_strings(meta, hdf5_name(column), values)
                for name, array in rows.features.items():
                    handle.create_dataset(name, data=np.asarray(array, dtype=np.float32))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
    return sort_features(names)


def read_rows(path: Path) -> Rows:
    with open_run_file(path) as handle:
        count = int(handle["question_id"].shape[0])
        strings = {
            name: _texts_or_blank(handle, name, count) for name in STRING_FIELDS
        }
        meta = {column: read_strings(dataset) for column, dataset in meta_columns(handle).items()}
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
            ROW_DIGEST: [s.row_sha256 for s in samples],
        },
        meta={column: [s.meta.get(column, "") for s in samples] for column in meta_columns},
        features=features,
    )


#: The text columns of features.h5 that describe a row (`row_sha256`, the digest, is bookkeeping).
TEXT_FIELDS = ("question_id", "image_id", "question", "ground_truth", "answer")


@dataclass
class RowTexts:
    """The text of a finished run's rows, read from its features.h5 by `read_row_texts`."""

    #: Each asked text column (TEXT_FIELDS) by name, one string per row in the run's order.
    columns: dict[str, list[str]]
    #: The metadata columns read (`meta/<column>`), by the table's column name.
    meta: dict[str, list[str]]
    #: The file's root attributes, as h5py gives them.
    attrs: dict[str, Any]


def read_row_texts(
    path: str | Path, columns: Sequence[str] = TEXT_FIELDS, meta: Sequence[str] | None = None
) -> RowTexts:
    """The one reader of features.h5's text: `columns`, and the metadata columns named in `meta` that the file has
    (None: all of them). Opened by `open_run_file`: a damaged file, or one lacking a text column, is a RunDamagedError
    naming it."""
    with open_run_file(path) as handle:
        texts = {name: read_strings(handle[name]) for name in columns}
        stored = meta_columns(handle)
        wanted = list(stored) if meta is None else [column for column in meta if column in stored]
        found = {column: read_strings(stored[column]) for column in wanted}
        attrs = dict(handle.attrs.items())
    return RowTexts(texts, found, attrs)
