"""What every converter shares: the output row, the table writer, and readers for the published layouts.

A converted table is one Parquet file, `DIR/<source>.parquet`, that embeds its images as the `datasets` Image
struct (`{bytes, path}`), so `halp extract --data DIR/<source>.parquet` needs no --images; and `DIR/convert.json`,
the manifest: source, input, layout found, rows written, rows skipped (with reasons, also in skipped.jsonl).
Rows are written in row groups of `ROW_GROUP` rows: memory holds one group's images, whatever the table's size.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyarrow import ArrowException

from halp.errors import HalpError, SourceError
from halp.layout import atomic_path, write_text_atomic
from halp.userfiles import READ_LIMIT, open_user_file, read_user_file

#: Columns of a converted table, in order (`image` is the embedded image).
COLUMNS = (
    "question_id",
    "image_id",
    "question",
    "answer",
    "answer_format",
    "references",
    "category",
    "dataset",
    "source_id",
    "split",
    "extra",
    "image",
)
#: answer_format values: how `halp label` should read the ground truth of the row.
ANSWER_FORMATS = ("yesno", "choice", "number", "text", "open", "objects")
ROW_GROUP = 64
MANIFEST = "convert.json"
SKIPPED = "skipped.jsonl"


@dataclass
class Row:
    """One converted question. `image` is a zero-argument function returning the image bytes (read only when the
    row is written), or raising SourceError with the reason the row must be skipped."""

    source_id: str
    image_id: str
    question: str
    answer: str
    answer_format: str
    category: str
    image: Callable[[], bytes]
    references: list[str] = field(default_factory=list)
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    source_id: str
    reason: str


@dataclass
class ConvertSummary:
    source: str
    out: Path
    table: Path
    layout: str
    rows: int
    skipped: list[Skipped]
    categories: dict[str, int]


def prefixed(source: str, source_id: str) -> str:
    """The question_id of a converted row: the source's name, then its own id (unique across sources)."""
    return f"{source}_{source_id}"


def features() -> Any:
    import datasets

    return datasets.Features(
        {
            **{name: datasets.Value("string") for name in COLUMNS if name != "image"},
            "image": datasets.Image(),
        }
    )


def write_table(
    source: str, rows: Iterable[Row], out_dir: Path, layout: str, origin: str
) -> ConvertSummary:
    """Write DIR/<source>.parquet (embedded images), DIR/skipped.jsonl and DIR/convert.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"{source}.parquet"
    schema = features().arrow_schema  # carries the `datasets` metadata: the image column reads back as Image
    skipped: list[Skipped] = []
    categories: Counter[str] = Counter()
    seen: set[str] = set()
    written = 0
    with atomic_path(table_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for group in _groups(rows, ROW_GROUP):
            columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
            for row in group:
                question_id = prefixed(source, row.source_id)
                if question_id in seen:
                    raise SourceError(f"{origin}: {source} id {row.source_id!r} occurs twice")
                seen.add(question_id)
                try:
                    data = row.image()
                except SourceError as err:
                    skipped.append(Skipped(row.source_id, str(err)))
                    continue
                if not data:
                    skipped.append(Skipped(row.source_id, "the image has no bytes"))
                    continue
                values = {
                    "question_id": question_id,
                    "image_id": row.image_id,
                    "question": row.question,
                    "answer": row.answer,
                    "answer_format": row.answer_format,
                    "references": json.dumps(row.references, ensure_ascii=False),
                    "category": row.category,
                    "dataset": source,
                    "source_id": row.source_id,
                    "split": row.split,
                    "extra": json.dumps(row.extra, ensure_ascii=False, sort_keys=True),
                    "image": {"bytes": data, "path": row.image_id},
                }
                for name in COLUMNS:
                    columns[name].append(values[name])
                categories[row.category] += 1
            if columns["question_id"]:
                writer.write_table(pa.table(columns, schema=schema))
                written += len(columns["question_id"])
    if written == 0:
        table_path.unlink()
        reasons = "; ".join(f"{item.source_id}: {item.reason}" for item in skipped[:3])
        raise SourceError(f"{origin}: no {source} row could be converted ({len(skipped)} skipped, e.g. {reasons})")
    with atomic_path(out_dir / SKIPPED) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for item in skipped:
            handle.write(json.dumps({"source_id": item.source_id, "reason": item.reason}) + "\n")
    summary = ConvertSummary(source, out_dir, table_path, layout, written, skipped, dict(sorted(categories.items())))
    manifest = {
        "source": source,
        "from": origin,
        "layout": layout,
        "table": table_path.name,
        "rows": written,
        "skipped": len(skipped),
        "categories": summary.categories,
    }
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return summary


def _groups(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    group: list[Row] = []
    for row in rows:
        group.append(row)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ----- reading the published forms ---------------------------------------------------------------------------
#: What to do about a damaged file of a published benchmark.
REFETCH = "download it again (or restore it) and rerun"


def source_bytes(path: Path) -> bytes:
    """A benchmark file's bytes (`halp.userfiles`: a regular file, bounded); an empty one is refused."""
    data = read_user_file(path, "benchmark file", error=SourceError)
    if not data:
        raise SourceError(f"benchmark file {path} is empty (0 bytes): it was cut or never written; {REFETCH}")
    return data


def source_text(path: Path) -> str:
    """A benchmark text file (UTF-8), with the error naming the file."""
    try:
        return source_bytes(path).decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(f"{path} is not valid UTF-8 ({err}): it is damaged or was saved in another encoding; "
                          f"re-encode it as UTF-8 or {REFETCH}") from err


def read_json(path: Path) -> Any:
    """A JSON file, with the error naming the file for bad encoding, syntax or a cut end."""
    try:
        return json.loads(source_text(path))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path} is not valid JSON ({err}): it is cut short or damaged; {REFETCH}") from err


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """JSON Lines (POPE publishes its question files as one JSON object per line, named .json)."""
    rows = []
    for number, line in enumerate(source_text(path).splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(
                    f"{path} line {number} is not valid JSON ({err}): it is cut short or damaged; {REFETCH}"
                ) from err
            if not isinstance(row, dict):
                raise SourceError(f"{path} line {number} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def yes_no_row(
    source_id: str,
    image_id: str,
    question: Any,
    truth: Any,
    category: str,
    image: Callable[[], bytes],
    split: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """A yes/no question: the benchmark's answer spelled yes/no (`yes_no_text`), which is also its one reference."""
    answer = yes_no_text(truth)
    return Row(
        source_id=source_id,
        image_id=image_id,
        question=str(question).strip(),
        answer=answer,
        answer_format="yesno",
        category=category,
        image=image,
        references=[answer],
        split=split,
        extra=extra or {},
    )


def image_file_bytes(path: Path, what: str) -> bytes:
    """The bytes of one image file (`halp.userfiles`); what is wrong with it is the row's skip reason, naming it."""
    try:
        return read_user_file(path, "image file", READ_LIMIT, SourceError)
    except SourceError as err:
        raise SourceError(f"{what}: {err}") from err


def file_bytes(images_dir: Path | None, name: str, what: str) -> Callable[[], bytes]:
    """A reader of an image file under images_dir (confined to it), for a Row."""

    def read() -> bytes:
        if images_dir is None:
            raise SourceError(f"{what}: no image folder given (images=)")
        root = images_dir.resolve()
        try:
            path = (root / name).resolve()
        except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
            raise SourceError(f"{what}: image name {name!r} is not a usable file name ({err})") from err
        if not path.is_relative_to(root):
            raise SourceError(f"{what}: image path {name!r} points outside {root}")
        return image_file_bytes(path, what)

    return read


def is_present(path: Path) -> bool:
    """Whether something other than a folder is at `path`: a layout's file, whatever its kind. The readers open it
    through `halp.userfiles`, which names a FIFO, a socket or a device instead of reading it, so a layout with one
    in a file's place is refused naming that file, never taken for another layout or silently skipped."""
    return path.exists() and not path.is_dir()


def parquet_files(root: Path, split: str | None) -> tuple[list[Path], list[str]]:
    """The Parquet shards of a hub dataset snapshot (or one file), for `split` if given; and the splits found.

    Hub layouts name shards `<split>-00000-of-0000N*.parquet` or put them in a `<split>/` folder."""
    if is_present(root):
        files = [root] if root.suffix.lower() in {".parquet", ".pq"} else []
    else:
        files = sorted(root.rglob("*.parquet"))
    splits = sorted({split_of(path, root) for path in files})
    if split is not None:
        files = [path for path in files if split_of(path, root) == split]
    return files, splits


def split_of(path: Path, root: Path) -> str:
    name = path.name.split("-")[0].split(".")[0]
    if path == root:
        return name
    parent = path.parent.name
    # data/test-00000-of-00001.parquet -> test; random/test-... keeps the file's own split; <split>/0000.parquet
    return name if not name.isdigit() else parent


def require_split(origin: Path, files: Sequence[Path], split: str | None, splits: Sequence[str]) -> None:
    if split is not None and not files:
        raise SourceError(f"{origin}: no split {split!r}; the splits found are {', '.join(splits) or 'none'}")


def hub_parquet(path: Path, split: str | None, columns: Collection[str], source: str, expected: str
                ) -> list[Path] | None:
    """The Parquet files of a hub snapshot at `path` (of `split` if given), which must hold `columns`; None when
    `path` holds no Parquet, i.e. is one of the source's other layouts."""
    files, splits = parquet_files(path, split)
    if not files and not (split is not None and splits):
        return None
    require_split(path, files, split, splits)
    if not set(columns) <= set(parquet_columns(files[0])):
        raise unknown_layout(source, path, expected)
    return files


def open_parquet(path: Path, what: str = "benchmark file", error: type[HalpError] = SourceError) -> Any:
    """A pyarrow ParquetFile over a regular file (`halp.userfiles`); a file that is not Parquet, or cut, is `error`
    naming it."""
    import pyarrow.parquet as pq

    handle = open_user_file(path, what, error=error)
    try:
        return pq.ParquetFile(handle)
    except (ArrowException, OSError, ValueError) as err:
        handle.close()
        raise damaged_parquet(path, err, error) from err


def damaged_parquet(path: Path, err: BaseException, error: type[HalpError] = SourceError) -> HalpError:
    """The one message for a Parquet file that cannot be read: which, why, what to do."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    reason = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in reason)
    return error(f"{path} could not be read as Parquet: it is cut short or damaged ({reason}); {REFETCH}")


def parquet_rows(files: Sequence[Path], batch_size: int = ROW_GROUP) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Rows of Parquet files a batch at a time (images included: one batch of them in memory); a damaged page is a
    SourceError naming the file."""
    for path in files:
        handle = open_parquet(path)
        batches = handle.iter_batches(batch_size=batch_size)
        while True:
            try:
                batch = next(batches, None)
            except (ArrowException, OSError, ValueError) as err:
                raise damaged_parquet(path, err) from err
            if batch is None:
                break
            for row in batch.to_pylist():
                yield path, row


def parquet_columns(path: Path) -> list[str]:
    return list(open_parquet(path).schema_arrow.names)


def embedded_bytes(cell: Any, what: str) -> Callable[[], bytes]:
    """A reader of an embedded image cell (the `datasets` Image struct, or raw bytes), for a Row."""

    def read() -> bytes:
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise SourceError(f"{what}: the embedded image has no bytes")
        return data

    return read


def unknown_layout(source: str, path: Path, expected: str) -> SourceError:
    if path.is_dir():
        found = ", ".join(sorted(child.name for child in path.iterdir())[:12]) or "an empty folder"
    elif path.exists():
        found = f"a file named {path.name}"
    else:
        found = "nothing (the path does not exist)"
    return SourceError(f"{path} is not a {source} layout halp knows: expected {expected}; found {found}")


def yes_no_text(value: Any) -> str:
    """'yes'/'no' from the benchmarks' spellings (Yes, no, 1, 0, true); '' if it is neither."""
    text = str(value).strip().lower().rstrip(".")
    if text in {"yes", "1", "true"}:
        return "yes"
    if text in {"no", "0", "false"}:
        return "no"
    return ""
