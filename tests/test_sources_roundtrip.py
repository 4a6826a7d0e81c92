"""From the six benchmarks' published files to a probe: convert -> compose -> extract (tiny checkpoint, images
embedded, no --images) -> label (source rules) -> probe; a corrupt embedded image is that row's error; a rerun
resumes, and rows are identified by content (embedded bytes included)."""

from __future__ import annotations

import csv
import json

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.sources import convert
from halp.sources.compose import compose
from halp.store import read_strings
from halp.testing import sources as fixtures

runner = CliRunner()


def _extract(checkpoint, data, out, *extra):
    return runner.invoke(
        app,
        ["extract", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--device", "cpu",
         "--dtype", "float32", "--batch-size", "4", "--max-new-tokens", "3", *extra],
    )


@pytest.fixture(scope="module")
def composite(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    dirs = []
    for source, build in fixtures.FIXTURES.items():
        path, images = build(root / f"in-{source}")
        convert(source, path, root / source, images)
        dirs.append(root / source)
    return compose(dirs, root / "mix", total=24, seed=0, proportions="equal")


def test_convert_compose_extract_label_probe(tmp_path, checkpoint_dir, composite):
    run = tmp_path / "run"
    result = _extract(checkpoint_dir("qwen2_vl"), composite.table, run)
    assert result.exit_code == 0, result.output
    with h5py.File(run / "features.h5", "r") as handle:
        ids = read_strings(handle["question_id"])
        datasets_column = read_strings(handle["meta"]["dataset"])
        assert handle["query_token"]["layer_0"].shape[0] == 24
    expected = pq.read_table(composite.table, columns=["question_id"]).column(0).to_pylist()
    assert ids == expected
    assert set(datasets_column) == {"amber", "haloquest", "pope", "mme", "hallusionbench", "mathvista"}
    identity = json.loads((run / "run.json").read_text())
    assert identity["data"] == {"image_column": "image"}  # a local table: no path (a moved copy resumes)

    assert runner.invoke(app, ["label", str(run)]).exit_code == 0
    with (run / "labels.csv").open() as handle:
        labels = list(csv.DictReader(handle))
    assert [row["question_id"] for row in labels] == ids
    # AMBER generative and HaloQuest rows go through the source rules (the tiny model's answers are noise).
    methods = {row["method"] for row in labels if row["question_id"].startswith(("amber_", "haloquest_"))}
    assert methods & {"rule:amber", "rule:haloquest"}

    # The probe needs both classes: plant a label (the ground truth says yes) to check the pipeline runs through.
    planted = tmp_path / "planted.csv"
    truths = dict(zip(ids, read_strings(h5py.File(run / "features.h5", "r")["ground_truth"]), strict=True))
    with planted.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "label"])
        for index, qid in enumerate(ids):
            writer.writerow([qid, int(truths[qid] == "yes") if truths[qid] in {"yes", "no"} else index % 2])
    result = runner.invoke(app, ["probe", str(run), "--labels", str(planted), "--folds", "2", "--bootstrap", "20",
                                 "--features", "query_token/layer_0", "--no-group-by-image"])
    assert result.exit_code == 0, result.output
    assert (run / "probes" / "results.csv").is_file()

    # Deployment: the same kind of table scores without --images too.
    risk = tmp_path / "risk.csv"
    result = runner.invoke(app, ["predict", "--run", str(run), "--data", str(composite.table), "--out", str(risk),
                                 "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    with risk.open() as handle:
        scored = list(csv.DictReader(handle))
    assert [row["question_id"] for row in scored] == ids and all(row["risk"] for row in scored)


def test_corrupt_embedded_image_is_that_rows_error_and_resume(tmp_path, checkpoint_dir, composite):
    table = pq.read_table(composite.table)
    images = table.column("image").to_pylist()
    images[2] = {"bytes": b"\x89PNG not really", "path": "broken.png"}
    images[5] = {"bytes": None, "path": "missing.png"}
    column = pa.array(images, table.column("image").type)
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column), damaged)
    bad = {table.column("question_id")[2].as_py(), table.column("question_id")[5].as_py()}

    run = tmp_path / "run"
    result = _extract(checkpoint_dir("qwen2_vl"), damaged, run, "--limit", "8")
    assert result.exit_code == 1 and "2 failed" in result.output
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert {entry["question_id"] for entry in errors} == bad
    assert {entry["error"] for entry in errors} == {"ImageError"}
    assert any("no bytes" in entry["message"] for entry in errors)
    assert any("cannot be decoded" in entry["message"] for entry in errors)

    # The same table again: only the two failed rows are retried (and fail again), nothing else is redone.
    again = _extract(checkpoint_dir("qwen2_vl"), damaged, run, "--limit", "8")
    assert again.exit_code == 1 and "6 already done" in again.output
    # The table repaired: rows are identified by content (text and image bytes), so only the two rows that
    # failed are extracted now; the six committed ones stand.
    repaired = _extract(checkpoint_dir("qwen2_vl"), composite.table, run, "--limit", "8")
    assert repaired.exit_code == 0 and "6 already done" in repaired.output, repaired.output
    with h5py.File(run / "features.h5", "r") as handle:
        assert len(read_strings(handle["question_id"])) == 8

    # An embedded image that changes is a changed row: extracted again, the others stand.
    swapped = table.column("image").to_pylist()
    swapped[0] = swapped[1]
    edited = tmp_path / "edited.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(swapped, table.column("image").type)), edited)
    rerun = _extract(checkpoint_dir("qwen2_vl"), edited, run, "--limit", "8")
    first_id = table.column("question_id")[0].as_py()
    assert rerun.exit_code == 0 and "7 already done" in rerun.output and first_id in rerun.output, rerun.output


def test_extract_from_a_hub_dataset_by_name(tmp_path, checkpoint_dir):
    """--hf-dataset NAME --split S goes through datasets.load_dataset (here a local dataset repository)."""
    repo, _ = fixtures.pope_hub(tmp_path / "POPE", categories=("random",), per=3)
    run = tmp_path / "run"
    args = ["--hf-dataset", str(repo), "--split", "test"]
    result = runner.invoke(app, ["extract", "--model", str(checkpoint_dir("qwen2_vl")), "--out", str(run), *args,
                                 "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    identity = json.loads((run / "run.json").read_text())["data"]
    assert (identity["hf_dataset"], identity["split"], identity["config"]) == (str(repo), "test", "")
    missing = runner.invoke(app, ["extract", "--model", "unused", "--out", str(tmp_path / "r2"),
                                  "--hf-dataset", str(repo), "--split", "validation"])
    assert missing.exit_code == 2 and "validation" in missing.output and "test" in missing.output
    nothing = runner.invoke(app, ["extract", "--model", "unused", "--out", str(tmp_path / "r3")])
    assert nothing.exit_code == 2 and "--hf-dataset" in nothing.output


def test_shards_of_an_embedded_table_assemble(tmp_path, checkpoint_dir, composite):
    run = tmp_path / "run"
    for index in (0, 1):
        result = _extract(checkpoint_dir("qwen2_vl"), composite.table, run, "--limit", "6", "--num-shards", "2",
                          "--shard-index", str(index))
        assert result.exit_code == 0, result.output
    with h5py.File(run / "features.h5", "r") as handle:
        ids = read_strings(handle["question_id"])
    assert ids == pq.read_table(composite.table, columns=["question_id"]).column(0).to_pylist()[:6]


def test_a_moved_table_resumes(tmp_path, checkpoint_dir, composite):
    """The identity is the table's content, not where it lies: a copy elsewhere resumes the same run."""
    import shutil

    run = tmp_path / "run"
    first = tmp_path / "a" / "mix.parquet"
    first.parent.mkdir()
    shutil.copy(composite.table, first)
    assert _extract(checkpoint_dir("qwen2_vl"), first, run, "--limit", "4").exit_code == 0
    moved = tmp_path / "b.parquet"
    shutil.move(first, moved)
    again = _extract(checkpoint_dir("qwen2_vl"), moved, run, "--limit", "4")
    assert again.exit_code == 0 and "4 already done" in again.output
