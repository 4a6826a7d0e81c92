"""Messages that lead somewhere: each names the flag on the command line and the parameter in Python, and following
its hint works (the next step is run here and succeeds). Model-backed hints (`halp predict`, `halp extract`) are
followed in tests/test_predict.py and tests/test_reliability.py."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.cli.app import describe
from halp.data import Sample, read_samples, resolve_columns
from halp.errors import LabelError, MissingInputError, ParameterError, ReviewError, TableError
from halp.label import label_run
from halp.probe import train_probes
from halp.store import rows_for, write_rows

runner = CliRunner()
FAST = ["--folds", "3", "--bootstrap", "0", "--features", "query_token/layer_1"]


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def write_run(root: Path, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """A run without labels.csv: features where query_token/layer_1 carries the label, and the label table apart."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    samples = [Sample(f"q{i:03d}", f"img{i:03d}.png", "Is there a dog?", "no", {"kind": f"k{i % 2}"}) for i in range(n)]
    features = {
        "vision_only": rng.normal(size=(n, 6)).astype(np.float32),
        "query_token/layer_1": (rng.normal(size=(n, 6)) + 2.0 * y[:, None]).astype(np.float32),
    }
    root.mkdir(parents=True)
    write_rows(root / "features.h5", rows_for(samples, ["yes"] * n, features), {"model_id": "synthetic", "layers": [1]})
    return pd.DataFrame({"question_id": [s.question_id for s in samples], "verdict": [str(v) for v in y]})


# ----- how the CLI shows parameters -----------------------------------------------------------------------------
def test_describe_shows_each_mentioned_parameter_as_the_command_s_flag() -> None:
    options = {
        "labels": click.Option(["--labels"]),
        "overwrite": click.Option(["--overwrite"], is_flag=True),
        "exif_orientation": click.Option(["--exif-orientation/--no-exif-orientation"]),
        "hf_config": click.Option(["--config", "hf_config"]),
        "model": click.Option(["--model"]),
    }
    message = MissingInputError("no labels: pass a label table as labels=, or rerun with overwrite=True")
    assert describe(message, options) == "no labels: pass a label table as --labels, or rerun with --overwrite"
    missing = MissingInputError("model=./nope: no such directory")
    assert describe(missing, options) == "--model ./nope: no such directory"
    assert describe(MissingInputError("set exif_orientation=False"), options) == "set --no-exif-orientation"
    assert describe(ParameterError("hf_config", "'x': no such configuration"), options) == (
        "--config 'x': no such configuration"
    )
    # Names that are not options of the command, and text that only looks like one, stay as they are.
    assert describe(MissingInputError("seed=3 and run.labels=x"), options) == "seed=3 and run.labels=x"
    assert describe(MissingInputError("pass labels="), {}) == "pass labels="


# ----- halp probe without labels ----------------------------------------------------------------------------------
def test_probe_without_labels_names_the_flag_and_the_step_that_labels(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = write_run(run)
    labels = tmp_path / "verdicts.csv"
    table.to_csv(labels, index=False)
    with pytest.raises(MissingInputError, match=r"pass a label table as labels=$") as caught:
        train_probes(run)
    assert f"`halp label {run}`" in str(caught.value)
    refused = runner.invoke(app, ["probe", str(run), *FAST])
    line = one_line(refused.output)
    assert refused.exit_code == 2 and line.endswith("pass a label table as --labels") and "labels=" not in line
    # Following the hint, either way, trains the probes.
    direct = runner.invoke(app, ["probe", str(run), *FAST, "--labels", str(labels), "--label-column", "verdict"])
    assert direct.exit_code == 0, direct.output
    labelled = runner.invoke(app, ["label", str(run), "--labels", str(labels), "--label-column", "verdict"])
    assert labelled.exit_code == 0, labelled.output
    assert runner.invoke(app, ["probe", str(run), *FAST]).exit_code == 0


def test_a_label_table_without_the_default_column_says_how_to_name_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = write_run(run)
    labels = tmp_path / "verdicts.csv"
    table.to_csv(labels, index=False)
    with pytest.raises(LabelError, match=r"name one with label_column= \(columns: question_id, verdict\)"):
        label_run(run, labels=labels)
    refused = runner.invoke(app, ["label", str(run), "--labels", str(labels)])
    assert refused.exit_code == 2 and "name one with --label-column (columns: question_id, verdict)" in refused.output
    followed = runner.invoke(app, ["label", str(run), "--labels", str(labels), "--label-column", "verdict"])
    assert followed.exit_code == 0, followed.output
    assert label_run(run, labels=labels, label_column="verdict").labelled == len(table)


def test_an_unknown_resolve_choice_names_the_flag_and_the_choices(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = write_run(run)
    labels = tmp_path / "verdicts.csv"
    table.to_csv(labels, index=False)
    with pytest.raises(ReviewError, match=r"^resolve='vote': choose one of none, latest$"):
        label_run(run, labels=labels, label_column="verdict", resolve="vote")  # refused without any review too
    args = ["label", str(run), "--labels", str(labels), "--label-column", "verdict"]
    refused = runner.invoke(app, [*args, "--resolve", "vote"])
    assert refused.exit_code == 2 and "--resolve 'vote': choose one of none, latest" in one_line(refused.output)
    assert runner.invoke(app, [*args, "--resolve", "latest"]).exit_code == 0


# ----- tables -------------------------------------------------------------------------------------------------------
def test_a_missing_column_is_said_readably_and_renaming_it_is_enough(tmp_path: Path) -> None:
    with pytest.raises(TableError) as caught:
        resolve_columns(["question_id", "image_id", "prompt"])
    assert str(caught.value) == (
        "the table has no question column; its columns are question_id, image_id, prompt. Rename the column that "
        "holds it."
    )
    with pytest.raises(TableError) as caught:
        resolve_columns(["id", "img", "question"])
    assert str(caught.value).startswith(
        "the table has no question_id and no image_id (or image_name, image, image_path) column; its columns are id, "
        "img, question."
    )
    table = tmp_path / "vqa.csv"
    frame = pd.DataFrame({"question_id": ["a"], "image_id": ["x.png"], "prompt": ["Is it red?"]})
    frame.to_csv(table, index=False)
    with pytest.raises(TableError, match="no question column"):
        read_samples(table)
    frame.rename(columns={"prompt": "question"}).to_csv(table, index=False)
    assert [sample.question for sample in read_samples(table)] == ["Is it red?"]
