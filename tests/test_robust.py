"""Trustworthy on any input (issue 10): no code runs unasked, runs identified by content, no bad row stops a run,
damage explained, user strings printed literally, the study's tools read the export."""

from __future__ import annotations

import json
import re
import shutil
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from halp.cli import app
from halp.extract import run_extraction
from halp.store import read_strings
from halp.testing.runs import cpu_extract_config

runner = CliRunner()
_config = partial(cpu_extract_config, batch_size=3, max_new_tokens=2)


def _ids(run_dir: Path) -> list[str]:
    with h5py.File(run_dir / "features.h5", "r") as handle:
        return read_strings(handle["question_id"])


def _errors(run_dir: Path) -> dict[str, dict]:
    lines = (run_dir / "errors.jsonl").read_text().splitlines()
    return {entry["question_id"]: entry for entry in map(json.loads, lines)}


def _one_line_error(output: str) -> str:
    """The one line a failed command prints (progress bars of the model loading and the extraction aside)."""
    lines = [line for line in re.split(r"[\r\n]", output) if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def _table(path: Path, rows: list[tuple[str, str, str]], header: str = "question_id,image_id,question") -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


@pytest.fixture
def small_set(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40 + 8 * index, 48), colour).save(images / f"img{index}.png")
    rows = [(f"q{i}", f"img{i % 4}.png", f"Is image {i} red?") for i in range(6)]
    return _table(tmp_path / "t.csv", rows), images


# ----- finding 2: remote code runs only when asked ------------------------------------------------------------------


@pytest.fixture
def custom_code_checkpoint(tmp_path, checkpoint_dir):
    """A checkpoint whose config maps to its own code (a model type transformers does not know); importing that
    code writes a marker file."""
    path = tmp_path / "custom_ckpt"
    shutil.copytree(checkpoint_dir("qwen2_vl"), path)
    marker = tmp_path / "code_ran"
    (path / "configuration_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the checkpoint code ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n"
        "    model_type = 'custom_halp_vl'\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "custom_halp_vl"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def test_custom_code_is_refused_without_the_flag_and_never_runs(tmp_path, custom_code_checkpoint, small_set):
    from transformers import AutoConfig

    checkpoint, marker = custom_code_checkpoint
    table, images = small_set
    # The flag-less refusal, for every command that loads a model; a "y" on stdin must not be read as consent.
    extract = runner.invoke(
        app,
        ["extract", "--model", str(checkpoint), "--data", str(table), "--images", str(images),
         "--out", str(tmp_path / "run"), "--device", "cpu"],
        input="y\n",
    )
    assert extract.exit_code == 2, extract.output
    assert "--trust-remote-code" in _one_line_error(extract.output)
    models = runner.invoke(app, ["models", "--model", str(checkpoint)], input="y\n")
    assert models.exit_code == 2 and "--trust-remote-code" in _one_line_error(models.output)
    assert not marker.exists()
    # The control: the code is real and runs when asked (so the absence above means something).
    AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    assert marker.exists()


def test_a_mistyped_model_path_is_one_line(tmp_path, small_set):
    table, images = small_set
    for model in (str(tmp_path / "no" / "such" / "ckpt"), "./nothing-here"):
        result = runner.invoke(
            app,
            ["extract", "--model", model, "--data", str(table), "--images", str(images), "--out", str(tmp_path / "r")],
        )
        assert result.exit_code == 2, result.output
        assert "no such directory or hub id" in _one_line_error(result.output)


# ----- finding 4: one bad row never stops a run ---------------------------------------------------------------------


@pytest.fixture
def hostile_rows(tmp_path):
    """Good rows mixed, in one batch, with rows that each stopped the whole run before (issue 10, finding 4)."""
    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (48, 40 + 8 * index), colour).save(images / f"good{index}.png")
    Image.new("RGB", (1200, 4), "red").save(images / "sliver.png")  # aspect ratio 300: the processor refuses it
    rows = [
        {"question_id": "good0", "image_id": "good0.png", "question": "Is it red?"},
        {"question_id": "sliver", "image_id": "sliver.png", "question": "Is it red?"},
        {"question_id": "good1", "image_id": "good1.png", "question": "Is it green?"},
        {"question_id": "placeholder", "image_id": "good0.png", "question": "What is <|image_pad|> here?"},
        {"question_id": "long_name", "image_id": "x" * 300 + ".png", "question": "Is it red?"},
        {"question_id": "nul_image", "image_id": "good0\x00.png", "question": "Is it red?"},
        {"question_id": "nul\x00id", "image_id": "good0.png", "question": "Is it red?"},
        {"question_id": "good2", "image_id": "good2.png", "question": "Is it blue?"},
    ]
    table = tmp_path / "hostile.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return table, images


def test_bad_rows_are_row_errors_and_the_batch_goes_on(tmp_path, checkpoint_dir, hostile_rows):
    table, images = hostile_rows
    out = tmp_path / "run"
    args = ["extract", "--model", str(checkpoint_dir("qwen2_vl")), "--data", str(table), "--images", str(images),
            "--out", str(out), "--batch-size", "8", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    for attempt in range(2):  # the rerun retries the failed rows and fails them again: it does not stop either
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (attempt, result.output)
        assert _ids(out) == ["good0", "good1", "good2"]
        errors = _errors(out)
        assert set(errors) == {"sliver", "placeholder", "long_name", "nul_image", "nul\x00id"}, errors
        assert errors["sliver"]["stage"] == "extract" and "aspect ratio" in errors["sliver"]["message"]
        assert errors["placeholder"]["error"] == "SpecialTokenInQuestion"
        assert "<|image_pad|>" in errors["placeholder"]["message"]
        assert errors["long_name"]["stage"] == "image" and "not a usable file name" in errors["long_name"]["message"]
        assert errors["nul_image"]["error"] == "UnstorableText" and "image_id" in errors["nul_image"]["message"]
        assert "question_id" in errors["nul\x00id"]["message"]


def test_a_batch_failing_in_the_model_is_retried_row_by_row(tmp_path, checkpoint_dir, small_set, monkeypatch):
    from halp.capture import FeatureExtractor

    table, images = small_set
    real = FeatureExtractor.run

    def fails_with_q3(self, inputs, max_new_tokens=0, positions=None):
        prompts = self.adapter.tokenizer().batch_decode(inputs["input_ids"])
        if any("image 3 " in prompt for prompt in prompts):
            raise RuntimeError("the model rejects row q3")
        return real(self, inputs, max_new_tokens, positions)

    monkeypatch.setattr(FeatureExtractor, "run", fails_with_q3)
    out = tmp_path / "run"
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=6))
    assert [entry["question_id"] for entry in summary.failed] == ["q3"]
    assert _ids(out) == ["q0", "q1", "q2", "q4", "q5"]
    assert "the model rejects row q3" in _errors(out)["q3"]["message"]


# ----- finding 3: runs are identified by content ----------------------------------------------------------------------

FEATURE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _rows(run_dir: Path) -> dict[str, dict]:
    from halp.testing.runs import read_run

    content = read_run(run_dir / "features.h5")
    ids = content["question_id"]
    return {
        qid: {name: value[index] for name, value in content.items()}
        for index, qid in enumerate(ids)
    }


def test_a_changed_row_is_extracted_again_and_the_table_decides_rows_and_order(tmp_path, checkpoint_dir, small_set):
    table, images = small_set
    checkpoint = checkpoint_dir("qwen2_vl")
    out = tmp_path / "run"
    assert run_extraction(_config(checkpoint, table, images, out)).finished

    # One question edited, one image replaced (same name, other bytes): only those rows run again.
    rows = [(f"q{i}", f"img{i % 4}.png", f"Is image {i} red?") for i in range(6)]
    rows[1] = ("q1", "img1.png", "Is image 1 green?")
    edited = _table(tmp_path / "edited.csv", rows)
    Image.new("RGB", (40 + 8 * 3, 48), "black").save(images / "img3.png")  # q3's image
    again = run_extraction(_config(checkpoint, edited, images, out))
    assert again.finished and sorted(again.changed) == ["q1", "q3"] and again.processed == 2
    assert again.already_done == 4
    stored = _rows(out)
    assert list(stored) == [f"q{i}" for i in range(6)]
    assert stored["q1"]["question"] == "Is image 1 green?"
    # The re-extracted rows equal a fresh run over the edited inputs (an independent extraction).
    fresh = tmp_path / "fresh"
    assert run_extraction(_config(checkpoint, edited, images, fresh)).finished
    reference = _rows(fresh)
    for qid in ("q1", "q3", "q0"):
        for name, value in reference[qid].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(stored[qid][name], value, **FEATURE_TOLERANCE, err_msg=f"{qid} {name}")
            else:
                assert stored[qid][name] == value, (qid, name)

    # Rows removed and the rest reordered: features.h5 follows the table, without extracting anything.
    shuffled = _table(tmp_path / "shuffled.csv", [rows[4], rows[0], rows[3]])
    subset = run_extraction(_config(checkpoint, shuffled, images, out))
    assert subset.finished and subset.processed == 0 and subset.already_done == 3
    assert _ids(out) == ["q4", "q0", "q3"]
    for qid in ("q4", "q0", "q3"):
        np.testing.assert_allclose(_rows(out)[qid]["query_token/layer_1"], reference[qid]["query_token/layer_1"],
                                   **FEATURE_TOLERANCE)


def test_other_weights_at_the_same_path_are_refused(tmp_path, checkpoint_dir, small_set):
    from halp.errors import RunMismatchError
    from halp.testing import build_checkpoint

    table, images = small_set
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir("qwen2_vl"), checkpoint)
    out = tmp_path / "run"
    assert run_extraction(_config(checkpoint, table, images, out, limit=2)).finished
    shutil.rmtree(checkpoint)
    build_checkpoint("qwen2_vl", checkpoint, seed=1)  # same architecture and shapes, other weights
    with pytest.raises(RunMismatchError, match="other model content") as refused:
        run_extraction(_config(checkpoint, table, images, out))
    assert "safetensors" in str(refused.value)
    assert _ids(out) == ["q0", "q1"]  # nothing of the other model was mixed in


def test_shards_refuse_tables_whose_text_differs_under_the_same_ids(tmp_path, checkpoint_dir, small_set):
    from halp.errors import RunMismatchError

    table, images = small_set
    checkpoint = checkpoint_dir("qwen2_vl")
    out = tmp_path / "run"
    run_extraction(_config(checkpoint, table, images, out, num_shards=2, shard_index=0))
    rows = [(f"q{i}", f"img{i % 4}.png", f"Is image {i} red?") for i in range(6)]
    rows[0] = ("q0", "img0.png", "Is image 0 blue?")
    other = _table(tmp_path / "other.csv", rows)
    with pytest.raises(RunMismatchError, match="different tables"):
        run_extraction(_config(checkpoint, other, images, out, num_shards=2, shard_index=1))


# ----- finding 5: metadata columns with awkward names ---------------------------------------------------------------


def test_metadata_columns_with_awkward_names_are_stored_under_reversible_names(tmp_path, checkpoint_dir, small_set):
    from halp.store import meta_columns

    _, images = small_set
    header = "question_id,image_id,question,source/split,.,a,a/b,50%"
    rows = [(f"q{i}", f"img{i}.png", f"Is image {i} red?", f"val/{i}", f"dot{i}", f"a{i}", f"ab{i}", f"{i}%")
            for i in range(3)]
    table = _table(tmp_path / "meta.csv", rows, header=header)
    out = tmp_path / "run"
    result = runner.invoke(app, ["extract", "--model", str(checkpoint_dir("qwen2_vl")), "--data", str(table),
                                 "--images", str(images), "--out", str(out), "--max-new-tokens", "2",
                                 "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "features.h5", "r") as handle:
        stored = {column: read_strings(dataset) for column, dataset in meta_columns(handle).items()}
    assert stored == {
        "source/split": ["val/0", "val/1", "val/2"],
        ".": ["dot0", "dot1", "dot2"],
        "a": ["a0", "a1", "a2"],
        "a/b": ["ab0", "ab1", "ab2"],
        "50%": ["0%", "1%", "2%"],
    }
    shown = runner.invoke(app, ["inspect", str(out), "--sample", "q1"])
    assert shown.exit_code == 0 and "meta/source/split" in shown.output and "val/1" in shown.output


# ----- finding 6: damage is named, with what to do ------------------------------------------------------------------


def test_ctrl_c_exits_130_and_damaged_files_are_named(tmp_path, checkpoint_dir, small_set, monkeypatch):
    from halp.capture import FeatureExtractor

    table, images = small_set
    out = tmp_path / "run"
    args = ["extract", "--model", str(checkpoint_dir("qwen2_vl")), "--data", str(table), "--images", str(images),
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    real = FeatureExtractor.run
    calls = []

    def interrupted_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureExtractor, "run", interrupted_on_the_third_batch)
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 130
    assert _one_line_error(stopped.output) == "interrupted; rerun to resume (committed rows are kept)"
    monkeypatch.setattr(FeatureExtractor, "run", real)
    parts = sorted((out / "parts").glob("part-*.h5"))
    assert len(parts) == 2

    # A truncated part: named, with what to do; removing it as told and rerunning finishes the run.
    parts[1].write_bytes(parts[1].read_bytes()[:300])
    damaged = runner.invoke(app, args)
    assert damaged.exit_code == 2
    line = _one_line_error(damaged.output)
    assert str(parts[1]) in line and "remove that part file and rerun" in line
    parts[1].unlink()
    assert runner.invoke(app, args).exit_code == 0
    assert _ids(out) == [f"q{i}" for i in range(6)]

    # A corrupt features.h5: extract, inspect and export name it.
    features = out / "features.h5"
    good = features.read_bytes()
    features.write_bytes(good[: len(good) // 3])
    for command in (args, ["inspect", str(out)], ["export", str(out), str(tmp_path / "legacy.h5")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert str(features) in _one_line_error(result.output), command
    assert not list(tmp_path.glob(".legacy.h5.tmp-*"))
    features.write_bytes(good)

    # A corrupt run.json: named, with what to do.
    (out / "run.json").write_text('{"model": ')
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = _one_line_error(result.output)
    assert str(out / "run.json") in line and "--overwrite" in line


# ----- finding 7: user strings printed literally, and other rough edges ---------------------------------------------


def test_paths_with_brackets_are_printed_literally_and_limit_must_be_positive(tmp_path, checkpoint_dir, small_set):
    table, images = small_set
    base = ["extract", "--model", str(checkpoint_dir("qwen2_vl")), "--data", str(table), "--images", str(images),
            "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32", "--limit", "2"]
    for name in ("exp[v2]", "x[/]y"):
        out = tmp_path / "runs" / name
        result = runner.invoke(app, [*base, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"features: {out / 'features.h5'}" in result.output
    for limit in ("0", "-1"):
        refused = runner.invoke(app, [*base[:-2], "--limit", limit, "--out", str(tmp_path / "neg")])
        assert refused.exit_code == 2 and "--limit" in refused.output
    assert not (tmp_path / "neg").exists()


def test_export_group_names_never_collide_and_the_study_tools_serialize_the_attributes(tmp_path, checkpoint_dir):
    from halp.legacy import question_id_of

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48), "red").save(images / "a.png")
    ids = ["a/b", "a_b", ".", "a%2Fb", "..", ".hidden", "plain"]
    table = _table(tmp_path / "t.csv", [(qid, "a.png", f"Question {i}?") for i, qid in enumerate(ids)])
    out = tmp_path / "run"
    assert run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out)).finished
    exported = tmp_path / "legacy.h5"
    result = runner.invoke(app, ["export", str(out), str(exported)])
    assert result.exit_code == 0, result.output
    with h5py.File(exported, "r") as handle:
        groups = list(handle)
        assert len(groups) == len(ids)
        assert sorted(handle[group].attrs["question_id"] for group in groups) == sorted(ids)
        assert sorted(question_id_of(group) for group in groups) == sorted(ids)
        encoded = {group: handle[group].attrs["question_id"] for group in groups}
        encoded = {group: qid for group, qid in encoded.items() if group != qid}
        assert sorted(encoded.values()) == sorted(["a/b", ".", "a%2Fb", "..", ".hidden"])
        assert json.loads(handle.attrs["question_id_map"]) == encoded
        assert handle["plain"]["question"][()].decode() == "Question 6?"
        # What the study's h5_to_json.py does: arrays to lists, then json.dump of the root attributes.
        attrs = {key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in handle.attrs.items()}

        def numbers_only(value):  # numpy numbers become plain; anything else (a numpy bool) is not serializable
            if isinstance(value, (np.integer, np.floating)):
                return value.item()
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

        text = json.dumps(attrs, default=numbers_only)
        assert json.loads(text)["complete"] == 1 and json.loads(text)["generated"] == 1
        assert attrs["model_name"] == str(checkpoint_dir("qwen2_vl")) and attrs["created_at"]
    refused = runner.invoke(app, ["export", str(out), str(out / "features.h5")])
    assert refused.exit_code == 2 and "choose another file" in _one_line_error(refused.output)


# ----- finding 9: policies ------------------------------------------------------------------------------------------


def test_header_only_table_is_refused_before_the_model_loads(tmp_path):
    table = tmp_path / "empty.csv"
    table.write_text("question_id,image_id,question\n")
    (tmp_path / "images").mkdir()
    result = runner.invoke(app, ["extract", "--model", str(tmp_path / "not-loaded"), "--data", str(table),
                                 "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no rows" in _one_line_error(result.output)
    assert not (tmp_path / "run").exists()


def test_exif_orientation_is_applied_by_default_and_recorded(tmp_path, checkpoint_dir):
    from halp.data import load_image
    from halp.errors import RunMismatchError

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red as stored
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    stored.save(images / "phone.jpg", exif=exif, quality=95)
    upright = load_image(images, "phone.jpg")
    assert upright.size == (40, 64)  # portrait, as a viewer shows it
    assert load_image(images, "phone.jpg", exif_orientation=False).size == (64, 40)
    # Red ends up on top after a clockwise turn.
    top, bottom = np.asarray(upright)[:16].mean(axis=(0, 1)), np.asarray(upright)[-16:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 50

    frames = [Image.new("RGB", (32, 32), colour) for colour in ("blue", "red")]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = np.asarray(load_image(images, "anim.gif")).mean(axis=(0, 1))
    assert first[2] > 200 and first[0] < 50  # the first frame (blue)

    table = _table(tmp_path / "t.csv", [("q0", "phone.jpg", "Is it red?")])
    out = tmp_path / "run"
    assert run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out)).finished
    assert json.loads((out / "run.json").read_text())["exif_orientation"] is True
    with pytest.raises(RunMismatchError, match="exif_orientation"):
        run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, exif_orientation=False))


def test_predict_refuses_to_write_onto_its_own_input_before_loading_anything(tmp_path, small_set):
    table, images = small_set
    run = tmp_path / "run"
    run.mkdir()
    for out in (table, run / "features.h5", run / "probes" / "results.csv"):
        result = runner.invoke(app, ["predict", "--run", str(run), "--data", str(table), "--images", str(images),
                                     "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "one of the inputs" in _one_line_error(result.output)
    assert table.read_text().startswith("question_id,image_id,question")
