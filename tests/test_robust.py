"""Trustworthy on any input (issue 10): no code runs unasked, runs identified by content, no bad row stops a run,
damage explained, user strings printed literally, the study's tools read the export."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import h5py
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
    lines = [line for line in output.strip().splitlines() if line.strip()]
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
    real = FeatureExtractor.__call__

    def fails_with_q3(self, batch_images, questions, max_new_tokens=0):
        if any("image 3 " in question for question in questions):
            raise RuntimeError("the model rejects row q3")
        return real(self, batch_images, questions, max_new_tokens)

    monkeypatch.setattr(FeatureExtractor, "__call__", fails_with_q3)
    out = tmp_path / "run"
    summary = run_extraction(_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size=6))
    assert [entry["question_id"] for entry in summary.failed] == ["q3"]
    assert _ids(out) == ["q0", "q1", "q2", "q4", "q5"]
    assert "the model rejects row q3" in _errors(out)["q3"]["message"]
