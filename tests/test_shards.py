"""Sharded extraction: --num-shards and torchrun each equal a single-process run; kills lose and duplicate nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.extract import run_extraction
from halp.shard import Shard, resolve_shard
from halp.store import RunLockedError, RunMismatchError, RunStore, read_strings
from halp.testing import make_vqa_set
from halp.testing.runs import COMPARED_ROWS as N
from halp.testing.runs import assert_run_equals, cli_args, compared_run_config
from halp.testing.slow_cli import kill_after_commits

runner = CliRunner()


def _cli_args(checkpoint: Path, table: Path, images: Path, out: Path) -> list[str]:
    return ["extract", *cli_args(compared_run_config(checkpoint, table, images, out))]


# ----- the split ------------------------------------------------------------------------------------------------
def test_shard_resolution_from_flags_and_launchers():
    assert resolve_shard(environ={}) == Shard(0, 1)
    assert resolve_shard(4, 2, environ={}) == Shard(2, 4, source="flags")
    # torchrun and accelerate launch set the same three variables for every process they start.
    launched = resolve_shard(environ={"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"})
    assert (launched.index, launched.count, launched.local_rank, launched.source) == (5, 8, 1, "launcher")
    assert resolve_shard(environ={"WORLD_SIZE": "1", "RANK": "0"}) == Shard(0, 1)
    with pytest.raises(ValueError, match="go together"):
        resolve_shard(num_shards=2, environ={})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        resolve_shard(2, 0, environ={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        resolve_shard(3, 3, environ={})
    with pytest.raises(ValueError, match="not an integer"):
        resolve_shard(environ={"WORLD_SIZE": "two", "RANK": "0"})


@pytest.mark.parametrize("count", [1, 2, 3, 5, 13])
def test_every_row_belongs_to_exactly_one_shard(count):
    rows = [f"q{i}" for i in range(12)]
    owned = [position for index in range(count) for position, _ in Shard(index, count).select(rows)]
    assert sorted(owned) == list(range(12))
    assert [position for position, _ in Shard(1, 3).select(rows)] == [1, 4, 7, 10]  # strided: position % 3 == 1


# ----- equal to a single-process run ------------------------------------------------------------------------------
def test_num_shards_equals_single_process(tmp_path, run_checkpoint, run_data, run_reference, monkeypatch):
    table, images = run_data
    out = tmp_path / "run"
    first = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=3, shard_index=1))
    assert first.processed == 4 and first.pending_shards == ["0-of-3", "2-of-3"] and not first.assembled
    assert not (out / "features.h5").exists()
    second = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=3, shard_index=0))
    assert second.pending_shards == ["2-of-3"]
    last = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=3, shard_index=2))
    assert last.assembled and last.finished and last.processed == 4
    assert_run_equals(out, run_reference)
    assert json.loads((out / "run.json").read_text())["num_shards"] == 3
    assert not RunStore(out).all_part_paths()
    with h5py.File(out / "features.h5") as handle:
        assert int(handle.attrs["num_shards"]) == 3 and bool(handle.attrs["complete"])
        assert handle.attrs["model_type"] == "qwen2_vl" and int(handle.attrs["hidden_size"]) == 64

    # A rerun of a shard of a finished run does nothing and loads no model.
    monkeypatch.setattr("halp.local_engine.load_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    again = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=3, shard_index=0))
    assert again.processed == 0 and again.already_done == 4 and again.finished
    assert_run_equals(out, run_reference)


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # accelerate launch starts its processes through torchrun; --multi_gpu is its data-parallel mode (CPU here),
    # and port 0 picks a free port so parallel test runs do not collide.
    "accelerate": [
        *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
    ],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_two_processes_equal_single_process(tmp_path, run_checkpoint, run_data, run_reference, launcher):
    table, images = run_data
    out = tmp_path / "run"
    command = [sys.executable, *LAUNCHERS[launcher], "-m", "halp", *_cli_args(run_checkpoint, table, images, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "features:" in done.stdout and "(all 2 shards)" in done.stdout
    assert {path.name for path in (out / "shards").iterdir()} == {"0-of-2", "1-of-2"}
    assert_run_equals(out, run_reference)


# ----- crashes ----------------------------------------------------------------------------------------------------
def test_killed_shard_loses_and_duplicates_nothing(tmp_path, run_checkpoint, run_data, run_reference):
    table, images = run_data
    out = tmp_path / "run"
    killed = RunStore.for_shard(out, "0-of-2")
    args = [*_cli_args(run_checkpoint, table, images, out), "--num-shards", "2", "--shard-index", "0"]
    parts = kill_after_commits(args, killed, commits=2, env={"OMP_NUM_THREADS": "1"})
    assert parts == 2, f"shard 0 must hold exactly the 2 parts it committed before it was killed, found {parts}"
    committed = killed.committed_ids()
    assert len(committed) == 4, sorted(committed)  # 2 parts of 2 rows
    assert not (out / "shards" / "0-of-2" / "done.json").exists()

    # The other shard finishes; the run waits for the killed one.
    other = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=1))
    assert other.processed == 6 and other.pending_shards == ["0-of-2"] and not (out / "features.h5").exists()
    refused = runner.invoke(app, ["merge", str(out)])
    assert refused.exit_code == 2 and "0-of-2 (not running: rerun it)" in refused.output

    resumed = run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=0))
    assert resumed.already_done == len(committed) and resumed.processed == 6 - len(committed)
    assert resumed.assembled and resumed.finished
    assert_run_equals(out, run_reference)


def test_merge_assembles_when_the_last_shard_died_before_assembling(
    tmp_path, run_checkpoint, run_data, run_reference, monkeypatch
):
    table, images = run_data
    out = tmp_path / "run"
    run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=0))

    def killed_before_assembly(self, num_shards):
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(RunStore, "assemble_shards", killed_before_assembly)
        with pytest.raises(SystemExit):
            run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=1))
    assert not (out / "features.h5").exists()
    merged = runner.invoke(app, ["merge", str(out)])
    assert merged.exit_code == 0, merged.output
    assert f"assembled {N} rows from 2 shards" in merged.output
    assert_run_equals(out, run_reference)
    assert "already assembled" in runner.invoke(app, ["merge", str(out)]).output


def test_a_killed_sharded_run_can_be_finished_by_one_process(tmp_path, run_checkpoint, run_data, run_reference):
    table, images = run_data
    out = tmp_path / "run"
    run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=3, shard_index=2))
    live = RunStore.for_shard(out, "0-of-3")
    live.lock()  # a shard of the 3-shard layout is still running: the layout cannot change under it
    try:
        with pytest.raises(RunLockedError, match=r"shards/0-of-3 \(pid \d+\)"):
            run_extraction(compared_run_config(run_checkpoint, table, images, out))
    finally:
        live.unlock()
    summary = run_extraction(compared_run_config(run_checkpoint, table, images, out))  # one process, one shard
    assert summary.already_done == 4 and summary.processed == 8 and summary.finished
    assert json.loads((out / "run.json").read_text())["num_shards"] == 1
    assert_run_equals(out, run_reference)
    assert not RunStore(out).all_part_paths()


# ----- refusals ---------------------------------------------------------------------------------------------------
def test_one_writer_per_shard_and_shards_cannot_join_a_single_process_run(tmp_path, run_checkpoint, run_data):
    table, images = run_data
    out = tmp_path / "run"
    holder = RunStore.for_shard(out, "1-of-2")
    holder.lock()
    try:
        with pytest.raises(RunLockedError, match=rf"shards/1-of-2 of .*\(pid {os.getpid()}\)"):
            run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=1))
    finally:
        holder.unlock()

    single = RunStore(out)
    single.lock()  # a single-process run holds the run lock for its whole life
    try:
        with pytest.raises(RunLockedError, match="a shard cannot join it"):
            run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=0))
    finally:
        single.unlock()

    with pytest.raises(ValueError, match="overwrite cannot be combined"):
        run_extraction(
            compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=0, overwrite=True)
        )


def test_shards_of_different_tables_are_not_assembled(tmp_path, run_checkpoint, run_data):
    table, images = run_data
    out = tmp_path / "run"
    run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=0, limit=8))
    with pytest.raises(RunMismatchError, match="different tables or limit= values"):
        run_extraction(compared_run_config(run_checkpoint, table, images, out, num_shards=2, shard_index=1))
    assert not (out / "features.h5").exists()


def test_failed_rows_of_any_shard_are_reported_by_the_run(tmp_path, run_checkpoint):
    table, images = make_vqa_set(tmp_path / "data", n=6, seed=2)
    (images / "img_0003.png").rename(tmp_path / "img_0003.png")  # q0003 belongs to shard 1-of-2
    out = tmp_path / "run"
    args = _cli_args(run_checkpoint, table, images, out)
    first = runner.invoke(app, [*args, "--num-shards", "2", "--shard-index", "1"])
    assert first.exit_code == 1, first.output  # a job-array task with failed rows says so
    assert "1 failed" in first.output
    last = runner.invoke(app, [*args, "--num-shards", "2", "--shard-index", "0"])
    assert last.exit_code == 1 and "1 row(s) of the run failed" in last.output, last.output
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [entry["question_id"] for entry in errors] == ["q0003"] and errors[0]["stage"] == "image"
    with h5py.File(out / "features.h5") as handle:
        assert read_strings(handle["question_id"]) == ["q0000", "q0001", "q0002", "q0004", "q0005"]
        assert not bool(handle.attrs["complete"]) and int(handle.attrs["num_failed"]) == 1

    (tmp_path / "img_0003.png").rename(images / "img_0003.png")
    fixed = runner.invoke(app, [*args, "--num-shards", "2", "--shard-index", "1"])
    assert fixed.exit_code == 0 and "1 processed" in fixed.output, fixed.output
    assert (out / "errors.jsonl").read_text() == ""
    with h5py.File(out / "features.h5") as handle:
        assert read_strings(handle["question_id"]) == [f"q{i:04d}" for i in range(6)]
        assert bool(handle.attrs["complete"])


def test_cli_refuses_inconsistent_options(tmp_path, run_checkpoint, run_data):
    table, images = run_data
    args = _cli_args(run_checkpoint, table, images, tmp_path / "run")
    assert "go together" in runner.invoke(app, [*args, "--shard-index", "1"]).output
    assert "apply to --engine ray" in runner.invoke(app, [*args, "--num-workers", "2"]).output
    assert "choose local or ray" in runner.invoke(app, [*args, "--engine", "spark"]).output
    not_sharded = runner.invoke(app, ["merge", str(tmp_path)])
    assert not_sharded.exit_code == 2 and "no run.json" in not_sharded.output
