"""Nothing a file contains can hang halp or crash it (issue 23): every user file is opened by `halp.userfiles`
(regular files only, decided on the opened descriptor, bounded), and a damaged table, source or manifest is one
line naming the file.

A test that could hang before the fix (a FIFO opened for reading waits for a writer forever) runs the code in a
thread and fails when the thread has not finished in time; opening the FIFO for writing then releases it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from halp.data import FolderImages, Sample, open_table
from halp.errors import TableError, UserFileError
from halp.extract import run_extraction
from halp.testing.faults import corrupt_parquet_column
from halp.testing.runs import cpu_extract_config
from halp.testing.sources import image_bytes
from halp.userfiles import open_user_file, read_user_file

#: Seconds a call that must not block gets; far above what any of them takes, far below "forever".
NO_HANG_S = 120.0


def _within(call: Callable[[], Any], fifos: list[Path], timeout: float = NO_HANG_S) -> Any:
    """`call()` in a thread; a failure (not a hang of the test run) if it has not returned within `timeout`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed back to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # a reader blocked in open() on a FIFO returns once a writer opens it
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked for more than {timeout:.0f} s on a non-regular file")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.fixture
def odd_files(tmp_path):
    """An images folder holding, under image names, every kind of file that is not a regular file."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (40 + 8 * index, 48), ("red", "green", "blue")[index]).save(images / f"good{index}.png")
    os.mkfifo(images / "fifo.png")
    (images / "folder.png").mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(images / "socket.png"))
    (images / "to_fifo.png").symlink_to(images / "fifo.png")
    (images / "to_zero.png").symlink_to("/dev/zero")
    yield images, {
        "fifo.png": "FIFO",
        "folder.png": "a directory",
        "socket.png": "a socket",
        "to_fifo.png": "FIFO",
        "to_zero.png": "outside the images directory",
    }
    server.close()


def test_the_opener_refuses_what_is_not_a_regular_file_without_blocking(tmp_path, odd_files):
    images, _ = odd_files
    fifos = [images / "fifo.png"]
    kinds = {
        images / "fifo.png": "a FIFO",
        images / "to_fifo.png": "a FIFO",
        images / "folder.png": "a directory",
        images / "socket.png": "a socket",
        Path("/dev/null"): "a character device",
    }
    for path, kind in kinds.items():
        with pytest.raises(UserFileError, match=f"{re.escape(str(path))} is {kind}.*, not a regular file"):
            _within(lambda path=path: open_user_file(path, "image file"), fifos)
    with pytest.raises(UserFileError, match="does not exist"):
        open_user_file(tmp_path / "nothing.png")
    # Bounded: a file over the limit is refused before it is read.
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100)
    assert read_user_file(big, limit=100) == b"x" * 100
    with pytest.raises(UserFileError, match="100 bytes, more than the 99 bytes"):
        read_user_file(big, limit=99)


def test_size_probes_hashing_and_reading_refuse_non_regular_files(odd_files):
    """FolderImages.size is what token-count batching calls for every row: before the fix it opened a FIFO and
    waited for a writer forever."""
    images, expected = odd_files
    source = FolderImages(images)
    fifos = [images / "fifo.png"]
    for name, reason in expected.items():
        sample = Sample(question_id=name, image_id=name, question="Is it red?")
        assert _within(lambda sample=sample: source.size(sample), fifos) is None, name
        assert _within(lambda sample=sample: source.digests([sample]), fifos) == [""], name
        (error,) = _within(lambda sample=sample: source.read([sample]), fifos)
        assert reason in str(error), (name, str(error))
    good = Sample(question_id="good1", image_id="good1.png", question="Is it green?")
    assert source.size(good) == (48, 48) and len(source.digests([good])[0]) == 64


@pytest.mark.parametrize("workers", [0, 1])
def test_non_regular_image_files_are_row_errors_and_the_run_finishes(tmp_path, checkpoint_dir, odd_files, workers):
    images, expected = odd_files
    table = tmp_path / "t.csv"
    names = ["good0.png", *expected, "good1.png", "good2.png"]
    table.write_text("question_id,image_id,question\n" + "".join(f"q{i},{n},Is it red?\n" for i, n in enumerate(names)))
    out = tmp_path / f"run{workers}"
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, workers=workers, max_new_tokens=2)
    summary = _within(lambda: run_extraction(config), [images / "fifo.png"])
    errors = {entry["question_id"]: entry for entry in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    bad = {f"q{i}": expected[name] for i, name in enumerate(names) if name in expected}
    assert set(errors) == set(bad) and summary.processed == 3
    for question_id, reason in bad.items():
        assert errors[question_id]["error"] == "ImageError" and reason in errors[question_id]["message"]


def test_a_table_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifos = []
    for name in ("t.csv", "t.parquet", "t.jsonl", "t.arrow", "t.json"):
        os.mkfifo(tmp_path / name)
        fifos.append(tmp_path / name)
    for fifo in fifos:
        with pytest.raises(TableError, match=f"input table {fifo} is a FIFO"):
            _within(lambda fifo=fifo: open_table(fifo), fifos)


# ----- damaged tables ----------------------------------------------------------------------------------------------


def _embedded_table(path: Path, rows: int = 6, row_group: int = 2) -> list[str]:
    ids = [f"q{i}" for i in range(rows)]
    pq.write_table(
        pa.table(
            {
                "question_id": ids,
                "image_id": [f"img{i}.png" for i in range(rows)],
                "question": [f"Is square {i} red?" for i in range(rows)],
                "image": [{"bytes": image_bytes(i), "path": f"img{i}.png"} for i in range(rows)],
            }
        ),
        path,
        row_group_size=row_group,
    )
    return ids


def test_a_corrupt_image_page_fails_its_rows_and_the_rest_are_extracted(tmp_path, checkpoint_dir):
    """Before the fix the damaged page stopped `extract` in planning with a pyarrow traceback (resume hashing)."""
    table = tmp_path / "vqa.parquet"
    ids = _embedded_table(table)
    corrupt_parquet_column(table, "image.bytes", row_group=1)  # rows 2 and 3; their text is intact
    out = tmp_path / "run"
    summary = run_extraction(cpu_extract_config(checkpoint_dir("qwen2_vl"), table, None, out, max_new_tokens=2))
    errors = {entry["question_id"]: entry for entry in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"q2", "q3"} and summary.processed == 4 and not summary.finished
    for entry in errors.values():
        assert entry["error"] == "ImageError" and "vqa.parquet row" in entry["message"]
        assert "damaged" in entry["message"] and "\x0f" not in entry["message"]
    assert [s.question_id for s in open_table(table).samples] == ids


def test_a_corrupt_text_page_is_a_table_error_naming_the_file(tmp_path):
    table = tmp_path / "vqa.parquet"
    _embedded_table(table)
    corrupt_parquet_column(table, "question", row_group=2)
    with pytest.raises(TableError, match=f"{table} could not be read as Parquet: it is damaged"):
        open_table(table)


def test_a_jsonl_table_finds_its_image_field_on_any_line_and_ids_rows_without_one(tmp_path):
    """Before the fix a null image on the first line kept `image` as a column, which became every row's image_id."""
    import base64

    path = tmp_path / "vqa.jsonl"
    lines = [{"question_id": "q0", "question": "Is it red?", "image": None}]
    for index in range(1, 4):
        url = "data:image/png;base64," + base64.b64encode(image_bytes(index)).decode()
        lines.append({"question_id": f"q{index}", "question": "Is it red?", "image": url})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = open_table(path)
    assert table.embedded and table.identity["image_column"] == "image"
    assert [s.image_id for s in table.samples] == ["row-0", "row-1", "row-2", "row-3"]
    assert "image" not in table.samples[0].meta
    loaded = table.images.load(list(table.samples))
    assert "no bytes" in str(loaded[0]) and all(isinstance(image, Image.Image) for image in loaded[1:])
