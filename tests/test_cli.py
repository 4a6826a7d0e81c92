"""The command line as a user runs it: extract, inspect, export to the seeds' layout."""

from __future__ import annotations

import h5py
import numpy as np
from typer.testing import CliRunner

from halp.cli import app
from halp.store import read_strings

runner = CliRunner()


def _extract(checkpoint, table, images, out, *extra):
    return runner.invoke(
        app,
        [
            "extract",
            "--model",
            str(checkpoint),
            "--data",
            str(table),
            "--images",
            str(images),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--max-new-tokens",
            "4",
            *extra,
        ],
    )


def load_like_halp_probe_scripts(path):
    """Reads the legacy layout the way the HALP probe scripts do: one group per question id."""
    rows = []
    with h5py.File(path, "r") as handle:
        for qid in handle:
            group = handle[qid]
            rows.append(
                {
                    "question_id": qid,
                    "answer": group["answer"][()].decode(),
                    "ground_truth": group["ground_truth_answer"][()].decode(),
                    "vision_only": group["vision_only_representation"][:],
                    "vision_token": {
                        k: group["vision_token_representation"][k][:] for k in group["vision_token_representation"]
                    },
                    "query_token": {
                        k: group["query_token_representation"][k][:] for k in group["query_token_representation"]
                    },
                }
            )
    return rows


def test_extract_inspect_export_roundtrip(tmp_path, checkpoint_dir, vqa_set):
    table, images = vqa_set
    out = tmp_path / "run"
    result = _extract(checkpoint_dir("qwen2_5_vl"), table, images, out)
    assert result.exit_code == 0, result.output
    assert "12 processed" in result.output
    assert (out / "extract.log").read_text().count("processed 12 samples") == 1
    # One line of stage timing: every stage named, the stall fraction and the padding.
    stage_lines = [line for line in result.output.splitlines() if line.startswith("stages:")]
    assert len(stage_lines) == 1 and all(
        word in stage_lines[0] for word in ("loading images", "processing", "model", "committing", "waited", "padding")
    )

    shown = runner.invoke(app, ["inspect", str(out), "--detailed"])
    assert shown.exit_code == 0, shown.output
    assert "12 samples" in shown.output and "query_token/layer_3" in shown.output
    one = runner.invoke(app, ["inspect", str(out), "--sample", "q0003"])
    assert one.exit_code == 0 and "img_0003.png" in one.output
    missing = runner.invoke(app, ["inspect", str(out), "--sample", "nope"])
    assert missing.exit_code != 0 and "nope" in missing.output

    legacy = tmp_path / "legacy.h5"
    exported = runner.invoke(app, ["export", str(out), "--format", "halp-legacy", str(legacy)])
    assert exported.exit_code == 0, exported.output
    rows = load_like_halp_probe_scripts(legacy)
    with h5py.File(out / "features.h5", "r") as handle:
        ids = read_strings(handle["question_id"])
        assert sorted(r["question_id"] for r in rows) == sorted(ids)
        by_id = {r["question_id"]: r for r in rows}
        layers = list(handle.attrs["layers"])
        for index, qid in enumerate(ids):
            row = by_id[qid]
            np.testing.assert_array_equal(row["vision_only"], handle["vision_only"][index])
            assert sorted(row["query_token"]) == sorted(f"layer_{k}" for k in layers)
            for k in layers:
                np.testing.assert_array_equal(
                    row["vision_token"][f"layer_{k}"], handle[f"vision_token/layer_{k}"][index]
                )
                np.testing.assert_array_equal(row["query_token"][f"layer_{k}"], handle[f"query_token/layer_{k}"][index])
            assert row["answer"] == read_strings(handle["answer"])[index]
            assert row["ground_truth"] == read_strings(handle["ground_truth"])[index]


def test_no_generate_stores_empty_answers_and_same_features(tmp_path, checkpoint_dir, vqa_set):
    table, images = vqa_set
    generated, prefill = tmp_path / "gen", tmp_path / "prefill"
    assert _extract(checkpoint_dir("qwen2_vl"), table, images, generated, "--limit", "4").exit_code == 0
    assert _extract(checkpoint_dir("qwen2_vl"), table, images, prefill, "--limit", "4", "--no-generate").exit_code == 0
    with h5py.File(generated / "features.h5") as a, h5py.File(prefill / "features.h5") as b:
        assert all(read_strings(b["answer"])[i] == "" for i in range(4))
        assert any(read_strings(a["answer"]))
        assert bool(b.attrs["generated"]) is False
        for name in ("vision_only", "query_token/layer_3", "vision_token/layer_0"):
            np.testing.assert_allclose(a[name][()], b[name][()], rtol=1e-5, atol=1e-7)


def test_bad_table_fails_before_loading_the_model(tmp_path, vqa_set):
    _, images = vqa_set
    table = tmp_path / "bad.csv"
    table.write_text("qid,image_id,question\n1,a.png,hi\n")
    result = runner.invoke(
        app,
        [
            "extract",
            "--model",
            "no/such-model",
            "--data",
            str(table),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "question_id" in result.output and "loading" not in result.output


def test_models_lists_families_and_resolves_a_checkpoint(checkpoint_dir):
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0 and "qwen2_5_vl" in listed.output
    resolved = runner.invoke(app, ["models", "--model", str(checkpoint_dir("qwen2_vl"))])
    assert resolved.exit_code == 0, resolved.output
    assert "model.visual.merger" in resolved.output and "<|image_pad|>" in resolved.output


def test_lines_written_to_a_file_are_not_wrapped_and_a_terminal_still_wraps_them(tmp_path):
    """`halp ... 2> run.log`: each progress line stays one line (rich would wrap it at 80 columns otherwise)."""
    import io
    import subprocess
    import sys

    from halp.cli.app import LineConsole

    line = "extracted " + " ".join(f"{value:.9f}" for value in np.linspace(0, 1, 30)) + " rows in /a/long/path"
    log = tmp_path / "run.log"
    with open(log, "w") as handle:
        subprocess.run(
            [sys.executable, "-c", f"from halp.cli.app import say; say({line!r})"],
            stderr=handle, check=True, timeout=120, env={"COLUMNS": "80", "PATH": ""},
        )  # fmt: skip
    assert log.read_text() == line + "\n"
    terminal = io.StringIO()
    LineConsole(file=terminal, width=80, force_terminal=True).print(line, markup=False)
    assert terminal.getvalue().count("\n") > 1  # a terminal wraps at its width, between words


def _commands(group, path=()):
    """(argv path, click command) of every command and sub-command of the app."""
    import click

    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_help_shows_every_option_name_whole_at_80_columns():
    """In an 80-column terminal `halp <command> --help` shows every flag in full: a user must be able to read and
    copy `--processor-device` or `--no-exif-orientation` (rich's option table cut them to `--processor-dev…`)."""
    import re

    import typer

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        shown = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        names = [name for param in command.params if param.param_type_name == "option"
                 for name in (*param.opts, *param.secondary_opts)]  # fmt: skip
        cut = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", shown.output)]
        assert not cut, f"halp {' '.join(path)} --help at 80 columns does not show {cut} whole:\n{shown.output}"
        wide = [line for line in shown.output.splitlines() if len(line) > 80]
        assert not wide, f"halp {' '.join(path)} --help is wider than 80 columns:\n" + "\n".join(wide)
        checked += len(names)
    assert checked > 100  # every command was reached (extract alone has over 30 flags)


def test_extract_options_reach_extract_config_by_name():
    """`halp extract` passes its options to ExtractConfig by name (cli.app.from_options): an option named unlike
    the field would be dropped silently, so each one must name a field, and each settable field have its flag."""
    import dataclasses

    import typer

    from halp.extract import ExtractConfig

    command = dict(_commands(typer.main.get_command(app)))[("extract",)]
    options = {param.name for param in command.params}
    fields = {field.name for field in dataclasses.fields(ExtractConfig)}
    engine_only = {"engine", "num_workers", "gpus_per_worker"}  # choose the engine, not the pass
    not_flags = {"progress", "worker_init", "preloaded"}  # set by Python callers and tests only
    assert options - engine_only == fields - not_flags
