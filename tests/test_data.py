"""Input tables: aliases, metadata, and clear errors for bad tables; images in every mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from halp.capture import parse_layers
from halp.data import ImageError, TableError, load_image, read_samples


def test_seed_aliases_and_metadata(tmp_path):
    table = tmp_path / "vqa.csv"
    table.write_text("question_id,image_name,question,gt_answer,category\nq1,a.png,Is it red?,yes,color\n")
    (sample,) = read_samples(table)
    assert (sample.image_id, sample.ground_truth, sample.meta) == ("a.png", "yes", {"category": "color"})


def test_jsonl_and_parquet(tmp_path):
    rows = [{"question_id": 1, "image": "a.png", "question": "Q?", "dataset": "pope"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_samples(jsonl)[0].question_id == "1"
    import pandas as pd

    parquet = tmp_path / "t.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    assert read_samples(parquet)[0].meta == {"dataset": "pope"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("id,image_id,question\n1,a,b\n", "question_id"),
        ("question_id,question\n1,b\n", r"no image_id \(or image_name, image, image_path\) column"),
        ("question_id,image_id,question\n1,a,b\n1,c,d\n", "duplicate question_id"),
    ],
)
def test_bad_tables_are_refused_clearly(tmp_path, content, message):
    table = tmp_path / "t.csv"
    table.write_text(content)
    with pytest.raises(TableError, match=message):
        read_samples(table)


def test_non_utf8_table(tmp_path):
    table = tmp_path / "t.csv"
    table.write_bytes("question_id,image_id,question\n1,a,caf\xe9\n".encode("latin-1"))
    with pytest.raises(TableError, match="UTF-8"):
        read_samples(table)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_image_modes_become_rgb(tmp_path, mode):
    array = (np.arange(24 * 16).reshape(16, 24) % 256).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 257)  # a 16-bit grayscale PNG
        assert image.mode == "I;16"
    else:
        image = Image.fromarray(array, "L").convert(mode)
    suffix = ".tif" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"x{suffix}")
    loaded = load_image(tmp_path, f"x{suffix}")
    assert loaded.mode == "RGB" and loaded.size == (24, 16)
    assert np.asarray(loaded).max() > 100  # 16-bit is scaled, not clipped to black or white


def test_paths_outside_images_dir_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    with pytest.raises(ImageError, match="outside"):
        load_image(tmp_path / "images", "../secret.png")
    with pytest.raises(ImageError, match="outside"):
        load_image(tmp_path / "images", str(tmp_path / "secret.png"))


def test_layer_specs():
    assert parse_layers("halp", 28) == [0, 7, 14, 21, 27]
    assert parse_layers("halp", 32) == [0, 8, 16, 24, 31]
    assert parse_layers("0,7,-1", 28) == [0, 7, 27]
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("28", 28)
    with pytest.raises(ValueError, match="expected"):
        parse_layers("first", 28)
