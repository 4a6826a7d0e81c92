"""MME (Fu et al. 2023): 14 perception and cognition subtasks, two yes/no questions per image (one yes, one no).

Published as
- the hub dataset (lmms-lab/MME, split test): Parquet with `question_id, image, question, answer, category`,
  where `question_id` is the image's path (e.g. `code_reasoning/0020.png`) and so is shared by the image's two
  questions;
- the release folder (MME_Benchmark_release_version): one folder per subtask holding, for each image, a .txt of
  `question<TAB>answer` lines beside it, or `images/` and `questions_answers_YN/` subfolders.

MME scores a pair (acc+ needs both right); halp keeps each question as its own row, `mme_<image>_<k>` with k = 1, 2
in the published order, and the pair in `extra.pair`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from halp.errors import SourceError
from halp.sources.common import (
    ConvertSummary,
    Row,
    embedded_bytes,
    hub_parquet,
    image_file_bytes,
    is_present,
    parquet_rows,
    source_text,
    unknown_layout,
    write_table,
    yes_no_row,
    yes_no_text,
)

NAME = "mme"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
EXPECTED = (
    "Parquet files with question_id, image, question, answer, category (lmms-lab/MME), or the release folder "
    "(<subtask>/<image>.txt with question<TAB>answer lines, or <subtask>/images + <subtask>/questions_answers_YN)"
)


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    files = hub_parquet(path, split, ("question_id", "question", "answer", "image", "category"), NAME, EXPECTED)
    if files is not None:
        return write_table(NAME, _hub_rows(files), out, "hub parquet", str(path))
    if not path.is_dir() or (not any(path.glob("*/*.txt")) and not any(path.glob("*/questions_answers_YN/*.txt"))):
        raise unknown_layout(NAME, path, EXPECTED)
    if split is not None:
        raise SourceError(f"{path}: the MME release folder has no splits (asked for {split!r})")
    return write_table(NAME, _folder_rows(path), out, "release folder", str(path))


def _hub_rows(files: list[Path]) -> Iterator[Row]:
    seen: Counter[str] = Counter()
    for _, row in parquet_rows(files):
        image_key = str(row["question_id"]).rsplit(".", 1)[0]
        seen[image_key] += 1
        source_id = f"{image_key}_{seen[image_key]}"
        image = embedded_bytes(row["image"], f"MME {source_id}")
        yield yes_no_row(source_id, str(row["question_id"]), row["question"], row["answer"], str(row["category"]),
                         image, split="test", extra={"pair": image_key})


def _folder_rows(root: Path) -> Iterator[Row]:
    for subtask in sorted(child for child in root.iterdir() if child.is_dir()):
        answers_dir = subtask / "questions_answers_YN"
        image_dir = subtask / "images" if answers_dir.is_dir() else subtask
        text_dir = answers_dir if answers_dir.is_dir() else subtask
        for text in sorted(text_dir.glob("*.txt")):
            image = next((image_dir / f"{text.stem}{suffix}" for suffix in IMAGE_SUFFIXES
                          if is_present(image_dir / f"{text.stem}{suffix}")), None)
            lines = [line for line in source_text(text).splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                question, _, answer = line.rpartition("\t")
                if not question or not yes_no_text(answer):  # a line cut short, or not MME's format
                    raise SourceError(
                        f"{text} line {number}: expected question<TAB>Yes or No, found {line[-80:]!r}; if the file "
                        "was cut short, download it again"
                    )
                image_key = f"{subtask.name}/{text.stem}"
                source_id = f"{image_key}_{number}"
                image_name = image.name if image else f"{text.stem}.jpg"
                yield yes_no_row(source_id, f"{subtask.name}/{image_name}", question, answer, subtask.name,
                                 _reader(image, f"MME {source_id}"), extra={"pair": image_key})


def _reader(image: Path | None, what: str):
    def read() -> bytes:
        if image is None:
            raise SourceError(f"{what}: no image file beside the question file ({', '.join(IMAGE_SUFFIXES)})")
        return image_file_bytes(image, what)

    return read
