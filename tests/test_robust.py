"""Trustworthy on any input (issue 10): no code runs unasked, runs identified by content, no bad row stops a run,
damage explained, user strings printed literally, the study's tools read the export."""

from __future__ import annotations

import json
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
