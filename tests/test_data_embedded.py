"""Tables that embed their images: Parquet/Arrow written by `datasets`, save_to_disk folders, hub datasets loaded
by `datasets.load_dataset` from local files, JSONL with data URLs, URLs through fsspec; images read per batch."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

from halp.data import ImageError, TableError, open_table
from halp.testing.sources import image_bytes

datasets = pytest.importorskip("datasets")


def _dataset(n: int = 5, with_image_id: bool = False):
    rows = {
        "question_id": [f"q{i}" for i in range(n)],
        "question": [f"Is square {i} red?" for i in range(n)],
        "answer": ["yes" if i % 2 else "no" for i in range(n)],
        "category": ["colour"] * n,
        "image": [Image.open(__import__("io").BytesIO(image_bytes(i))) for i in range(n)],
    }
    if with_image_id:
        rows["image_id"] = [f"img{i}.png" for i in range(n)]
    features = datasets.Features(
        {**{key: datasets.Value("string") for key in rows if key != "image"}, "image": datasets.Image()}
    )
    return datasets.Dataset.from_dict(rows, features=features)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _expected(seed: int) -> np.ndarray:
    return _pixels(Image.open(__import__("io").BytesIO(image_bytes(seed))))


def test_parquet_written_by_datasets_embeds_images(tmp_path):
    path = tmp_path / "vqa.parquet"
    _dataset(5).to_parquet(str(path))
    table = open_table(path)
    assert table.embedded and table.identity["image_column"] == "image"
    assert [s.question_id for s in table.samples] == [f"q{i}" for i in range(5)]
    assert [s.image_row for s in table.samples] == list(range(5))
    assert table.samples[1].ground_truth == "yes" and table.samples[1].meta == {"category": "colour"}
    # The rows' images are read when a batch asks for them, in the batch's order, each its own image.
    loaded = table.images.load([table.samples[3], table.samples[0]])
    assert np.array_equal(_pixels(loaded[0]), _expected(3)) and np.array_equal(_pixels(loaded[1]), _expected(0))


def test_parquet_row_groups_are_read_one_at_a_time(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "grouped.parquet"
    pq.write_table(_dataset(7).data.table, path, row_group_size=2)  # 4 row groups
    table = open_table(path)
    order = [6, 0, 5, 2]
    for index, image in zip(order, table.images.load([table.samples[i] for i in order]), strict=True):
        assert np.array_equal(_pixels(image), _expected(index))


def test_image_id_from_table_or_stored_path(tmp_path):
    with_ids = tmp_path / "ids.parquet"
    _dataset(2, with_image_id=True).to_parquet(str(with_ids))
    assert [s.image_id for s in open_table(with_ids).samples] == ["img0.png", "img1.png"]
    without = tmp_path / "noids.parquet"
    _dataset(2).to_parquet(str(without))
    assert [s.image_id for s in open_table(without).samples] == ["row-0", "row-1"]  # PIL images have no path


def test_save_to_disk_folder_and_arrow_file(tmp_path):
    folder = tmp_path / "saved"
    _dataset(4).save_to_disk(str(folder))
    table = open_table(folder)
    assert table.embedded and len(table.samples) == 4
    assert np.array_equal(_pixels(table.images.load([table.samples[2]])[0]), _expected(2))
    arrow = next(folder.glob("data-*.arrow"))
    from_file = open_table(arrow)
    assert [s.question_id for s in from_file.samples] == [s.question_id for s in table.samples]


def test_save_to_disk_dataset_dict_names_its_splits(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict({"test": _dataset(2)}).save_to_disk(str(folder))
    with pytest.raises(TableError, match="DatasetDict with splits test"):
        open_table(folder)


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(TableError, match=r"expected state\.json.*found x\.txt"):
        open_table(tmp_path)


def test_hub_dataset_through_load_dataset_and_missing_split(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _dataset(3).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    table = open_table(None, hf_dataset=str(repo), split="test")
    assert table.embedded and len(table.samples) == 3
    assert table.identity["split"] == "test" and table.identity["hf_dataset"] == str(repo)
    assert np.array_equal(_pixels(table.images.load([table.samples[1]])[0]), _expected(1))
    with pytest.raises(TableError, match="validation"):
        open_table(None, hf_dataset=str(repo), split="validation")
    with pytest.raises(TableError, match="name the split with split="):  # --split on the command line
        open_table(None, hf_dataset=str(repo))


def test_jsonl_data_urls_and_base64(tmp_path):
    path = tmp_path / "vqa.jsonl"
    def data_url(seed: int) -> str:
        return "data:image/png;base64," + base64.b64encode(image_bytes(seed)).decode()

    lines = [
        {"question_id": "a", "question": "Q?", "image": data_url(1)},
        {"question_id": "b", "question": "Q?", "image": data_url(2)},
        {"question_id": "c", "question": "Q?", "image": "data:image/png;base64,bm90IGFuIGltYWdl"},  # "not an image"
        {"question_id": "d", "question": "Q?", "image": "data:image/png;base64,"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    table = open_table(path)
    assert table.embedded and [s.image_row for s in table.samples] == [0, 1, 2, 3]
    assert "image" not in table.samples[0].meta  # the bytes are not kept with the rows
    loaded = table.images.load(table.samples)
    assert np.array_equal(_pixels(loaded[1]), _expected(2))
    assert isinstance(loaded[2], ImageError) and "cannot be decoded" in str(loaded[2])
    assert isinstance(loaded[3], ImageError) and "no bytes" in str(loaded[3])

    plain = tmp_path / "b64.jsonl"
    plain.write_text(json.dumps({"question_id": "x", "question": "Q?",
                                 "image_base64": base64.b64encode(image_bytes(4)).decode()}) + "\n")
    assert np.array_equal(_pixels(open_table(plain).images.load(open_table(plain).samples)[0]), _expected(4))


def test_missing_image_bytes_is_that_rows_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = image_bytes(1)
    table = pa.table({
        "question_id": ["ok", "empty", "corrupt"],
        "question": ["Q?"] * 3,
        "image": [{"bytes": good, "path": "a.png"}, {"bytes": None, "path": "b.png"},
                  {"bytes": good[:20], "path": "c.png"}],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    opened = open_table(path)
    assert [s.image_id for s in opened.samples] == ["a.png", "b.png", "c.png"]
    ok, empty, corrupt = opened.images.load(opened.samples)
    assert isinstance(ok, Image.Image)
    assert isinstance(empty, ImageError) and "empty" in str(empty) and "no bytes" in str(empty)
    assert isinstance(corrupt, ImageError) and "corrupt" in str(corrupt)


def test_csv_without_images_folder_says_so(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question_id,image_id,question\n1,a.png,Q?\n")
    table = open_table(path)
    assert not table.embedded
    with pytest.raises(TableError, match="give their folder as images="):  # --images on the command line
        table.image_source(None)


def test_urls_go_through_fsspec(tmp_path):
    import fsspec

    path = tmp_path / "remote.parquet"
    _dataset(2).to_parquet(str(path))
    # file:// takes the same route as hf://datasets/...: fsspec resolves the file system, pyarrow reads through it.
    table = open_table(f"file://{path}")
    assert table.embedded and np.array_equal(_pixels(table.images.load([table.samples[1]])[0]), _expected(1))
    filesystem, inner = fsspec.core.url_to_fs("hf://datasets/lmms-lab/POPE/data/test-00000-of-00003.parquet")
    assert type(filesystem).__name__ == "HfFileSystem" and inner.startswith("datasets/lmms-lab/POPE")
    with pytest.raises(TableError, match="does not exist"):
        open_table(f"file://{tmp_path}/missing.parquet")


def test_image_sources_pickle_for_worker_processes(tmp_path):
    import pickle

    path = tmp_path / "vqa.parquet"
    _dataset(3).to_parquet(str(path))
    saved = tmp_path / "saved"
    _dataset(3).save_to_disk(str(saved))
    for data in (path, saved):
        table = open_table(data)
        table.images.load(table.samples[:1])  # opened and cached in this process
        copy = pickle.loads(pickle.dumps(table.images))
        assert np.array_equal(_pixels(copy.load([table.samples[2]])[0]), _expected(2))


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"question_id": "a", "question": "Q?", "image_id": "a.png"}\n'
                     + '{"question_id": "b", "question": "caf\u00e9?", "image_id": "b.png"}\n'.encode("latin-1"))
    with pytest.raises(TableError, match="line 2 is not valid UTF-8"):
        open_table(path)


def test_planning_sizes_come_from_the_embedded_images_headers(tmp_path):
    """Token-count planning reads each embedded image's size from its header, never decoding the pixels: a row
    whose bytes stop after the header has its size, and fails only when the worker decodes it."""
    parquet = tmp_path / "vqa.parquet"
    _dataset(3).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    _dataset(3).save_to_disk(str(saved))
    jsonl = tmp_path / "vqa.jsonl"
    cut = image_bytes(2, size=(40, 24))[:60]  # the PNG header (IHDR) is whole, the pixel data is not
    lines = [{"question_id": "a", "question": "Q?", "image": {"bytes": base64.b64encode(image_bytes(1)).decode()}},
             {"question_id": "b", "question": "Q?", "image": {"bytes": base64.b64encode(cut).decode()}}]
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for data in (parquet, saved, jsonl):
        table = open_table(data)
        for sample, image in zip(table.samples, table.images.load(table.samples), strict=True):
            if isinstance(image, Image.Image):
                assert table.images.size(sample) == (image.height, image.width), (data, sample.question_id)
    table = open_table(jsonl)
    assert table.images.size(table.samples[1]) == (24, 40)
    assert isinstance(table.images.load([table.samples[1]])[0], ImageError)
