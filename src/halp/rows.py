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

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from halp.data import Sample
from halp.digests import row_digest, table_text_digest  # noqa: F401  (re-exported: their home was here)
from halp.errors import HalpError, RunDamagedError, StoreWriteError, first_line
from halp.features import sort_features
from halp.layout import DONE_FILE, FEATURES_FILE, PART_RE, RUN_FILE, atomic_write

STRING_FIELDS = ("question_id", "image_id", "question", "ground_truth", "answer", "row_sha256")
#: The per-row content digest (see `row_digest`); parts written before it existed lack it.
ROW_DIGEST = "row_sha256"
STR = h5py.string_dtype("utf-8")


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
        raise RunDamagedError(f"{path} is damaged ({first_line(err)}); {damage_advice(path)}") from err
    try:
        with handle:
            yield handle
    except (KeyError, OSError, ValueError) as err:
        if isinstance(err, HalpError):
            raise
        raise RunDamagedError(
            f"{path} is damaged (cannot read {first_line(err)}); {damage_advice(path)}"
        ) from err


def read_json_file(path: Path) -> Any:
    """A JSON file of the run directory (run.json, done.json); a corrupt one is a RunDamagedError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDamagedError(f"{path} is damaged (not JSON: {err}); {damage_advice(path)}") from err



@dataclass
class RunAttributes:
    """The root attributes of `features.h5` (and of every committed part): what produced the rows.

    Set once per pass where they are known (the model's when it is loaded, the batch layout when it is resolved),
    recorded with every part, and completed by the assembly (`complete`, `num_failed`, the feature sizes).
    Attributes this halp does not know (written by another version) are kept in `other` and written back as read.
    """

    model_id: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    adapter: str | None = None
    layers: list[int] | None = None
    num_layers: int | None = None
    dtype: str | None = None
    device: str | None = None
    batch_size: int | str | None = None
    batch_size_auto: bool | None = None
    max_new_tokens: int | None = None
    attn_implementation: str | None = None
    generated: bool | None = None
    exif_orientation: bool | None = None
    #: JSON of {halp, torch, transformers}.
    versions: str | None = None
    created: str | None = None
    workers: int | None = None
    processor_device: str | None = None
    #: The engine that committed the rows when not this process's loop ("ray"), and how many workers it ran.
    engine: str | None = None
    num_workers: int | None = None
    num_shards: int | None = None
    #: JSON of the pass's StageTimes.
    stage_seconds: str | None = None
    hidden_size: int | None = None
    vision_hidden_size: int | None = None
    complete: bool | None = None
    num_failed: int | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hdf5(cls, attrs: Mapping[str, Any]) -> RunAttributes:
        """The attributes an HDF5 file recorded (numpy scalars and arrays as plain Python values)."""
        known = {f.name for f in fields(cls)} - {"other"}
        values: dict[str, Any] = {}
        other: dict[str, Any] = {}
        for key, value in attrs.items():
            plain = value.tolist() if isinstance(value, np.ndarray | np.generic) else value
            (values if key in known else other)[key] = plain
        return cls(**values, other=other)

    def as_hdf5(self) -> dict[str, Any]:
        """The attributes to write: those set, then the unknown ones as they were read."""
        recorded = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        return {**{key: value for key, value in recorded.items() if value is not None}, **self.other}


@dataclass
class Rows:
    """Rows of a part or a finished run, in memory."""

    strings: dict[str, list[str]]
    meta: dict[str, list[str]]
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.strings["question_id"])


def write_rows(path: Path, rows: Rows, attrs: RunAttributes | Mapping[str, Any]) -> None:
    """Write rows to `path` atomically (halp.layout.atomic_write); on failure nothing is left behind."""
    recorded = attrs.as_hdf5() if isinstance(attrs, RunAttributes) else attrs
    try:
        # h5py writes through a Python file object so that a failed write (disk full, file-size limit) is a
        # plain OSError here instead of an HDF5 library state that can crash the interpreter at exit.
        with atomic_write(path, "w+b") as raw, h5py.File(raw, "w") as handle:
            for key, value in recorded.items():
                handle.attrs[key] = value
            for name in STRING_FIELDS:
                _write_strings(handle, name, rows.strings[name])
            meta = handle.create_group("meta")
            for column, values in rows.meta.items():
                _write_strings(meta, hdf5_name(column), values)
            for name, array in rows.features.items():
                handle.create_dataset(name, data=np.asarray(array, dtype=np.float32))
    except OSError as err:
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
