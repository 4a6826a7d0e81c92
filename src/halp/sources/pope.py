"""POPE (Li et al. 2023): yes/no object-existence questions on COCO val2014 images, three negative samplings.

Published as
- the hub dataset (lmms-lab/POPE): Parquet with `id, question_id, question, answer, image_source, image, category`,
  `category` one of adversarial/popular/random (the "Full" configuration has them as splits instead);
- the authors' question files `coco_pope_{adversarial,popular,random}.json`: JSON Lines (one object per line
  despite the .json name) with `question_id, image, text, label`, beside a COCO val2014 image folder (--images).

question_id restarts at 1 in each sampling, so halp's id is `pope_<category>_<question_id>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from halp.sources.common import (
    ConvertSummary,
    Row,
    embedded_bytes,
    file_bytes,
    hub_parquet,
    is_present,
    parquet_rows,
    read_json_lines,
    require_split,
    split_of,
    unknown_layout,
    write_table,
    yes_no_row,
)

NAME = "pope"
SAMPLINGS = ("adversarial", "popular", "random")
EXPECTED = (
    "Parquet files with question, answer, image (lmms-lab/POPE), or coco_pope_<adversarial|popular|random>.json "
    "question files (question_id, image, text, label) with --images"
)


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    files = hub_parquet(path, split, ("question", "answer", "image"), NAME, EXPECTED)
    if files is not None:
        return write_table(NAME, _hub_rows(files, path), out, "hub parquet", str(path))
    question_files = [path] if is_present(path) and path.name.startswith("coco_pope_") else (
        sorted(path.glob("*pope_*.json")) if path.is_dir() else []
    )
    if not question_files:
        raise unknown_layout(NAME, path, EXPECTED)
    found = sorted(_sampling(file) for file in question_files)
    if split is not None:
        question_files = [file for file in question_files if _sampling(file) == split]
        require_split(path, question_files, split, found)
    return write_table(NAME, _json_rows(question_files, images), out, "question files + image folder", str(path))


def _sampling(path: Path) -> str:
    return path.stem.split("_")[-1]


def _hub_rows(files: list[Path], root: Path) -> Iterator[Row]:
    for file, row in parquet_rows(files):
        category = str(row.get("category") or split_of(file, root))
        source_id = f"{category}_{row.get('question_id', row.get('id'))}"
        image_id = f"{row.get('image_source') or source_id}.jpg"
        image = embedded_bytes(row["image"], f"POPE {source_id}")
        yield yes_no_row(source_id, image_id, row["question"], row["answer"], category, image, split_of(file, root))


def _json_rows(files: list[Path], images: Path | None) -> Iterator[Row]:
    for file in files:
        sampling = _sampling(file)
        for item in read_json_lines(file):
            source_id = f"{sampling}_{item['question_id']}"
            image = file_bytes(images, str(item["image"]), f"POPE {source_id}")
            yield yes_no_row(source_id, str(item["image"]), item["text"], item["label"], sampling, image, sampling)
