"""Input tables and their images.

A table is a CSV/TSV/JSON/JSONL/Parquet file whose image ids are files under an images directory, or a table
that embeds its images: Parquet or Arrow with the `datasets` Image struct (`{bytes, path}`) or a binary column,
JSONL with data-URL / base64 images, a `datasets.Dataset.save_to_disk` directory, a hub dataset
(`--hf-dataset NAME [--config C] --split S`, through `datasets.load_dataset`) or an `hf://datasets/...` file
(huggingface_hub's fsspec file system). Text columns are read up front (every table problem surfaces before a
model loads); images are read and decoded only when a batch asks for them (`ImageSource.load`), so memory does
not grow with the table.

The column aliases are those of the HALP seeds, so their VQA tables load unchanged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from pyarrow import ArrowException

from halp.digests import bytes_sha256, file_sha256, handle_sha256
from halp.errors import HalpError, ImageError, ParameterError, TableError, first_line
from halp.userfiles import READ_LIMIT, check_user_file, open_user_file, read_user_file

COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "question_id": ("question_id",),
    "image_id": ("image_id", "image_name", "image", "image_path"),
    "question": ("question",),
    "ground_truth": ("answer", "gt_answer", "ground_truth"),
}
REQUIRED = ("question_id", "image_id", "question")
#: Columns that may hold embedded images, in order of preference when a table has several.
IMAGE_COLUMNS = ("image", "decoded_image", "img", "image_bytes", "image_base64", "image_b64")
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".arrow")


@dataclass(frozen=True)
class Sample:
    question_id: str
    image_id: str
    question: str
    ground_truth: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    #: The row's content identity (halp.store.row_digest), set when its image is loaded for extraction.
    row_sha256: str = ""
    #: Row of the table that embeds this sample's image (None: the image is the file image_id under --images).
    image_row: int | None = None


def _as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_plain(value), ensure_ascii=False)
    return str(value)


def _plain(value: Any) -> Any:
    """Nested numpy/pyarrow values as JSON-able Python values."""
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def read_frame(path: str | Path) -> pd.DataFrame:
    """A whole table as text (CSV, TSV, JSON, JSONL, Parquet); tables with embedded images go through `open_table`.

    The file is opened by `halp.userfiles` (a regular file only); a damaged one (cut, empty, not the format its name
    says) is a TableError naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"}:
        raise TableError(f"{path}: unsupported table format {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")
    with open_table_file(path) as handle:
        try:
            if suffix in {".csv", ".tsv"}:
                check_csv_end(handle, path, "\t" if suffix == ".tsv" else ",", TableError)
                return pd.read_csv(handle, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            if suffix in {".jsonl", ".ndjson"}:
                return pd.read_json(handle, lines=True, dtype=False)
            if suffix == ".json":
                return pd.read_json(handle, dtype=False)
            return pd.read_parquet(handle)
        except UnicodeDecodeError as err:
            raise TableError(f"{path} is not valid UTF-8 text ({err}); re-encode it as UTF-8") from err
        except (ValueError, OSError, ArrowException) as err:  # pandas' ParserError, pyarrow's errors, a read error
            raise damaged_table(path, suffix[1:], err) from err


def check_csv_end(handle: BinaryIO, path: Path, sep: str, error: type[HalpError]) -> None:
    """Refuse a CSV cut short at a field boundary: pandas reads it without a word, filling the last row's missing
    fields with empty strings (a cut inside a quoted field is pandas' own ParserError). Only a file that does not
    end with a newline is parsed here (every CSV writer ends its rows with one); the handle is rewound."""
    import csv

    handle.seek(0, os.SEEK_END)
    if handle.tell() == 0:
        return
    handle.seek(-1, os.SEEK_END)
    if handle.read(1) in (b"\n", b"\r"):
        handle.seek(0)
        return
    handle.seek(0)
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    try:
        widths = [len(row) for row in csv.reader(text, delimiter=sep) if row]
    except (UnicodeDecodeError, csv.Error):
        widths = []  # pandas names the problem
    finally:
        text.detach()
        handle.seek(0)
    if len(widths) > 1 and widths[-1] < widths[0]:
        raise error(
            f"{path} ends in the middle of a row (its last row has {widths[-1]} of {widths[0]} fields and no newline): "
            "it was cut short; write or copy it again"
        )


def open_table_file(path: Path) -> BinaryIO:
    """A local table file opened for reading (`halp.userfiles`: a regular file only); an empty one is refused."""
    handle = open_user_file(path, "input table", error=TableError)
    if os.fstat(handle.fileno()).st_size == 0:
        handle.close()
        raise TableError(f"input table {path} is empty (0 bytes); it was cut or never written: write it again")
    return handle


def damaged_table(source: str | Path, kind: str, err: BaseException) -> TableError:
    """The one message for a table file that cannot be read as its format: which file, why, what to do."""
    reason = first_line(err)
    return TableError(
        f"{source} could not be read as {kind}: it is damaged (cut short, corrupt) or not {kind} ({reason}); "
        "re-create or re-download it"
    )


def resolve_columns(columns: list[str], embedded: bool = False) -> dict[str, str]:
    """Map canonical names to the table's column names, or fail listing the accepted aliases.

    With `embedded` (the table holds its images), image_id may be missing: it is then derived per row."""
    resolved: dict[str, str] = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        found = next((alias for alias in aliases if alias in columns), None)
        if found is not None:
            resolved[canonical] = found
    required = [name for name in REQUIRED if not (embedded and name == "image_id")]
    missing = [name for name in required if name not in resolved]
    if missing:
        # "question", or "image_id (or image_name, image, image_path)" where other names are accepted.
        wanted = [
            name if len(COLUMN_ALIASES[name]) == 1 else f"{name} (or {', '.join(COLUMN_ALIASES[name][1:])})"
            for name in missing
        ]
        raise TableError(
            f"the table has no {' and no '.join(wanted)} column; its columns are {', '.join(columns) or 'none'}. "
            f"Rename the column{'s' if len(missing) > 1 else ''} that hold{'' if len(missing) > 1 else 's'} "
            f"{'them' if len(missing) > 1 else 'it'}."
        )
    return resolved


#: Rows converted to text at a time: one chunk's Python strings exist at once, the table's text stays in Arrow.
TEXT_CHUNK_ROWS = 4096


class TableRows(Sequence[Sample]):
    """A table's rows as compact Arrow string columns; each `Sample` is made only when asked for (indexing,
    slicing, iterating), so a 100,000-row table costs its text plus 8 bytes a row, not 100,000 Python objects.

    A slice or `take` is a view of the same columns (the positions it selects); `image_row` is the table position
    for a table that embeds its images."""

    def __init__(
        self,
        core: dict[str, Any],
        meta: dict[str, Any],
        embedded: bool,
        positions: np.ndarray | None = None,
    ) -> None:
        #: question_id, image_id, question, ground_truth: pyarrow (chunked) string arrays, one per table row.
        self._core = core
        #: metadata column name -> its pyarrow string array, in the table's column order.
        self._meta = meta
        self.embedded = embedded
        rows = len(core["question_id"])
        self._positions = np.arange(rows, dtype=np.int64) if positions is None else positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._view(self._positions[index])
        return self._make(self._positions[[index]])[0]

    def __iter__(self) -> Any:
        for start in range(0, len(self._positions), TEXT_CHUNK_ROWS):
            yield from self._make(self._positions[start : start + TEXT_CHUNK_ROWS])

    def __repr__(self) -> str:
        return f"TableRows({len(self)} rows)"

    def take(self, indices: Sequence[int] | np.ndarray) -> TableRows:
        """The rows at these indices (of this view), in that order, as a view."""
        return self._view(self._positions[np.asarray(indices, dtype=np.int64)])

    def question_ids(self) -> list[str]:
        """The rows' question_ids (Python strings, made now)."""
        return _column_texts(self._core["question_id"], self._positions)

    @property
    def nbytes(self) -> int:
        """Bytes held: the text columns (shared by every view of the table) and this view's positions."""
        arrays = list(self._core.values()) + list(self._meta.values())
        return sum(array.nbytes for array in arrays) + self._positions.nbytes

    def _view(self, positions: np.ndarray) -> TableRows:
        return TableRows(self._core, self._meta, self.embedded, positions)

    def _make(self, positions: np.ndarray) -> list[Sample]:
        core = {name: _column_texts(array, positions) for name, array in self._core.items()}
        metas = {name: _column_texts(array, positions) for name, array in self._meta.items()}
        return [
            Sample(
                question_id=core["question_id"][index],
                image_id=core["image_id"][index],
                question=core["question"][index],
                ground_truth=core["ground_truth"][index],
                meta={name: values[index] for name, values in metas.items()},
                image_row=int(position) if self.embedded else None,
            )
            for index, position in enumerate(positions)
        ]


def _column_texts(array: Any, positions: np.ndarray) -> list[str]:
    import pyarrow as pa

    if len(positions) and positions[-1] - positions[0] == len(positions) - 1 and np.all(np.diff(positions) == 1):
        values = array.slice(int(positions[0]), len(positions))  # contiguous: no copy
    else:
        values = array.take(pa.array(positions, type=pa.int64()))
    return _texts_of(values)


def _texts_of(array: Any) -> list[str]:
    import pyarrow as pa

    if pa.types.is_string(array.type):
        return array.to_pylist()
    return [value.decode("utf-8", "surrogatepass") for value in array.to_pylist()]


def _text_array(values: list[str]) -> Any:
    """Texts as an Arrow string array, or as their bytes ("surrogatepass") where one is not valid Unicode (a lone
    surrogate from a JSON escape): such a row opens, and extraction refuses it with a reason (unstorable_text)."""
    import pyarrow as pa

    try:
        return pa.array(values, type=pa.string())
    except UnicodeEncodeError:
        return pa.array([value.encode("utf-8", "surrogatepass") for value in values], type=pa.binary())


def _text_column(chunks: list[Any]) -> Any:
    """One column of chunks from `_text_array`: strings, or all as bytes when a chunk needed them."""
    import pyarrow as pa

    if all(pa.types.is_string(chunk.type) for chunk in chunks):
        return pa.chunked_array(chunks, type=pa.string())
    return pa.chunked_array([chunk.cast(pa.binary()) for chunk in chunks], type=pa.binary())


def samples_from_frame(
    frame: pd.DataFrame, source: str, image_ids: Sequence[str] | None = None, embedded: bool = False
) -> TableRows:
    """Validated samples from a text frame; with `embedded`, sample i's image is row i of the table."""
    frame.columns = [str(column) for column in frame.columns]
    chunks = (frame.iloc[start : start + TEXT_CHUNK_ROWS] for start in range(0, len(frame), TEXT_CHUNK_ROWS))
    return rows_from_chunks(list(frame.columns), len(frame), chunks, source, image_ids, embedded)


def rows_from_chunks(
    columns: list[str],
    num_rows: int,
    chunks: Iterable[pd.DataFrame],
    source: str,
    image_ids: Any = None,
    embedded: bool = False,
) -> TableRows:
    """Validated rows from a table's text, read as consecutive frames of rows (each with the dtypes the whole
    table's frame would have), converted to text one frame at a time into Arrow string columns.

    `image_ids`: the rows' image ids when the table has no image_id column (a sequence or a pyarrow string array;
    an empty one becomes `row-N`)."""
    import pyarrow as pa

    try:
        resolved = resolve_columns(columns, embedded=embedded)
    except TableError as err:
        raise TableError(f"{source}: {err}") from err
    used = set(resolved.values())
    meta_columns = [column for column in columns if column not in used]
    unnamed = [repr(column) for column in meta_columns if not column.strip() or "\x00" in column]
    if unnamed:
        # Metadata is stored under the column's name (percent-encoded where HDF5 needs it): it needs one.
        raise TableError(f"{source}: column name(s) {', '.join(unnamed)} cannot name metadata; rename or drop them")
    if num_rows == 0:
        raise TableError(f"{source} has a header but no rows: nothing to extract")

    sources = {name: resolved[name] for name in ("question_id", "question", "ground_truth") if name in resolved}
    if image_ids is None:
        sources["image_id"] = resolved["image_id"]
    parts: dict[str, list[Any]] = {name: [] for name in [*sources, *meta_columns]}
    if image_ids is not None:
        parts["image_id"] = []
    empty: list[int] = []
    offset = 0
    for chunk in chunks:
        chunk.columns = [str(column) for column in chunk.columns]
        for name, column in [*sources.items(), *((column, column) for column in meta_columns)]:
            values = [_as_text(value) for value in chunk[column].tolist()]
            if name == "question_id":
                empty += [offset + index for index, qid in enumerate(values) if not qid.strip()]
            parts[name].append(_text_array(values))
        if image_ids is not None:
            given = image_ids[offset : offset + len(chunk)]
            given = given.to_pylist() if hasattr(given, "to_pylist") else list(given)
            parts["image_id"].append(
                _text_array([image_id or f"row-{offset + index}" for index, image_id in enumerate(given)])
            )
        offset += len(chunk)
    if offset != num_rows:
        raise AssertionError(f"{source}: read {offset} rows of {num_rows}")  # a reader bug, not bad input
    if empty:
        raise TableError(f"{source}: empty question_id in row(s) {', '.join(str(i + 2) for i in empty[:10])}")
    arrays = {name: _text_column(chunks_of) for name, chunks_of in parts.items()}
    duplicates = _repeated(arrays["question_id"])
    if duplicates:
        shown = ", ".join(duplicates[:10])
        raise TableError(f"{source}: duplicate question_id values ({len(duplicates)}), e.g. {shown}")
    if "ground_truth" not in arrays:
        arrays["ground_truth"] = pa.chunked_array([pa.array([""] * num_rows, type=pa.string())])
    core = {name: arrays.pop(name) for name in ("question_id", "image_id", "question", "ground_truth")}
    return TableRows(core, {column: arrays[column] for column in meta_columns}, embedded)


def _repeated(values: Any) -> list[str]:
    """The values that occur more than once in a string array, sorted. By sorting (8 bytes a row of indices), not
    hashing: a hash table of 100,000 strings costs more than the strings."""
    import pyarrow.compute as pc

    if len(values) < 2:
        return []
    ordered = values.take(pc.sort_indices(values)).combine_chunks()
    repeats = ordered.slice(1).filter(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)))
    return sorted(set(_texts_of(repeats)))


def _nullable_ints(table: Any) -> set[str]:
    """Integer columns with nulls: pandas makes them float64 for the whole table, also in a chunk without nulls."""
    import pyarrow as pa

    return {
        table.schema.field(i).name
        for i in range(table.num_columns)
        if pa.types.is_integer(table.schema.field(i).type) and table.column(i).null_count
    }


def _as_whole_table(frame: pd.DataFrame, nullable_ints: set[str]) -> pd.DataFrame:
    for name in nullable_ints:
        if name in frame.columns and isinstance(frame[name].dtype, np.dtype) and frame[name].dtype.kind in "iu":
            frame[name] = frame[name].astype("float64")
    return frame


def _frame_columns(table: Any) -> list[str]:
    """The columns `table.to_pandas()` has (a pyarrow Table or Schema): pandas' stored index columns become its
    index, not columns."""
    schema = getattr(table, "schema", table)
    index_columns = {name for name in ((schema.pandas_metadata or {}).get("index_columns") or [])
                     if isinstance(name, str)}
    return [name for name in schema.names if name not in index_columns]


def read_samples(path: str | Path) -> list[Sample]:
    """Read and validate a VQA table; every problem is reported before a model is loaded."""
    return list(open_table(path).samples)


# ----- image sources -------------------------------------------------------------------------------------
class ImageSource:
    """Where a table's images come from. `read` opens one batch's images with the SHA-256 of the bytes decoded (the
    row's content identity, see halp.store), an ImageError for each unreadable one; `digests` hashes without
    decoding (resume planning); `load` is `read` without the digests."""

    embedded = False

    def read(
        self, samples: Sequence[Sample], exif_orientation: bool = True
    ) -> list[tuple[Image.Image, str] | ImageError]:
        raise NotImplementedError

    def digests(self, samples: Sequence[Sample]) -> list[str]:
        """SHA-256 of each sample's image bytes; "" where there are none (the row fails when loaded)."""
        raise NotImplementedError

    def load(self, samples: Sequence[Sample], exif_orientation: bool = True) -> list[Image.Image | ImageError]:
        return [item if isinstance(item, ImageError) else item[0] for item in self.read(samples, exif_orientation)]

    def size(self, sample: Sample) -> tuple[int, int] | None:
        """(height, width) of a row's image, for planning batches by token count; None when it cannot be read (the
        loader records why). halp's sources read it from the image's header (`header_size`), so planning never
        decodes pixels: a decoder that never returns meets the input workers' per-row deadline, not the planner.
        This default, for other sources, decodes."""
        (item,) = self.read([sample], exif_orientation=False)
        return None if isinstance(item, ImageError) else (item[0].height, item[0].width)


class FolderImages(ImageSource):
    """Image files named by image_id, confined to one directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def read(
        self, samples: Sequence[Sample], exif_orientation: bool = True
    ) -> list[tuple[Image.Image, str] | ImageError]:
        out: list[tuple[Image.Image, str] | ImageError] = []
        for sample in samples:
            try:
                out.append(read_image(self.root, sample.image_id, exif_orientation))
            except ImageError as err:
                out.append(err)
        return out

    def digests(self, samples: Sequence[Sample]) -> list[str]:
        return [image_file_sha256(self.root, sample.image_id) for sample in samples]

    def size(self, sample: Sample) -> tuple[int, int] | None:
        try:
            with open_image_file(self.root, sample.image_id) as handle, Image.open(handle) as image:
                return image.height, image.width  # from the header: the pixels are not decoded
        except (OSError, ValueError, SyntaxError, ImageError, Image.DecompressionBombError):
            return None  # the loader records the real error


def header_size(data: bytes | None) -> tuple[int, int] | None:
    """(height, width) from an encoded image's header, without decoding its pixels; None if it is no image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decode_image_bytes(data: bytes | None, what: str, exif_orientation: bool = True) -> tuple[Image.Image, str]:
    """An embedded image's bytes as an RGB image (the same policies as files: EXIF orientation, first frame) and
    their SHA-256, or an ImageError saying which row and why."""
    if not data:
        raise ImageError(f"{what}: the embedded image has no bytes")
    digest = bytes_sha256(data)
    try:
        return _decode(data, exif_orientation), digest
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} exceeds the decompression-bomb limit: {err}") from err
    except Exception as err:  # any decoder failure (malformed EXIF, a codec bug) is this row's error only
        raise ImageError(f"{what} cannot be decoded: {type(err).__name__}: {err}") from err


def _decode(data: bytes, exif_orientation: bool) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)  # animated: the first frame
        image.load()
        if exif_orientation:
            oriented = ImageOps.exif_transpose(image)
            return to_rgb(oriented if oriented is not None else image)
        return to_rgb(image)



def _cell_bytes(cell: Any) -> bytes | None:
    """The bytes of an embedded-image cell: the `datasets` Image struct {bytes, path}, or raw binary."""
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell


class ParquetImages(ImageSource):
    """Images embedded in a Parquet file (local path or fsspec URL), read one row group at a time (the group in use
    is cached). Picklable: a worker process reopens the file itself."""

    embedded = True

    def __init__(self, source: str | Path, column: str, label: str, handle: Any = None) -> None:
        self.source = source
        self.column = column
        self.label = label
        self._file: Any = handle  # an open pyarrow ParquetFile of `source` to reuse, or None
        self._starts: np.ndarray | None = None
        #: The row group in use: its image cells, or the ImageError that reading its image column gave.
        self._cached: tuple[int, list[Any] | ImageError] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_starts": None, "_cached": None}

    def _open(self) -> Any:
        if self._file is None:
            import pyarrow.parquet as pq

            self._file = pq.ParquetFile(_opener(self.source)[0]())
        if self._starts is None:
            metadata = self._file.metadata
            self._starts = np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
        return self._file

    def _cell(self, row: int) -> Any:
        """A row's image cell; an ImageError for every row of a row group whose image column cannot be read (a
        corrupt page): the other row groups' rows are read as usual."""
        try:
            handle = self._open()
        except (ArrowException, OSError, ValueError) as err:  # the file changed since the table was opened
            reason = str(err) if isinstance(err, HalpError) else f"not readable as Parquet now: {first_line(err)}"
            raise ImageError(f"{self.label} row {row}: {reason}") from err
        assert self._starts is not None
        group = int(np.searchsorted(self._starts, row, side="right") - 1)
        if self._cached is None or self._cached[0] != group:
            self._cached = None  # drop the previous group before reading the next one
            try:
                table = handle.read_row_group(group, columns=[self.column], use_threads=False)
                values: list[Any] | str = table.column(0).to_pylist()
            except (ArrowException, OSError, ValueError) as err:
                values = first_line(err)
            self._cached = (group, values)
        values = self._cached[1]
        if isinstance(values, str):
            raise ImageError(
                f"{self.label} row {row}: the image column of its row group ({group}) cannot be read, the file is "
                f"damaged ({values}); the other row groups' rows are read. Re-create or re-download the table"
            )
        return values[row - int(self._starts[group])]

    def _bytes(self, sample: Sample) -> bytes | None:
        assert sample.image_row is not None
        return _cell_bytes(self._cell(sample.image_row))

    def read(
        self, samples: Sequence[Sample], exif_orientation: bool = True
    ) -> list[tuple[Image.Image, str] | ImageError]:
        out: list[tuple[Image.Image, str] | ImageError] = []
        for sample in samples:
            what = f"{self.label} row {sample.image_row} ({sample.question_id})"
            try:
                out.append(decode_image_bytes(self._bytes(sample), what, exif_orientation))
            except ImageError as err:
                out.append(err)
        return out

    def size(self, sample: Sample) -> tuple[int, int] | None:
        try:
            return header_size(self._bytes(sample))
        except ImageError:
            return None  # the loader records why

    def digests(self, samples: Sequence[Sample]) -> list[str]:
        # In table order, so each row group is read once however the samples are ordered.
        order = sorted(range(len(samples)), key=lambda i: samples[i].image_row or 0)
        found = [""] * len(samples)
        for index in order:
            with contextlib.suppress(ImageError):  # "": the row fails when it is loaded, with this error
                found[index] = bytes_sha256(self._bytes(samples[index]))
        return found


class DatasetImages(ImageSource):
    """Images of a `datasets.Dataset` (memory-mapped Arrow): each batch reads only its rows' bytes."""

    embedded = True

    def __init__(self, dataset: Any, column: str, label: str) -> None:
        # The Arrow view gives the stored {bytes, path} structs of the asked rows, undecoded and uncopied otherwise.
        self._images = dataset.select_columns([column]).with_format("arrow")
        self.column = column
        self.label = label

    def _cells(self, samples: Sequence[Sample]) -> list[Any]:
        rows = [int(sample.image_row) for sample in samples if sample.image_row is not None]
        return self._images[rows].column(self.column).to_pylist() if rows else []

    def read(
        self, samples: Sequence[Sample], exif_orientation: bool = True
    ) -> list[tuple[Image.Image, str] | ImageError]:
        out: list[tuple[Image.Image, str] | ImageError] = []
        try:
            cells = self._cells(samples)
        except (ArrowException, OSError, ValueError) as err:  # a damaged Arrow file: these rows fail, not the run
            return [ImageError(f"{self.label}: the image column cannot be read ({first_line(err)})")] * len(samples)
        for sample, cell in zip(samples, cells, strict=True):
            what = f"{self.label} row {sample.image_row} ({sample.question_id})"
            try:
                out.append(decode_image_bytes(_cell_bytes(cell), what, exif_orientation))
            except ImageError as err:
                out.append(err)
        return out

    def size(self, sample: Sample) -> tuple[int, int] | None:
        try:
            (cell,) = self._cells([sample])
        except (ArrowException, OSError, ValueError):
            return None  # the loader records why
        return header_size(_cell_bytes(cell))

    def digests(self, samples: Sequence[Sample]) -> list[str]:
        found: list[str] = []
        for start in range(0, len(samples), 256):  # a window at a time: the bytes are read, hashed and dropped
            found += [bytes_sha256(_cell_bytes(cell)) for cell in self._cells(samples[start : start + 256])]
        return found


class JsonlImages(ImageSource):
    """Images embedded in JSONL lines (data URLs or base64): a batch re-reads only its own lines."""

    embedded = True

    def __init__(self, path: Path, column: str, offsets: list[int]) -> None:
        self.path = path
        self.column = column
        self.offsets = offsets

    def _data(self, handle: Any, sample: Sample, what: str) -> bytes:
        assert sample.image_row is not None
        handle.seek(self.offsets[sample.image_row])
        try:
            line = json.loads(handle.readline())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:  # the file changed since it was opened
            raise ImageError(f"{what}: the line is no longer valid JSON ({err}); was the table rewritten?") from err
        return decode_embedded_text(line.get(self.column) if isinstance(line, dict) else None, what)

    def _open(self) -> BinaryIO:
        return open_user_file(self.path, "input table", error=ImageError)

    def read(
        self, samples: Sequence[Sample], exif_orientation: bool = True
    ) -> list[tuple[Image.Image, str] | ImageError]:
        out: list[tuple[Image.Image, str] | ImageError] = []
        try:
            opened = self._open()
        except ImageError as err:
            return [err] * len(samples)
        with opened as handle:
            for sample in samples:
                what = f"{self.path.name} line {(sample.image_row or 0) + 1} ({sample.question_id})"
                try:
                    out.append(decode_image_bytes(self._data(handle, sample, what), what, exif_orientation))
                except ImageError as err:
                    out.append(err)
        return out

    def size(self, sample: Sample) -> tuple[int, int] | None:
        try:
            with self._open() as handle:
                return header_size(self._data(handle, sample, sample.question_id))
        except ImageError:
            return None  # the loader records why

    def digests(self, samples: Sequence[Sample]) -> list[str]:
        found: list[str] = []
        try:
            opened = self._open()
        except ImageError:
            return [""] * len(samples)  # the rows fail when they are loaded, saying why
        with opened as handle:
            for sample in samples:
                try:
                    found.append(bytes_sha256(self._data(handle, sample, sample.question_id)))
                except ImageError:
                    found.append("")
        return found


def decode_embedded_text(value: Any, what: str) -> bytes:
    """The bytes of a JSON image value: a data URL, a base64 string, or {"bytes": base64}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, str) or not value:
        raise ImageError(f"{what}: the embedded image has no bytes")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise ImageError(f"{what}: data URL is not base64-encoded ({header[:40]!r})")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{what}: the embedded image is not valid base64: {err}") from err


# ----- tables --------------------------------------------------------------------------------------------
@dataclass
class Table:
    """The rows of a table (text only) and where their images come from."""

    samples: Sequence[Sample]  # TableRows: the text in Arrow, a Sample made per row asked for
    images: ImageSource | None  # None: files under --images, given at extraction
    #: What the run identity records about the input: the table or dataset, and a digest of its content.
    identity: dict[str, str]

    @property
    def embedded(self) -> bool:
        return self.images is not None and self.images.embedded

    def content_identity(self) -> dict[str, str]:
        """What the run identity records of this input: the hub dataset's id, config and split, a remote table's
        URL, the image column. Not a local path (a moved table is the same input) and not the table's digest: each
        row's content (text and image bytes) is its own identity (halp.store.row_digest), so an edited table
        re-extracts only the rows that changed."""
        label = self.identity.get("data", "")
        keep_label = "://" in label  # a URL names remote content; a hub dataset has its own keys
        return {
            key: value
            for key, value in self.identity.items()
            if key != "table_sha256" and (key != "data" or keep_label)
        }

    def image_source(self, images_dir: str | Path | None) -> ImageSource:
        if self.images is not None:
            return self.images
        if images_dir is None:
            raise TableError(
                f"{self.identity.get('data', 'the table')} names image files but embeds no images: give their folder "
                "as images="
            )
        if not Path(images_dir).is_dir():
            raise ParameterError("images", f"{images_dir} is not a directory")
        return FolderImages(images_dir)


def _embedded_column(names: Sequence[str], kinds: dict[str, str]) -> str | None:
    """The image column among columns whose kind is 'struct' ({bytes, path}) or 'binary', preferring IMAGE_COLUMNS."""
    candidates = [name for name in names if kinds.get(name) in {"struct", "binary"}]
    for preferred in IMAGE_COLUMNS:
        if preferred in candidates:
            return preferred
    return candidates[0] if candidates else None


def _arrow_kind(arrow_type: Any) -> str:
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        names = {arrow_type.field(i).name for i in range(arrow_type.num_fields)}
        if "bytes" in names:
            return "struct"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary"
    return "other"


def _open_parquet(source: str | Path, label: str, digest: str) -> Table:
    import pyarrow.parquet as pq

    opened = _opener(source)[0]()
    try:
        # One handle (its footer parsed once: a file of many small row groups has a large one) for the text, the
        # image paths and the first batches' images.
        handle = pq.ParquetFile(opened, pre_buffer=isinstance(source, str) and "://" in source)
        return _parquet_table(handle, source, label, digest)
    except (ArrowException, OSError, ValueError) as err:  # a file that is not Parquet, or a damaged page
        if isinstance(err, HalpError):
            raise
        raise damaged_table(label, "Parquet", err) from err


def _parquet_table(handle: Any, source: str | Path, label: str, digest: str) -> Table:
    """The Table of an open Parquet file: its text read now (a damaged text page raises here), images per batch."""
    schema = handle.schema_arrow
    kinds = {name: _arrow_kind(schema.field(name).type) for name in schema.names}
    column = _embedded_column(schema.names, kinds)
    text_columns = [name for name in schema.names if name != column]
    if column is None:
        return Table(_parquet_rows(handle, text_columns, label), None, {"data": label, "table_sha256": digest})
    image_ids: Any = None
    if not _has_image_id(_frame_columns(_selected_schema(handle, text_columns))):
        if kinds[column] == "struct" and "path" in _struct_fields(schema.field(column).type):
            image_ids = _parquet_paths(handle, column)
        else:
            image_ids = [""] * handle.metadata.num_rows
    samples = _parquet_rows(handle, text_columns, label, image_ids=image_ids, embedded=True)
    images = ParquetImages(source, column, label, handle)
    return Table(samples, images, {"data": label, "image_column": column, "table_sha256": digest})


def _selected_schema(handle: Any, columns: list[str]) -> Any:
    import pyarrow as pa

    schema = handle.schema_arrow
    return pa.schema([schema.field(name) for name in columns], metadata=schema.metadata)


def _parquet_rows(
    handle: Any, columns: list[str], label: str, image_ids: Any = None, embedded: bool = False
) -> TableRows:
    """A Parquet file's text columns as rows, read a batch of TEXT_CHUNK_ROWS at a time on one thread and converted
    as it comes: the text is never held twice, and pyarrow's allocator does not keep the pages that reading a whole
    file of many row groups (or each thread) took."""
    import pyarrow as pa

    selected = _selected_schema(handle, columns)
    nullable_ints = _parquet_nullable_ints(handle, selected)

    def frames() -> Iterator[pd.DataFrame]:
        for batch in handle.iter_batches(batch_size=TEXT_CHUNK_ROWS, columns=columns, use_threads=False):
            frame = pa.Table.from_batches([batch], schema=selected).to_pandas(use_threads=False)
            yield _as_whole_table(frame, nullable_ints)

    return rows_from_chunks(_frame_columns(selected), handle.metadata.num_rows, frames(), label, image_ids, embedded)


def _parquet_nullable_ints(handle: Any, schema: Any) -> set[str]:
    """`_nullable_ints` of a Parquet file's columns, from the row groups' null counts where every row group records
    one, else by reading that column alone."""
    import pyarrow as pa

    metadata = handle.metadata
    leaves = {metadata.schema.column(i).path: i for i in range(metadata.num_columns)}
    found: set[str] = set()
    for column in schema:
        if not pa.types.is_integer(column.type):
            continue
        leaf = leaves.get(column.name)
        stats = [metadata.row_group(g).column(leaf).statistics for g in range(metadata.num_row_groups)] if (
            leaf is not None) else [None]
        if all(stat is not None and stat.has_null_count for stat in stats):
            nulls = sum(stat.null_count for stat in stats)
        else:
            nulls = handle.read(columns=[column.name], use_threads=False).column(0).null_count
        if nulls:
            found.add(column.name)
    return found


def _parquet_paths(handle: Any, column: str) -> Any:
    """The stored file name of each row's image (a pyarrow string array), one row group at a time: a struct column
    is read whole, so reading the table's paths at once would hold every image's bytes too."""
    import pyarrow as pa
    import pyarrow.compute as pc
    paths: list[Any] = []
    for group in range(handle.metadata.num_row_groups):
        values = handle.read_row_group(group, columns=[f"{column}.path"], use_threads=False).column(0)
        if hasattr(values.type, "num_fields"):  # some pyarrow versions keep the struct around the selected child
            values = pc.struct_field(values, "path")
        paths.append(pa.array(_struct_paths(values, len(values)), type=pa.string()))
    return pa.chunked_array(paths, type=pa.string())


def _struct_fields(arrow_type: Any) -> set[str]:
    return {arrow_type.field(i).name for i in range(arrow_type.num_fields)}


def _struct_paths(column: Any, rows: int) -> list[str]:
    if column is None:
        return [""] * rows
    return [Path(value).name if value else "" for value in column.to_pylist()]


def _has_image_id(columns: Sequence[str]) -> bool:
    """Whether embedded rows take their image_id from the table's own column (else from the image's stored path)."""
    names = [str(column) for column in columns]
    return any(alias in names for alias in COLUMN_ALIASES["image_id"])


def _image_ids(frame: pd.DataFrame, paths: Any) -> Any:
    """image_id of embedded rows: the table's own image_id column if it has one, else the image's stored path."""
    return None if _has_image_id(list(frame.columns)) else paths


def _opener(source: str | Path) -> tuple[Any, Any, str]:
    """(a function opening the file for reading, the pyarrow filesystem or None, the path in it)."""
    if isinstance(source, str) and "://" in source:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(source)
        return (lambda: filesystem.open(path, "rb")), filesystem, path
    return (lambda: open_table_file(Path(source))), None, str(source)


def _open_dataset(dataset: Any, label: str, identity: dict[str, str]) -> Table:
    """A `datasets.Dataset` (from save_to_disk, load_dataset or an Arrow file): text now, images per batch."""
    import datasets

    columns = list(dataset.column_names)
    kinds = {name: ("struct" if isinstance(feature, datasets.Image) else "other")
             for name, feature in dataset.features.items()}
    column = _embedded_column(columns, kinds)
    text = dataset.remove_columns([column]) if column else dataset
    if column is None:
        return Table(_dataset_rows(text, label), None, identity)
    paths = None if _has_image_id(text.column_names) else _dataset_paths(dataset, column)
    samples = _dataset_rows(text, label, image_ids=paths, embedded=True)
    return Table(samples, DatasetImages(dataset, column, label), {**identity, "image_column": column})


def _dataset_rows(text: Any, label: str, image_ids: Any = None, embedded: bool = False) -> TableRows:
    """A dataset's text columns as rows: `datasets`' own pandas conversion (Dataset.to_pandas), a chunk at a time
    over the memory-mapped Arrow, never the whole table as one frame."""
    nullable_ints = _nullable_ints(text.with_format("arrow")[:]) if len(text) else set()
    frames = (
        _as_whole_table(frame, nullable_ints)
        for frame in text.to_pandas(batch_size=TEXT_CHUNK_ROWS, batched=True)
    )
    return rows_from_chunks(list(text.column_names), len(text), frames, label, image_ids, embedded)


def _dataset_paths(dataset: Any, column: str) -> Any:
    """The stored file name of each row's image (a pyarrow string array), read from Arrow without the bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = dataset.flatten_indices() if dataset._indices is not None else dataset
    chunked = flat.data.column(column)
    if not hasattr(chunked.type, "num_fields") or "path" not in _struct_fields(chunked.type):
        return [""] * len(flat)
    paths = pc.struct_field(chunked, "path")
    step = TEXT_CHUNK_ROWS
    names = [pa.array(_struct_paths(paths.slice(start, step), min(step, len(flat) - start)), type=pa.string())
             for start in range(0, len(flat), step)]
    return pa.chunked_array(names, type=pa.string())


def _open_jsonl(path: Path) -> Table:
    """JSONL, line by line: embedded image fields are located and dropped; each line's offset is kept.

    The image field is the one the first line with an embedded image uses (lines before it may have none: a null
    image); it is dropped from every row, so it never becomes the rows' image_id (they get `row-N`)."""
    rows: list[dict[str, Any]] = []
    offsets: list[int] = []
    column: str | None = None
    position = 0
    with open_table_file(path) as handle:
        for number, raw in enumerate(handle, start=1):
            start, position = position, position + len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise TableError(f"{path} line {number} is not valid UTF-8 ({err}); re-encode it as UTF-8") from err
            except json.JSONDecodeError as err:
                raise TableError(f"{path} line {number} is not valid JSON: {err}") from err
            if not isinstance(row, dict):
                raise TableError(f"{path} line {number} is a JSON {type(row).__name__}, expected an object")
            if column is None:
                column = _jsonl_image_column(row)
                if column is not None:
                    for earlier in rows:  # lines before the first image: their (null) image field goes too
                        earlier.pop(column, None)
            if column is not None:
                row.pop(column, None)
            rows.append(row)
            offsets.append(start)
    if not rows:
        raise TableError(f"input table {path} holds no JSON lines (only blank ones): nothing to extract")
    digest = file_sha256(path, "input table", TableError)
    frame = pd.DataFrame(rows)
    count = len(rows)
    del rows  # the frame holds the text now; the rows keep it in Arrow
    if column is None:
        return Table(samples_from_frame(frame, str(path)), None, {"data": str(path), "table_sha256": digest})
    samples = samples_from_frame(frame, str(path), image_ids=_image_ids(frame, [""] * count), embedded=True)
    return Table(samples, JsonlImages(path, column, offsets),
                 {"data": str(path), "image_column": column, "table_sha256": digest})


def _jsonl_image_column(row: dict[str, Any]) -> str | None:
    """The field of a JSONL row that embeds an image: a data URL, {"bytes": ...}, or an *_base64/_b64 field."""
    for name in IMAGE_COLUMNS + tuple(row):
        value = row.get(name)
        if isinstance(value, str) and value.startswith("data:image/"):
            return name
        if isinstance(value, dict) and "bytes" in value:
            return name
        if name in {"image_base64", "image_b64"} and name in row:
            return name
    return None


def open_table(
    data: str | Path | None,
    hf_dataset: str | None = None,
    config: str | None = None,
    split: str | None = None,
) -> Table:
    """Open a table (or a hub dataset) as samples plus an image source; table problems raise TableError."""
    if hf_dataset is not None:
        if data is not None:
            raise TableError("give data= or hf_dataset=, not both")
        return open_hub_dataset(hf_dataset, config, split)
    if data is None:
        raise TableError("no input: give a table as data=, or a hub dataset as hf_dataset= with split=")
    if isinstance(data, str) and "://" in data:
        if not data.lower().endswith((".parquet", ".pq")):
            raise TableError(f"{data}: remote tables are read as Parquet; name a .parquet file")
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(data)
        if not filesystem.exists(path):
            raise TableError(f"input table {data} does not exist")
        return _open_parquet(data, data, f"{type(filesystem).__name__}:{filesystem.ukey(path)}")
    path = Path(data)
    if path.is_dir():
        return _open_saved_dataset(path)
    if not path.exists():
        raise TableError(f"input table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        return _open_parquet(path, str(path), file_sha256(path, "input table", TableError))
    if suffix == ".arrow":
        import datasets

        open_table_file(path).close()  # a regular, non-empty file: `datasets` memory-maps it by name
        try:
            dataset = datasets.Dataset.from_file(str(path))
            return _open_dataset(
                dataset, str(path), {"data": str(path), "table_sha256": file_sha256(path, "input table", TableError)}
            )
        except (ArrowException, OSError, ValueError) as err:  # not an Arrow stream, or a damaged one
            if isinstance(err, HalpError):
                raise
            raise damaged_table(path, "a `datasets` Arrow file", err) from err
    if suffix in {".jsonl", ".ndjson"}:
        return _open_jsonl(path)
    frame = read_frame(path)
    rows = samples_from_frame(frame, str(path))
    del frame  # the rows keep their text in Arrow
    return Table(rows, None, {"data": str(path), "table_sha256": file_sha256(path, "input table", TableError)})


def _open_saved_dataset(path: Path) -> Table:
    import datasets

    if (path / "dataset_dict.json").exists():
        splits = _saved_json(path / "dataset_dict.json").get("splits", [])
        raise TableError(
            f"{path} holds a DatasetDict with splits {', '.join(map(str, splits))}; pass the split's own directory "
            f"(e.g. {path / str(splits[0]) if splits else path})"
        )
    if not (path / "state.json").exists():
        found = ", ".join(sorted(child.name for child in path.iterdir())[:10]) or "nothing"
        raise TableError(
            f"{path} is a directory but not one written by datasets.Dataset.save_to_disk (expected state.json and "
            f"data-*.arrow; found {found})"
        )
    # `datasets` opens these by name (the Arrow files memory-mapped): each must be a regular file first.
    files = _saved_json(path / "state.json").get("_data_files") or []
    for name in ["dataset_info.json", *(str(entry.get("filename", "")) for entry in files if isinstance(entry, dict))]:
        if (path / name).exists() or (path / name).is_symlink():
            check_user_file(path / name, "dataset file", TableError)
    try:
        dataset = datasets.load_from_disk(str(path))
        return _open_dataset(dataset, str(path), {"data": str(path), "table_sha256": dataset._fingerprint})
    except (ArrowException, OSError, ValueError) as err:  # a missing, cut or corrupt file of the folder
        if isinstance(err, HalpError):
            raise
        raise damaged_table(path, "a datasets.save_to_disk folder", err) from err


def _saved_json(path: Path) -> dict[str, Any]:
    """A JSON object of a save_to_disk folder (state.json, dataset_dict.json); a damaged one names the file."""
    try:
        value = json.loads(read_user_file(path, "dataset file", error=TableError).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged_table(path, "JSON", err) from err
    if not isinstance(value, dict):
        raise damaged_table(path, "a JSON object", ValueError(f"a JSON {type(value).__name__}"))
    return value


def open_hub_dataset(name: str, config: str | None, split: str | None) -> Table:
    """A dataset by its hub name (or a local dataset script/folder), loaded by `datasets.load_dataset`."""
    import datasets

    if not split:
        raise TableError(f"hf_dataset={name}: name the split with split= (e.g. test, validation)")
    label = f"{name}{f'[{config}]' if config else ''}:{split}"
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except ValueError as err:
        # datasets says 'Unknown split "x". Should be one of [...]' for a split the dataset does not have.
        raise TableError(f"hf_dataset={label}: {err}") from err
    except FileNotFoundError as err:
        raise TableError(f"hf_dataset={name}: not found ({err})") from err
    except OSError as err:  # ConnectionError: offline, or the hub unreachable
        raise TableError(
            f"hf_dataset={name}: could not be loaded ({err}); download it once (or point at a local copy) and retry"
        ) from err
    identity = {
        "hf_dataset": name,
        "config": config or "",
        "split": split,
        "table_sha256": dataset._fingerprint,
        "data": label,
    }
    return _open_dataset(dataset, label, identity)


# ----- image files ---------------------------------------------------------------------------------------
def resolve_image_path(images_dir: str | Path, image_id: str) -> Path:
    """The image file for an image_id, confined to images_dir."""
    root = Path(images_dir).resolve()
    candidate = (root / image_id).resolve()
    if not candidate.is_relative_to(root):
        raise ImageError(f"image path {image_id!r} points outside the images directory {root}")
    return candidate


def load_image(images_dir: str | Path, image_id: str, exif_orientation: bool = True) -> Image.Image:
    """Open an image as RGB, converting palette, grayscale, alpha, CMYK and 16-bit modes.

    Policies (README, "Input images"): with `exif_orientation` (the default) the EXIF Orientation tag is applied,
    so a portrait phone photo reaches the model upright, as every image viewer shows it; without it the stored
    pixels are used as they are. An animated image (GIF, APNG, WebP) contributes its first frame.
    """
    return read_image(images_dir, image_id, exif_orientation)[0]


def _image_path(images_dir: str | Path, image_id: str) -> Path:
    try:
        return resolve_image_path(images_dir, image_id)
    except (OSError, ValueError) as err:  # a name longer than NAME_MAX, a NUL byte, ...
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"image id {image_id!r} is not a usable file name under {images_dir}: {err}") from err


def open_image_file(images_dir: str | Path, image_id: str) -> BinaryIO:
    """The image file of an image_id, confined to images_dir, opened by `halp.userfiles` (a regular file of at most
    READ_LIMIT bytes: a FIFO, a device or a directory is this row's ImageError, and never blocks)."""
    return open_user_file(_image_path(images_dir, image_id), "image file", READ_LIMIT, ImageError)


def image_file_sha256(images_dir: str | Path, image_id: str) -> str:
    """SHA-256 of the image file's bytes; "" when there is no readable file (the row will fail when loaded)."""
    try:
        with open_image_file(images_dir, image_id) as handle:
            return handle_sha256(handle)
    except (ImageError, OSError):
        return ""


def read_image(images_dir: str | Path, image_id: str, exif_orientation: bool = True) -> tuple[Image.Image, str]:
    """`load_image`, and the SHA-256 of the very bytes decoded (the row's content identity, see halp.store)."""
    path = _image_path(images_dir, image_id)
    data = read_user_file(path, "image file", READ_LIMIT, ImageError)
    digest = bytes_sha256(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # animated: the first frame
            image.load()
            if exif_orientation:
                oriented = ImageOps.exif_transpose(image)
                return to_rgb(oriented if oriented is not None else image), digest
            return to_rgb(image), digest
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {path} exceeds the decompression-bomb limit: {err}") from err
    except Exception as err:  # any decoder failure (malformed EXIF, a codec bug) is this row's error only
        raise ImageError(f"image {path} cannot be read: {type(err).__name__}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype="float64")
        peak = array.max() if array.size and array.max() > 0 else 1.0
        scaled = (array / (65535.0 if peak > 255 else 255.0) * 255.0).clip(0, 255).astype("uint8")
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ----- the input of a run ----------------------------------------------------------------------------------
_OPENED: dict[tuple, Table] = {}


def input_table(
    data: str | Path | None, hf_dataset: str | None = None, config: str | None = None, split: str | None = None
) -> Table:
    """`open_table`, reusing the table opened last while its file is unchanged (a run asks for it twice: rows
    before the model loads, images during the loop); a hub dataset is opened once per process."""
    stat: tuple = ()
    if data is not None and not (isinstance(data, str) and "://" in data) and Path(data).exists():
        info = Path(data).stat()
        stat = (info.st_mtime_ns, info.st_size)
    key = (str(data) if data is not None else None, hf_dataset, config, split, stat)
    if key not in _OPENED:
        _OPENED.clear()  # one table at a time: a finished run's rows are not kept
        _OPENED[key] = open_table(data, hf_dataset, config, split)
    return _OPENED[key]


def as_image_source(images: ImageSource | str | Path) -> ImageSource:
    return images if isinstance(images, ImageSource) else FolderImages(images)
