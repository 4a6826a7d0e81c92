"""`--engine ray` on a real local Ray cluster (2 CPUs, 2 actors) equals a single-process run, retries included."""

from __future__ import annotations

import os
import re
import shutil

import h5py
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.extract import run_extraction
from halp.store import RunStore, read_strings
from halp.testing.runs import COMPARED_ROWS as N
from halp.testing.runs import assert_run_equals, cli_args, compared_run_config

ray = pytest.importorskip("ray", reason="the Ray engine is the optional extra ray: pip install -e '.[ray]'")
pytest.importorskip("ray.data", reason="the Ray engine needs Ray Data: pip install -e '.[ray]'")

from halp.ray_engine import ExtractWorker, run_ray_extraction  # noqa: E402 - only once ray is known to import

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster with 2 CPUs; the engine finds it already initialized."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_cli_two_workers_equal_single_process(tmp_path, cluster, run_checkpoint, run_data, run_reference):
    table, images = run_data
    out = tmp_path / "run"
    args = ["extract", *cli_args(compared_run_config(run_checkpoint, table, images, out))]
    result = runner.invoke(app, [*args, "--engine", "ray", "--num-workers", "2", "--gpus-per-worker", "0"])
    assert result.exit_code == 0, result.output
    assert f"{N} processed" in result.output
    assert_run_equals(out, run_reference)
    assert len(list((out / "ray").iterdir())) == 2, "expected one parts directory per actor"
    with h5py.File(out / "features.h5") as handle:
        assert handle.attrs["engine"] == "ray" and int(handle.attrs["num_workers"]) == 2
        assert bool(handle.attrs["complete"]) and handle.attrs["model_type"] == "qwen2_vl"

    again = run_ray_extraction(
        compared_run_config(run_checkpoint, table, images, out), num_workers=2, gpus_per_worker=0
    )
    assert again.processed == 0 and again.already_done == N and again.finished


def test_ray_resumes_only_what_is_missing(tmp_path, cluster, run_checkpoint, run_data, run_reference):
    table, images = run_data
    out = tmp_path / "run"
    run_extraction(compared_run_config(run_checkpoint, table, images, out, limit=5))  # an earlier run committed 5 rows
    summary = run_ray_extraction(
        compared_run_config(run_checkpoint, table, images, out), num_workers=2, gpus_per_worker=0
    )
    assert summary.already_done == 5 and summary.processed == N - 5 and summary.finished
    assert_run_equals(out, run_reference)


def test_a_worker_dying_mid_task_is_retried_without_duplicates(
    tmp_path, monkeypatch, cluster, run_checkpoint, run_data, run_reference
):
    table, images = run_data
    out = tmp_path / "run"
    fired = tmp_path / "crash-fired"

    class DiesOnceAfterACommit(ExtractWorker):
        """Commits the first row of its first batch, then the process dies (once in the whole run)."""

        def __call__(self, batch):
            if not fired.exists():
                fired.touch()
                super().__call__({name: values[:1] for name, values in batch.items()})
                os._exit(1)
            return super().__call__(batch)

    # How many rows the retried tasks committed again depends on Ray's scheduling (which batch the dead actor
    # held, whether a replacement actor started); count the copies in the parts just before they are assembled.
    committed: list[str] = []
    assemble = RunStore.assemble

    def counting_assemble(store, order, attrs, *args, **kwargs):
        for path in store.all_part_paths():
            with h5py.File(path, "r") as handle:
                committed.extend(read_strings(handle["question_id"]))
        return assemble(store, order, attrs, *args, **kwargs)

    monkeypatch.setattr(RunStore, "assemble", counting_assemble)
    summary = run_ray_extraction(
        compared_run_config(run_checkpoint, table, images, out),
        num_workers=2,
        gpus_per_worker=0,
        worker_class=DiesOnceAfterACommit,
    )
    assert fired.exists() and summary.finished and summary.processed == N
    # The dead actor's directory plus the live ones (Ray may start a replacement as well as restart it).
    assert len(list((out / "ray").iterdir())) >= 3
    duplicates = len(committed) - len(set(committed))
    assert duplicates >= 1, "the dead actor's committed row must have been committed again by the retried task"
    logged = re.findall(r"(\d+) row\(s\) committed twice by retried Ray tasks", (out / "extract.log").read_text())
    assert logged == [str(duplicates)], f"the log must count the {duplicates} copies dropped, got {logged}"
    assert_run_equals(out, run_reference)  # every row once, in table order


def test_a_worker_that_cannot_start_fails_the_run_with_one_clear_line(tmp_path, cluster, run_checkpoint, run_data):
    table, images = run_data
    broken = tmp_path / "no-weights"
    shutil.copytree(run_checkpoint, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    out = tmp_path / "run"
    args = ["extract", "--model", str(broken), "--data", str(table), "--images", str(images), "--out", str(out)]
    result = runner.invoke(
        app, [*args, "--device", "cpu", "--engine", "ray", "--num-workers", "2", "--gpus-per-worker", "0"]
    )
    assert result.exit_code == 2, result.output
    assert "a Ray worker failed: OSError" in result.output and "model.safetensors" in result.output
    logged = (out / "extract.log").read_text()
    assert "Ray worker failure" in logged and "creation task" in logged  # the full remote error


def test_ray_extracts_a_table_that_embeds_its_images(tmp_path, cluster, run_checkpoint, run_data, run_reference):
    """The same rows with their image files embedded in Parquet (no --images) give the same run as the files."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, images = run_data
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    cells = [{"bytes": (images / name).read_bytes(), "path": name} for name in frame["image_id"]]
    embedded = tmp_path / "embedded.parquet"
    pq.write_table(arrow.append_column("image", pa.array(cells)), embedded)
    out = tmp_path / "run"
    summary = run_ray_extraction(
        compared_run_config(run_checkpoint, embedded, None, out), num_workers=2, gpus_per_worker=0
    )
    assert summary.finished
    assert_run_equals(out, run_reference)
