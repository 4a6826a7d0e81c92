"""HaloQuest (Wang et al. 2024): open questions built to trigger hallucination, on real (Open Images) and
generated (Midjourney, Stable Diffusion) images.

Published in google/haloquest as `haloquest-train.csv` and `haloquest-eval.csv` with the columns
`<unnamed row number>, image_name, url, image type, hallucination type, question, groundtruth responses, split`;
the images are fetched from `url` by the user and kept in a folder by `image_name` (--images).

`hallucination type` (false premises, visually challenging, insufficient context) is the category. `groundtruth
responses` holds several reference answers separated by `;`: all are kept, as a JSON list in `references`;
`answer` is the first. The answers are open sentences ("There is no cat in the image."): answer_format `open`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from halp.data import check_csv_end
from halp.errors import SourceError
from halp.sources.common import (
    REFETCH,
    ConvertSummary,
    Row,
    file_bytes,
    is_present,
    require_split,
    unknown_layout,
    write_table,
)
from halp.userfiles import open_user_file

NAME = "haloquest"
COLUMNS = ("image_name", "hallucination type", "question", "groundtruth responses")
EXPECTED = "haloquest-eval.csv / haloquest-train.csv (image_name, hallucination type, question, groundtruth responses)"


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    files = [path] if is_present(path) and path.suffix == ".csv" else sorted(path.glob("haloquest-*.csv")) if (
        path.is_dir()) else []
    if not files:
        raise unknown_layout(NAME, path, EXPECTED)
    found = [file.stem.removeprefix("haloquest-") for file in files]
    if split is not None:
        files = [file for file in files if file.stem.removeprefix("haloquest-") == split]
        require_split(path, files, split, found)
    return write_table(NAME, _rows(files, images), out, "csv + image folder", str(path))


def references(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(";") if part.strip()]


def _rows(files: list[Path], images: Path | None) -> Iterator[Row]:
    for file in files:
        with open_user_file(file, "benchmark file", error=SourceError) as handle:
            check_csv_end(handle, file, ",", SourceError)
            try:
                frame = pd.read_csv(handle, dtype=str, keep_default_na=False, encoding="utf-8")
            except UnicodeDecodeError as err:
                raise SourceError(f"{file} is not valid UTF-8 ({err}); re-encode it as UTF-8 or {REFETCH}") from err
            except ValueError as err:  # pandas' ParserError (a quoted field cut by the end of the file), no columns
                reason = " ".join(str(err).split())
                raise SourceError(f"{file} could not be read as CSV: it is cut short or damaged ({reason}); {REFETCH}"
                                  ) from err
        missing = [column for column in COLUMNS if column not in frame.columns]
        if missing:
            raise SourceError(
                f"{file}: expected the columns {', '.join(COLUMNS)}; missing {', '.join(missing)} "
                f"(found {', '.join(map(str, frame.columns))})"
            )
        split = file.stem.removeprefix("haloquest-")
        first = str(frame.columns[0])
        number_column = first if first.startswith("Unnamed") or first == "" else None  # the row-number column
        for position, row in enumerate(frame.to_dict(orient="records")):
            number = row[number_column] if number_column is not None else str(position)
            source_id = f"{split}_{number}"
            refs = references(row["groundtruth responses"])
            yield Row(
                source_id=source_id,
                image_id=str(row["image_name"]),
                question=str(row["question"]).strip(),
                answer=refs[0] if refs else "",
                answer_format="open",
                category=str(row["hallucination type"]),
                image=file_bytes(images, str(row["image_name"]), f"HaloQuest {source_id}"),
                references=refs,
                split=str(row.get("split") or split),
                extra={"image_type": str(row.get("image type", "")), "url": str(row.get("url", ""))},
            )
