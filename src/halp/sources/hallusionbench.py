"""HallusionBench (Guan et al. 2024): yes/no questions on figure sets — an original figure and edited versions
(figure_id 0, 1, ...), for visual dependent (VD) and visual supplement (VS) questions, including video-frame sets.

Published as
- the authors' HallusionBench.json: a list of `category (VD/VS), subcategory, visual_input, set_id, figure_id,
  sample_note, question_id, question, gt_answer_details, gt_answer, filename`, `filename` relative to the folder
  that holds `hallusion_bench/` (e.g. `./hallusion_bench/VD/ocr/0_0.png`), null when visual_input is 0;
- the hub dataset (lmms-lab/HallusionBench): Parquet with the same columns plus `image`, splits image/non_image.

`gt_answer` is 1 (yes) or 0 (no). Questions without a figure (visual_input 0, the non_image split) cannot be
extracted with an image and are skipped with that reason. A question's identity is the whole tuple
(category, subcategory, set_id, figure_id, question_id): halp's id joins them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from halp.errors import SourceError
from halp.sources.common import (
    ConvertSummary,
    Row,
    embedded_bytes,
    file_bytes,
    hub_parquet,
    is_present,
    parquet_rows,
    read_json,
    split_of,
    unknown_layout,
    write_table,
    yes_no_text,
)

NAME = "hallusionbench"
EXPECTED = (
    "HallusionBench.json (category, subcategory, set_id, figure_id, question_id, question, gt_answer, filename) "
    "beside hallusion_bench/, or Parquet files with those columns and image (lmms-lab/HallusionBench)"
)
ID_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")
KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer")


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    files = hub_parquet(path, split, (*KEYS, "image"), NAME, EXPECTED)
    if files is not None:
        return write_table(NAME, _rows(((split_of(f, path), r, None) for f, r in parquet_rows(files))), out,
                           "hub parquet", str(path))
    annotation = path if is_present(path) else path / "HallusionBench.json"
    if not is_present(annotation) or annotation.suffix != ".json":
        raise unknown_layout(NAME, path, EXPECTED)
    items = read_json(annotation)
    if not isinstance(items, list) or (items and not set(KEYS) <= set(items[0])):
        found = ", ".join(sorted(items[0])) if isinstance(items, list) and items else type(items).__name__
        raise SourceError(f"{annotation}: expected a list of objects with {', '.join(KEYS)}; found {found}")
    if split is not None:
        raise SourceError(f"{annotation}: HallusionBench.json has no splits (asked for {split!r})")
    root = images or annotation.parent
    return write_table(NAME, _rows(("", item, root) for item in items), out, "HallusionBench.json + figures",
                       str(path))


def _rows(items: Iterator[tuple[str, dict[str, Any], Path | None]]) -> Iterator[Row]:
    for split, item, folder in items:
        source_id = "_".join(str(item[key]) for key in ID_KEYS)
        filename = item.get("filename") or ""
        no_figure = str(item.get("visual_input", "1")) == "0" or (folder is not None and not filename)
        what = f"HallusionBench {source_id}"
        if no_figure:
            image = _no_figure(what)
        elif folder is not None:
            image = file_bytes(folder, filename.removeprefix("./"), what)
        else:
            image = embedded_bytes(item.get("image"), what)
        answer = yes_no_text(item["gt_answer"])
        yield Row(
            source_id=source_id,
            image_id=Path(filename).name if filename else f"{source_id}.png",
            question=str(item["question"]).strip(),
            answer=answer,
            answer_format="yesno",
            category=str(item["subcategory"]),
            image=image,
            references=[answer, str(item.get("gt_answer_details") or "")],
            split=split,
            extra={
                "group": str(item["category"]),
                "set_id": str(item["set_id"]),
                "figure_id": str(item["figure_id"]),
                "visual_input": str(item.get("visual_input", "")),
                "sample_note": str(item.get("sample_note") or ""),
            },
        )


def _no_figure(what: str):
    def read() -> bytes:
        raise SourceError(f"{what}: a question without a figure (visual_input 0); halp extracts image questions")

    return read
