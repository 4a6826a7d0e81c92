"""Nothing a file contains can hang halp or crash it (issue 23): every user file is opened by `halp.userfiles`
(regular files only, decided on the opened descriptor, bounded), and a damaged table, source or manifest is one
line naming the file.

A test that could hang before the fix (a FIFO opened for reading waits for a writer forever) runs the code in a
thread and fails when the thread has not finished in time; opening the FIFO for writing then releases it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from halp.cli import app
from halp.data import FolderImages, Sample, open_table
from halp.errors import SourceError, TableError, UserFileError
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


# ----- every command, every input file: cut, empty, garbage -------------------------------------------------------

runner = CliRunner()
DAMAGE = ("cut", "empty", "garbage")
#: A FIFO put in a file's place: opening it for reading would wait for a writer for ever.
NOT_REGULAR = "fifo"


def _one_line_error(output: str) -> str:
    """The one line a failed command prints (progress bars of a model loading aside)."""
    lines = [line for line in re.split(r"[\r\n]", output) if line.strip() and not re.search(r"\d+%\|", line)]
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    return lines[0]


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "cut":
        # Half, but never at the end of a line: a text table cut at a row boundary is a valid shorter table, which
        # nothing can tell from an intact one.
        cut = len(data) // 2
        while b"\n" in data[cut - 1 : cut + 1]:
            cut += 1
        path.write_bytes(data[:cut])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == NOT_REGULAR:
        path.unlink()
        os.mkfifo(path)
    else:  # bytes that are no format (not UTF-8 either), the file's own length
        path.write_bytes(bytes(random.Random(len(data)).getrandbits(8) for _ in range(max(len(data), 64))))


@dataclass(frozen=True)
class Input:
    """One input file of one command: `folder` (under the world) is copied, `file` in the copy damaged, and the
    command run with `args(copy, file, tmp)`."""

    name: str
    folder: str
    file: str
    args: Callable[[Path, Path, Path], list[str]]


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    """Every kind of input file a `halp` command reads, intact, each in a folder of its own."""
    import datasets

    from halp.testing import make_vqa_set
    from halp.testing import sources as published

    root = tmp_path_factory.mktemp("world")
    table, images = make_vqa_set(root / "vqa", n=4)
    frame = pd.read_csv(table, dtype=str)
    tables = root / "tables"
    tables.mkdir()
    frame.to_csv(tables / "vqa.csv", index=False, quoting=csv.QUOTE_ALL)
    frame.to_csv(tables / "vqa.tsv", index=False, sep="\t", quoting=csv.QUOTE_ALL)
    frame.to_json(tables / "vqa.jsonl", orient="records", lines=True)
    frame.to_json(tables / "vqa.json", orient="records")
    _embedded_table(tables / "vqa.parquet", rows=4)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(root / "saved"))
    shutil.copy(next((root / "saved").glob("data-*.arrow")), tables / "vqa.arrow")
    labels = root / "labels"
    labels.mkdir()
    pd.DataFrame({"question_id": frame["question_id"], "label": [0, 1, 0, 1]}).to_csv(
        labels / "labels.csv", index=False, quoting=csv.QUOTE_ALL
    )
    (labels / "export.json").write_text(json.dumps([
        {"data": {"question_id": qid}, "annotations": [{"result": [{"type": "choices", "from_name": "verdict",
                                                                     "value": {"choices": ["hallucinated"]}}]}]}
        for qid in frame["question_id"]
    ]))
    single = root / "image"
    single.mkdir()
    shutil.copy(images / frame["image_id"][0], single / "one.png")
    run = _answered_run(root / "run", frame)
    builders = {"pope_hub": published.pope_hub, "pope_json": published.pope_json, "mme_hub": published.mme_hub,
                "mme_folder": published.mme_folder, "hallusionbench_json": published.hallusionbench_json,
                "hallusionbench_hub": published.hallusionbench_hub, "mathvista_hub": published.mathvista_hub,
                "mathvista_json": published.mathvista_json, "amber": published.amber_repo,
                "haloquest": published.haloquest_csv}
    layouts = {}
    for name, build in builders.items():
        folder = root / "sources" / name
        given, images_dir = build(folder)  # what --from and --images name, kept relative to the folder
        layouts[name] = (given.relative_to(folder), images_dir.relative_to(folder) if images_dir else None)
    (root / "sources" / "layouts.json").write_text(json.dumps({k: [str(v) if v else None for v in pair]
                                                              for k, pair in layouts.items()}))
    quoted = root / "sources" / "haloquest" / "haloquest-eval.csv"  # quoted as the release is: a cut lands in a field
    pd.read_csv(quoted, dtype=str, keep_default_na=False).to_csv(quoted, index=False, quoting=csv.QUOTE_ALL)
    from halp.sources import convert

    converted = root / "converted"
    convert("pope", root / "sources" / "pope_hub", converted / "pope")
    convert("mme", root / "sources" / "mme_hub", converted / "mme")
    (converted / "weights.json").write_text(json.dumps({"pope": 1, "mme": 1}))
    return {"root": root, "images": images, "run": run, "model": checkpoint_dir("qwen2_vl")}


def _answered_run(run: Path, frame: pd.DataFrame) -> Path:
    import numpy as np

    from halp.store import rows_for, write_rows

    samples = [Sample(row.question_id, row.image_id, row.question, row.answer) for row in frame.itertuples()]
    features = {"vision_only": np.random.default_rng(0).normal(size=(len(samples), 4)).astype(np.float32)}
    run.mkdir(parents=True)
    write_rows(run / "features.h5", rows_for(samples, ["yes"] * len(samples), features),
               {"model_id": "toy", "generated": True, "max_new_tokens": 4})
    return run


def _inputs(world: dict[str, Path]) -> list[Input]:
    images = str(world["images"])
    model = ["--model", str(world["model"]), "--device", "cpu", "--dtype", "float32"]
    found: list[Input] = []
    for table in ("vqa.csv", "vqa.tsv", "vqa.jsonl", "vqa.json", "vqa.parquet", "vqa.arrow"):
        found.append(Input(f"extract --data {table}", "tables", table, lambda d, f, t: [
            "extract", *model, "--data", str(f), "--images", images, "--out", str(t / "run")]))
        found.append(Input(f"predict --data {table}", "tables", table, lambda d, f, t: [
            "predict", "--run", str(t / "no-run"), "--data", str(f), "--images", images]))
    for table in ("labels.csv", "export.json"):
        found.append(Input(f"label --labels {table}", "labels", table, lambda d, f, t: [
            "label", str(world["run"]), "--labels", str(f)]))
    found.append(Input("label RUN (its features.h5)", "run", "features.h5", lambda d, f, t: ["label", str(d)]))
    found.append(Input("probe RUN (its features.h5)", "run", "features.h5", lambda d, f, t: [
        "probe", str(d), "--labels", str(world["root"] / "labels" / "labels.csv"), "--bootstrap", "10"]))
    found.append(Input("probe --labels labels.csv", "labels", "labels.csv", lambda d, f, t: [
        "probe", str(world["run"]), "--labels", str(f), "--bootstrap", "10"]))
    found.append(Input("embed IMAGE", "image", "one.png", lambda d, f, t: [
        "embed", str(f), *model, "--out", str(t / "embedded")]))
    for analysis in ("norms", "neighbors"):
        found.append(Input(f"analyze {analysis} --images", "image", "one.png", lambda d, f, t, a=analysis: [
            "analyze", a, *model, "--images", str(d), "--out", str(t / a)]))
    sources = {
        "pope_hub": ("pope", "data/test-00000-of-00001.parquet"),
        "pope_json": ("pope", "coco_pope_random.json"),
        "mme_hub": ("mme", "data/test-00000-of-00001.parquet"),
        "mme_folder": ("mme", "MME_Benchmark_release_version/existence/000000.txt"),
        "hallusionbench_json": ("hallusionbench", "HallusionBench.json"),
        "hallusionbench_hub": ("hallusionbench", "data/image-00000-of-00001.parquet"),
        "mathvista_hub": ("mathvista", "data/testmini-00000-of-00001.parquet"),
        "mathvista_json": ("mathvista", "data/testmini.json"),
        "amber_queries": ("amber", "data/query/query_all.json"),
        "amber_annotations": ("amber", "data/annotations.json"),
        "haloquest": ("haloquest", "haloquest-eval.csv"),
    }
    layouts = json.loads((world["root"] / "sources" / "layouts.json").read_text())
    for name, (source, file) in sources.items():
        folder = name.removesuffix("_queries").removesuffix("_annotations")
        given, images_dir = layouts[folder]
        found.append(Input(f"data convert {name} {file}", f"sources/{folder}", file, lambda d, f, t, s=source,
                           g=given, i=images_dir: [
            "data", "convert", s, "--from", str(d / g), "--out", str(t / "converted"),
            *(["--images", str(d / i)] if i else [])]))
    for file in ("pope/convert.json", "pope/pope.parquet", "weights.json"):
        found.append(Input(f"data compose {file}", "converted", file, lambda d, f, t: [
            "data", "compose", "--from", str(d / "pope"), "--from", str(d / "mme"), "--out", str(t / "composite"),
            "--total", "4", "--proportions", str(d / "weights.json")]))
    return found


def test_every_command_names_a_damaged_input_file_in_one_line(tmp_path, world):
    """Each input file of each command, cut short, emptied, replaced by bytes of no format or by a FIFO: exit status
    2 before any work, one line naming the file, no traceback, no wait."""
    failures = []
    for item in _inputs(world):
        for kind in (*DAMAGE, NOT_REGULAR):
            case = tmp_path / f"{len(failures)}-{item.name.replace(' ', '_').replace('/', '_')}-{kind}"
            copy = case / "in"
            shutil.copytree(world["root"] / item.folder, copy)
            target = copy / item.file
            assert target.is_file(), f"{item.name}: the world has no {item.file}"
            _damage(target, kind)
            args = item.args(copy, target, case)
            result = _within(lambda args=args: runner.invoke(app, args), [target])
            try:
                assert result.exit_code == 2, f"exit {result.exit_code}"
                line = _one_line_error(result.output)
                assert str(target) in line, "the line does not name the file"
            except AssertionError as err:
                failures.append(f"{item.name} ({kind}): {str(err).splitlines()[0]}\n    {result.output[-600:]!r}")
    assert not failures, f"{len(failures)} case(s):\n" + "\n".join(failures)


def test_damaged_image_files_are_recorded_row_errors_and_the_run_goes_on(tmp_path, world):
    """Images are read per row: a cut, empty or garbage image is its row's error in errors.jsonl (exit status 1,
    the other rows extracted), never a stopped run or a traceback."""
    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    frame = pd.read_csv(world["root"] / "tables" / "vqa.csv", dtype=str)
    damaged = dict(zip(DAMAGE, frame["image_id"][:3], strict=True))
    for kind, image_id in damaged.items():
        _damage(images / image_id, kind)
    out = tmp_path / "run"
    result = runner.invoke(app, ["extract", "--model", str(world["model"]), "--device", "cpu", "--dtype", "float32",
                                 "--data", str(world["root"] / "tables" / "vqa.csv"), "--images", str(images),
                                 "--out", str(out), "--max-new-tokens", "2"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "3 failed" in result.output
    errors = {entry["question_id"]: entry for entry in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    ids = dict(zip(frame["image_id"], frame["question_id"], strict=True))
    assert set(errors) == {ids[image_id] for image_id in damaged.values()}
    for image_id in damaged.values():
        entry = errors[ids[image_id]]
        assert entry["error"] == "ImageError" and str(images / image_id) in entry["message"], entry


def test_a_haloquest_csv_cut_inside_a_quoted_field_is_one_line(tmp_path):
    from halp.sources import convert
    from halp.testing.sources import haloquest_csv

    root, images = haloquest_csv(tmp_path / "hq")
    csv_file = root / "haloquest-eval.csv"
    frame = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    frame.to_csv(csv_file, index=False, quoting=csv.QUOTE_ALL)  # quoted, as the release's fields with commas are
    assert convert("haloquest", root, tmp_path / "intact", images).rows == len(frame)
    text = csv_file.read_text()
    field = text.index('"', text.index("\n"))  # the first quoted field of the first row
    csv_file.write_text(text[: field + 4])
    with pytest.raises(SourceError, match=rf"{re.escape(str(csv_file))} .*cut short"):
        convert("haloquest", root, tmp_path / "out", images)


def test_converters_name_a_parquet_file_with_a_corrupt_page(tmp_path):
    from halp.sources import convert
    from halp.testing.sources import pope_hub

    root, _ = pope_hub(tmp_path / "pope")
    shard = next(root.rglob("*.parquet"))
    corrupt_parquet_column(shard, "image.bytes", row_group=0)
    with pytest.raises(SourceError, match=rf"{re.escape(str(shard))} could not be read as Parquet: it is cut short or"):
        convert("pope", root, tmp_path / "out")
    assert not (tmp_path / "out" / "pope.parquet").exists()  # nothing half-written is left


def test_compose_names_an_incomplete_manifest_and_a_missing_or_damaged_table(tmp_path):
    from halp.sources import convert
    from halp.sources.compose import compose
    from halp.testing.sources import mme_hub, pope_hub

    convert("pope", pope_hub(tmp_path / "pope")[0], tmp_path / "c" / "pope")
    convert("mme", mme_hub(tmp_path / "mme")[0], tmp_path / "c" / "mme")
    dirs = [tmp_path / "c" / "pope", tmp_path / "c" / "mme"]
    manifest = dirs[0] / "convert.json"
    good = manifest.read_text()
    manifest.write_text(json.dumps({"source": "pope"}))
    with pytest.raises(SourceError, match=rf"{re.escape(str(manifest))} is incomplete \(no table\)"):
        compose(dirs, tmp_path / "out", total=4, seed=0, proportions="equal")
    manifest.write_text(good)
    table = dirs[0] / "pope.parquet"
    data = table.read_bytes()
    table.unlink()
    with pytest.raises(SourceError, match=rf"{re.escape(str(manifest))} names the table 'pope.parquet', which is not"):
        compose(dirs, tmp_path / "out", total=4, seed=0, proportions="equal")
    table.write_bytes(data)
    corrupt_parquet_column(table, "image.bytes", row_group=0)  # the text reads; the rows drawn cannot be copied
    with pytest.raises(SourceError, match=rf"{re.escape(str(table))} could not be read as a converted table"):
        compose(dirs, tmp_path / "out", total=4, seed=0, proportions="equal")
    assert not (tmp_path / "out" / "composite.parquet").exists()


# ----- halp probe's outputs, damaged -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probed_run(tmp_path_factory) -> Path:
    """A run of 60 labelled rows with one feature, its probes trained (logreg and MLP) and saved."""
    import numpy as np

    from halp.probe import train_probes
    from halp.store import rows_for, write_rows

    run = tmp_path_factory.mktemp("probed") / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(int)
    y[:2] = [0, 1]
    samples = [Sample(f"q{i:03d}", f"img{i:03d}.png", "Is it a dog?", "no", {"kind": f"k{i % 2}"}) for i in range(60)]
    features = {"vision_only": (rng.normal(size=(60, 6)) + np.outer(y, np.ones(6))).astype(np.float32)}
    write_rows(run / "features.h5", rows_for(samples, ["yes"] * 60, features), {"model_id": "toy", "layers": [0]})
    pd.DataFrame({"question_id": [s.question_id for s in samples], "label": y}).to_csv(run / "labels.csv", index=False)
    train_probes(run, probe="both", group_by="kind", bootstrap=10, threads=1,
                 probe_params={"logreg": {"C": 0.1}, "mlp": {"hidden": (8,), "epochs": 3, "batch_size": 16}})
    return run


@pytest.mark.parametrize(
    ("file", "command"),
    [
        ("probes/results.csv", "report"),
        ("probes/predictions.csv", "report"),
        ("probes/groups.csv", "report"),
        ("probes/results.json", "report"),
        ("probes/models/vision_only__mlp.json", "load_probe"),
        ("probes/models/vision_only__mlp.safetensors", "load_probe"),
        ("probes/models/vision_only__logreg.safetensors", "load_probe"),
    ],
)
def test_damaged_probe_outputs_are_one_line_naming_the_file_and_how_to_rewrite_it(tmp_path, probed_run, file, command):
    """Before, `halp report` on a damaged predictions.csv and `halp predict`/`serve` on a damaged saved probe ended in
    a pandas, json or safetensors traceback; a results.csv cut short was read as a table of NaNs."""
    from halp.errors import RunDamagedError
    from halp.probe import load_probe

    for kind in DAMAGE:
        run = tmp_path / kind / "run"
        shutil.copytree(probed_run, run)
        target = run / file
        _damage(target, kind)
        if command == "report":
            result = runner.invoke(app, ["report", str(run)])
            assert result.exit_code == 2, (kind, result.output[-800:])
            line = _one_line_error(result.output)
        else:
            with pytest.raises(RunDamagedError) as caught:
                load_probe(target.with_suffix(""))
            line = str(caught.value)
        assert str(target) in line and "damaged" in line and "halp probe" in line, (kind, line)
