"""Input tables (CSV, JSONL, Parquet) and images.

The column aliases are those of the HALP seeds, so their VQA tables load unchanged.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from halp.errors import ImageError, TableError

COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "question_id": ("question_id",),
    "image_id": ("image_id", "image_name", "image", "image_path"),
    "question": ("question",),
    "ground_truth": ("answer", "gt_answer", "ground_truth"),
}
REQUIRED = ("question_id", "image_id", "question")



@dataclass(frozen=True)
class Sample:
    question_id: str
    image_id: str
    question: str
    ground_truth: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    #: The row's content identity (halp.store.row_digest), set when its image is loaded for extraction.
    row_sha256: str = ""


def _as_text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def read_frame(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"input table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".tsv"}:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if suffix in {".jsonl", ".ndjson"}:
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            return pd.read_json(path, dtype=False)
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise TableError(f"{path} is not valid UTF-8 text ({err}); re-encode it as UTF-8") from err
    except ValueError as err:
        raise TableError(f"{path} could not be parsed as {suffix[1:]}: {err}") from err
    raise TableError(f"{path}: unsupported table format {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")


def resolve_columns(columns: list[str]) -> dict[str, str]:
    """Map canonical names to the table's column names, or fail listing the accepted aliases."""
    resolved: dict[str, str] = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        found = next((alias for alias in aliases if alias in columns), None)
        if found is not None:
            resolved[canonical] = found
    missing = [name for name in REQUIRED if name not in resolved]
    if missing:
        details = "; ".join(f"{name}: one of {', '.join(COLUMN_ALIASES[name])}" for name in missing)
        raise TableError(f"missing required column(s) — {details}. Columns present: {', '.join(columns)}")
    return resolved


def read_samples(path: str | Path) -> list[Sample]:
    """Read and validate a VQA table; every problem is reported before a model is loaded."""
    frame = read_frame(path)
    columns = [str(column) for column in frame.columns]
    frame.columns = columns
    resolved = resolve_columns(columns)
    used = set(resolved.values())
    meta_columns = [column for column in columns if column not in used]
    unnamed = [repr(column) for column in meta_columns if not column.strip() or "\x00" in column]
    if unnamed:
        # Metadata is stored under the column's name (percent-encoded where HDF5 needs it): it needs one.
        raise TableError(f"{path}: column name(s) {', '.join(unnamed)} cannot name metadata; rename or drop them")
    if frame.empty:
        raise TableError(f"{path} has a header but no rows: nothing to extract")

    ids = [_as_text(value) for value in frame[resolved["question_id"]]]
    empty = [index for index, qid in enumerate(ids) if not qid.strip()]
    if empty:
        raise TableError(f"{path}: empty question_id in row(s) {', '.join(str(i + 2) for i in empty[:10])}")
    duplicates = sorted(qid for qid, count in Counter(ids).items() if count > 1)
    if duplicates:
        shown = ", ".join(duplicates[:10])
        raise TableError(f"{path}: duplicate question_id values ({len(duplicates)}), e.g. {shown}")

    samples = []
    for row_index, row in enumerate(frame.to_dict(orient="records")):
        samples.append(
            Sample(
                question_id=ids[row_index],
                image_id=_as_text(row[resolved["image_id"]]),
                question=_as_text(row[resolved["question"]]),
                ground_truth=_as_text(row[resolved["ground_truth"]]) if "ground_truth" in resolved else "",
                meta={column: _as_text(row[column]) for column in meta_columns},
            )
        )
    return samples



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


def _image_file(images_dir: str | Path, image_id: str) -> Path:
    try:
        path = resolve_image_path(images_dir, image_id)
        exists = path.is_file()
    except (OSError, ValueError) as err:  # a name longer than NAME_MAX, a NUL byte, ...
        raise ImageError(f"image id {image_id!r} is not a usable file name under {images_dir}: {err}") from err
    if not exists:
        raise ImageError(f"image file {path} does not exist")
    return path


def image_file_sha256(images_dir: str | Path, image_id: str) -> str:
    """SHA-256 of the image file's bytes; "" when there is no readable file (the row will fail when loaded)."""
    try:
        with _image_file(images_dir, image_id).open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (ImageError, OSError):
        return ""


def read_image(images_dir: str | Path, image_id: str, exif_orientation: bool = True) -> tuple[Image.Image, str]:
    """`load_image`, and the SHA-256 of the very bytes decoded (the row's content identity, see halp.store)."""
    path = _image_file(images_dir, image_id)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"image {path} cannot be read: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
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
