"""`halp data convert` for the six benchmarks in their published layouts, `halp data compose`, and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from halp.cli import app
from halp.data import open_table
from halp.errors import SourceError
from halp.sources import convert
from halp.sources.compose import STUDY_COUNTS, compose, largest_remainder
from halp.testing import sources as fixtures

runner = CliRunner()


def _convert(source, build, into, out):
    path, images = build(into)
    return convert(source, path, out, images)


def _by_id(summary) -> dict[str, dict]:
    return {row["question_id"]: row for row in _rows(summary)}


def _rows(summary) -> list[dict]:
    return pq.read_table(summary.table).drop_columns(["image"]).to_pylist()


@pytest.mark.parametrize(
    ("source", "build", "rows", "categories"),
    [
        ("amber", fixtures.amber_repo, 6, {"generative": 2, "discriminative-relation": 1}),
        ("haloquest", fixtures.haloquest_csv, 4, {"false premises": 2, "visually challenging": 1}),
        ("pope", fixtures.pope_hub, 12, {"adversarial": 4, "popular": 4, "random": 4}),
        ("pope", fixtures.pope_json, 6, {"adversarial": 3, "random": 3}),
        ("mme", fixtures.mme_hub, 6, {"existence": 2, "count": 2, "celebrity": 2}),
        ("mme", fixtures.mme_folder, 8, {"existence": 4, "artwork": 4}),
        ("hallusionbench", fixtures.hallusionbench_json, 4, {"chart": 4}),
        ("mathvista", fixtures.mathvista_hub, 4, {"general-vqa": 2, "math-targeted-vqa": 2}),
    ],
)
def test_each_published_layout_converts(tmp_path, source, build, rows, categories):
    path, images = build(tmp_path / "in")
    summary = convert(source, path, tmp_path / "out", images)
    assert summary.rows == rows
    assert categories.items() <= summary.categories.items()
    table = open_table(summary.table)  # halp reads its own output as a table that embeds its images
    assert table.embedded and len(table.samples) == rows
    assert all(s.question_id.startswith(f"{source}_") for s in table.samples)
    assert {s.meta["dataset"] for s in table.samples} == {source}
    assert all(isinstance(image, Image.Image) for image in table.images.load(table.samples))
    manifest = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert manifest["source"] == source and manifest["rows"] == rows


def test_converted_images_are_the_published_bytes(tmp_path):
    path, images = fixtures.amber_repo(tmp_path / "in")
    summary = convert("amber", path, tmp_path / "out", images)
    stored = pq.read_table(summary.table, columns=["question_id", "image"]).to_pylist()
    first = next(row for row in stored if row["question_id"] == "amber_2")
    assert first["image"]["bytes"] == (images / "AMBER_2.jpg").read_bytes()
    assert first["image"]["path"] == "AMBER_2.jpg"


def test_source_quirks(tmp_path):
    pope = _by_id(_convert("pope", fixtures.pope_hub, tmp_path / "p", tmp_path / "po"))
    # question_id restarts per sampling: the sampling is part of halp's id.
    assert {"pope_adversarial_1", "pope_random_1"} <= set(pope) and pope["pope_random_1"]["answer"] == "yes"

    mme = _rows(_convert("mme", fixtures.mme_hub, tmp_path / "m", tmp_path / "mo"))
    pair = [r for r in mme if json.loads(r["extra"])["pair"] == "existence/0000"]
    assert [(r["question_id"], r["answer"]) for r in pair] == [("mme_existence/0000_1", "yes"),
                                                              ("mme_existence/0000_2", "no")]

    hb_dir = tmp_path / "h"
    hb = _convert("hallusionbench", fixtures.hallusionbench_json, hb_dir, tmp_path / "ho")
    assert [item.source_id for item in hb.skipped] == ["VS_video_0_0_0"]
    assert "without a figure" in hb.skipped[0].reason
    assert "VS_video_0_0_0" in (tmp_path / "ho" / "skipped.jsonl").read_text()
    edited = next(r for r in _rows(hb) if r["question_id"] == "hallusionbench_VD_chart_0_1_0")
    assert edited["answer"] == "no" and json.loads(edited["references"])[1] == "The bar is below 10."

    mv = _by_id(_convert("mathvista", fixtures.mathvista_hub, tmp_path / "v", tmp_path / "vo"))
    choice = mv["mathvista_1"]
    assert choice["question"].endswith("Choices:\n(A) circle\n(B) square\n(C) triangle")
    assert (choice["answer"], choice["answer_format"]) == ("B", "choice")
    assert json.loads(mv["mathvista_2"]["extra"])["unit"] == "cm"
    assert json.loads(mv["mathvista_3"]["extra"])["precision"] == 2
    assert mv["mathvista_4"]["answer_format"] == "text"

    hq = _by_id(_convert("haloquest", fixtures.haloquest_csv, tmp_path / "q", tmp_path / "qo"))
    assert json.loads(hq["haloquest_eval_2"]["references"]) == [
        "The license plate is not visible in the picture.", "We can not see the plate"]
    assert hq["haloquest_eval_1"]["answer"] == "Six fingers"

    amber = _by_id(_convert("amber", fixtures.amber_repo, tmp_path / "a", tmp_path / "ao"))
    assert amber["amber_1"]["answer_format"] == "objects"
    assert json.loads(amber["amber_1"]["extra"])["hallucinated_objects"] == ["cat", "frisbee", "person"]
    assert (amber["amber_3"]["answer"], amber["amber_3"]["category"]) == ("yes", "discriminative-hallucination")


# ----- bad input -------------------------------------------------------------------------------------------
def test_unknown_layout_names_expected_and_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match=r"not a pope layout.*expected .*coco_pope.*found notes\.txt"):
        convert("pope", tmp_path, tmp_path / "out")
    with pytest.raises(SourceError, match=r"unknown source 'vqa2'.*amber"):
        convert("vqa2", tmp_path, tmp_path / "out")
    result = runner.invoke(app, ["data", "convert", "mme", "--from", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "expected" in result.output and "notes.txt" in result.output


def test_hub_parquet_without_the_columns_is_unknown(tmp_path):
    import pandas as pd

    pd.DataFrame({"foo": [1]}).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(SourceError, match="not a mathvista layout"):
        convert("mathvista", tmp_path, tmp_path / "out")


def test_missing_image_bytes_skip_the_row_with_its_reason(tmp_path):
    import pyarrow as pa

    path, _ = fixtures.pope_hub(tmp_path / "in", categories=("random",), per=3)
    shard = next(path.rglob("*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": None, "path": None}
    column = pa.array(images, table.column("image").type)
    table = table.set_column(table.schema.get_field_index("image"), "image", column)
    pq.write_table(table, shard)
    summary = convert("pope", path, tmp_path / "out")
    assert summary.rows == 2 and [s.source_id for s in summary.skipped] == ["random_2"]
    assert "no bytes" in summary.skipped[0].reason


def test_missing_image_file_skips_the_row(tmp_path):
    path, images = fixtures.haloquest_csv(tmp_path / "in")
    (images / "b2.png").unlink()
    summary = convert("haloquest", path, tmp_path / "out", images)
    assert summary.rows == 3 and "b2.png does not exist" in summary.skipped[0].reason


def test_non_utf8_json_is_refused(tmp_path):
    path, _ = fixtures.hallusionbench_json(tmp_path / "in")
    text = path.read_text().replace("bar chart", "caf\u00e9 chart")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SourceError, match="not valid UTF-8"):
        convert("hallusionbench", path, tmp_path / "out")


def test_a_split_that_does_not_exist(tmp_path):
    path, _ = fixtures.mathvista_hub(tmp_path / "in")
    with pytest.raises(SourceError, match="no split 'test'; the splits found are testmini"):
        convert("mathvista", path, tmp_path / "out", split="test")
    assert convert("mathvista", path, tmp_path / "out", split="testmini").rows == 4
    pope, images = fixtures.pope_json(tmp_path / "pope")
    with pytest.raises(SourceError, match="no split 'popular'; the splits found are adversarial, random"):
        convert("pope", pope, tmp_path / "o2", images, split="popular")


def test_ids_are_prefixed_so_sources_do_not_clash(tmp_path):
    """POPE and MME both number from 1; prefixed, they coexist; the same source twice is refused."""
    pope_dir, mme_dir = tmp_path / "pope", tmp_path / "mme"
    _convert("pope", fixtures.pope_json, tmp_path / "p", pope_dir)
    _convert("mme", fixtures.mme_folder, tmp_path / "m", mme_dir)
    summary = compose([pope_dir, mme_dir], tmp_path / "mix", total=6, seed=0, proportions="equal")
    ids = pq.read_table(summary.table, columns=["question_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == 6
    again = tmp_path / "pope2"
    _convert("pope", fixtures.pope_json, tmp_path / "p2", again)
    with pytest.raises(SourceError, match="pope is given twice"):
        compose([pope_dir, again], tmp_path / "mix2", total=4, seed=0, proportions="equal")


# ----- compose ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    dirs = []
    for source, build in fixtures.FIXTURES.items():
        path, images = build(root / f"in-{source}")
        convert(source, path, root / source, images)
        dirs.append(root / source)
    return dirs


def test_largest_remainder_adds_up():
    counts = largest_remainder({k: float(v) for k, v in STUDY_COUNTS.items()}, 10_000)
    assert counts == STUDY_COUNTS
    small = largest_remainder({k: float(v) for k, v in STUDY_COUNTS.items()}, 20)
    assert sum(small.values()) == 20 and small["amber"] == 8 and small["haloquest"] == 6


def test_compose_is_reproducible_and_stratified(tmp_path, converted):
    first = compose(converted, tmp_path / "a", total=12, seed=7, proportions="study")
    second = compose(converted, tmp_path / "b", total=12, seed=7, proportions="study")
    other = compose(converted, tmp_path / "c", total=12, seed=8, proportions="study")

    def ids(summary):
        return pq.read_table(summary.table, columns=["question_id"]).column(0).to_pylist()

    assert ids(first) == ids(second) and ids(first) != ids(other)
    assert len(ids(first)) == 12
    manifest = json.loads(first.manifest.read_text())
    drawn = {s: v["drawn"] for s, v in manifest["sources"].items()}
    assert drawn == {"amber": 5, "haloquest": 3, "pope": 1, "mme": 1, "hallusionbench": 1, "mathvista": 1}
    for source, info in manifest["sources"].items():
        listed = [qid for values in info["question_ids"].values() for qid in values]
        assert len(listed) == info["drawn"] and set(listed) <= set(ids(first))
        assert all(qid.startswith(f"{source}_") for qid in listed)
    table = open_table(first.table)
    assert table.embedded and all(isinstance(i, Image.Image) for i in table.images.load(table.samples[:5]))


def test_compose_proportions_file_and_bad_quota(tmp_path, converted):
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"amber": 1, "haloquest": 0, "pope": 1, "mme": 0, "hallusionbench": 0,
                                   "mathvista": 0}))
    summary = compose(converted, tmp_path / "f", total=8, seed=1, proportions=str(weights))
    assert summary.drawn == {"amber": 4, "haloquest": 0, "pope": 4, "mme": 0, "hallusionbench": 0, "mathvista": 0}
    # Stratified: POPE's 3 categories of 4 rows give 2, 1, 1 of its 4.
    pope = json.loads(summary.manifest.read_text())["sources"]["pope"]["categories"]
    assert sorted(pope.values()) == [1, 1, 2]
    with pytest.raises(SourceError, match="amber has 6 rows but its share of total=60 is 10"):
        compose(converted, tmp_path / "g", total=60, seed=1, proportions="equal")
    weights.write_text(json.dumps({"amber": 1}))
    with pytest.raises(SourceError, match="missing haloquest"):
        compose(converted, tmp_path / "h", total=8, seed=1, proportions=str(weights))


def test_compose_cli(tmp_path, converted):
    args = ["data", "compose", "--out", str(tmp_path / "mix"), "--total", "12", "--seed", "3"]
    for directory in converted:
        args += ["--from", str(directory)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 rows" in result.output and (tmp_path / "mix" / "manifest.json").is_file()


def test_convert_cli(tmp_path):
    path, images = fixtures.amber_repo(tmp_path / "in")
    result = runner.invoke(app, ["data", "convert", "amber", "--from", str(path), "--images", str(images),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "amber: 6 rows" in result.output


def test_image_pixels_survive_conversion(tmp_path):
    path, _ = fixtures.mathvista_hub(tmp_path / "in")
    table = open_table(convert("mathvista", path, tmp_path / "out").table)
    image = table.images.load([table.samples[0]])[0]
    expected = Image.open(io.BytesIO(fixtures.image_bytes(100))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_more_published_layouts(tmp_path):
    hb = _convert("hallusionbench", fixtures.hallusionbench_hub, tmp_path / "h", tmp_path / "ho")
    assert hb.rows == 2 and [s.source_id for s in hb.skipped] == ["VS_chart_3_0_1"]
    assert {row["split"] for row in _rows(hb)} == {"image"}
    only_images = convert("hallusionbench", tmp_path / "h", tmp_path / "ho2", split="image")
    assert only_images.rows == 2 and not only_images.skipped

    mv = _by_id(_convert("mathvista", fixtures.mathvista_json, tmp_path / "v", tmp_path / "vo"))
    assert (mv["mathvista_7"]["answer"], mv["mathvista_7"]["answer_format"]) == ("4", "number")
    assert (mv["mathvista_8"]["answer"], mv["mathvista_8"]["category"]) == ("B", "general-vqa")
    assert mv["mathvista_8"]["question"].endswith("(A) Yes\n(B) No")

    path, images = fixtures.amber_repo(tmp_path / "a")
    queries = json.loads((path / "data" / "query" / "query_all.json").read_text())
    (path / "data" / "query" / "query_generative.json").write_text(json.dumps(queries[:2]))
    assert convert("amber", path, tmp_path / "ao", images, split="generative").rows == 2
    with pytest.raises(SourceError, match="no AMBER query set 'video'"):
        convert("amber", path, tmp_path / "ao2", images, split="video")
