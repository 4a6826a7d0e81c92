"""The overlapped pipeline (halp.pipeline): same results as the serial loop, failures contained, options recorded.

No test here depends on timing: stage seconds are only checked to be present and consistent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from halp.capture import FeatureExtractor, parse_layers
from halp.data import FolderImages, load_image, read_samples
from halp.errors import ModelLoadError, ParameterError
from halp.extract import resolve_processor_device, run_extraction
from halp.models import adapter_for
from halp.pipeline import (
    InputPipeline,
    OrderedWriter,
    StageTimes,
    TokenCounter,
    WorkerSpec,
    find_batch_size,
    plan_batches,
)
from halp.store import RunStore
from halp.testing import make_vqa_set
from halp.testing.faults import CRASH_MARKER, HANG_MARKER, release_path
from halp.testing.runs import cli_args, cpu_extract_config, read_run


def _assert_same_run(got: dict, reference: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(got[name], value, rtol=rtol, atol=1e-6, err_msg=name)
        else:
            assert got[name] == value, name


@pytest.fixture(scope="module")
def data10(tmp_path_factory):
    return make_vqa_set(tmp_path_factory.mktemp("data10"), n=10, seed=5)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, checkpoint_dir, data10):
    table, images = data10
    out = tmp_path_factory.mktemp("serial") / "run"
    summary = run_extraction(cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, workers=0))
    assert summary.finished and summary.processed == 10
    return out


def test_writer_commits_in_submission_order_and_stops_at_the_first_error():
    done: list[int] = []

    def commit(index: int) -> None:
        if index == 3:
            raise OSError("disk full (simulated)")
        done.append(index)

    timing = StageTimes()
    writer = OrderedWriter(timing, background=True, depth=2)
    with pytest.raises(OSError, match="disk full"):
        for index in range(8):
            writer.submit(lambda index=index: commit(index))
        writer.close()
    assert done == [0, 1, 2]  # nothing after the failed commit, nothing out of order


def test_token_counts_are_the_processors_and_batches_group_them(checkpoint_dir, loaded, data10):
    table, images = data10
    model, processor = loaded("qwen2_5_vl")
    adapter = adapter_for(model, processor)
    samples = read_samples(table)
    counts = TokenCounter(adapter, FolderImages(images))(samples)
    for sample, count in zip(samples, counts, strict=True):
        # The processor, run on the row alone (no padding), gives exactly the counted tokens.
        inputs = adapter.encode([load_image(images, sample.image_id)], [sample.question])
        assert count == int(inputs["attention_mask"].sum()), sample.question_id
    planned = list(plan_batches(samples, 3, TokenCounter(adapter, FolderImages(images))))
    assert sorted(s.question_id for batch in planned for s in batch) == sorted(s.question_id for s in samples)
    by_id = dict(zip([s.question_id for s in samples], counts, strict=True))
    flat = [by_id[s.question_id] for batch in planned for s in batch]
    assert flat == sorted(flat)  # one window here: rows in increasing token count


def test_pipelined_run_equals_the_serial_run_and_reports_its_stages(tmp_path, checkpoint_dir, data10, serial_run):
    table, images = data10
    out = tmp_path / "run"
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, workers=2)
    summary = run_extraction(config)
    assert summary.finished and summary.processed == 10
    _assert_same_run(read_run(out / "features.h5"), read_run(serial_run / "features.h5"))
    stages = summary.stages
    assert stages.batches == 5 and stages.workers == 2 and stages.processor_device == "cpu"
    assert stages.tokens > 0 and 0 <= stages.padding_fraction < 1
    assert 0 <= stages.waiting_for_input <= stages.wall and stages.model > 0 and stages.committing > 0
    with h5py.File(out / "features.h5") as handle:
        recorded = json.loads(handle.attrs["stage_seconds"])
        assert recorded["batches"] == 5 and recorded["workers"] == 2
        assert handle.attrs["attn_implementation"] == "sdpa" and int(handle.attrs["batch_size"]) == 2
    log = (out / "extract.log").read_text()
    assert "model waited for input" in log and "padding" in log and log.count("input worker pid") == 2


def test_a_crashing_worker_costs_only_its_rows_and_is_replaced(tmp_path, checkpoint_dir, data10, serial_run):
    table, images_src = data10
    images = tmp_path / "images"
    images.mkdir()
    for path in images_src.iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    samples = read_samples(table)
    victim = samples[4]
    good = (images / victim.image_id).read_bytes()
    (images / victim.image_id).write_bytes(CRASH_MARKER + b"\0" * 64)  # the decoder aborts its process on it
    out = tmp_path / "run"
    config = cpu_extract_config(
        checkpoint_dir("qwen2_vl"),
        table,
        images,
        out,
        workers=1,
        worker_init="halp.testing.faults:crash_decoder_on_marker",
    )
    summary = run_extraction(config)
    failed = {entry["question_id"]: entry for entry in summary.failed}
    # Only the victim is lost with the worker (it was reading that row); its batch's other row is handed to the
    # replacement, which finishes every other batch.
    assert set(failed) == {victim.question_id}
    assert failed[victim.question_id]["stage"] == "worker" and failed[victim.question_id]["error"] == "InputWorkerDied"
    assert summary.processed == 9
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {entry["question_id"] for entry in errors} == set(failed)
    assert (out / "extract.log").read_text().count("input worker pid") == 2  # the first one and its replacement

    (images / victim.image_id).write_bytes(good)
    rerun = run_extraction(config)
    assert rerun.finished and rerun.processed == 1 and rerun.already_done == 9
    _assert_same_run(read_run(out / "features.h5"), read_run(serial_run / "features.h5"), rtol=1e-4)


#: The per-row deadline of the hung-decoder test: far above what reading one of its small PNGs takes under load.
HUNG_ROW_TIMEOUT = 20.0


def test_a_decoder_that_never_returns_costs_its_row_and_the_worker_is_replaced(
    tmp_path, checkpoint_dir, data10, serial_run
):
    """Before the deadline existed the run waited for the hung worker forever; the test then releases the worker
    (release_path) and fails instead of hanging."""
    table, images_src = data10
    images = tmp_path / "images"
    shutil.copytree(images_src, images)
    samples = read_samples(table)
    victim = samples[6]
    (images / victim.image_id).write_bytes(HANG_MARKER + b"\0" * 64)
    out = tmp_path / "run"
    config = cpu_extract_config(
        checkpoint_dir("qwen2_vl"),
        table,
        images,
        out,
        workers=1,
        worker_init="halp.testing.faults:hang_decoder_on_marker",
        row_timeout=HUNG_ROW_TIMEOUT,
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_extraction(config)), daemon=True)
    thread.start()
    thread.join(HUNG_ROW_TIMEOUT + 240)
    if thread.is_alive():
        release_path(images / victim.image_id).touch()  # let the hung worker go: no process is left behind
        thread.join(120)
        pytest.fail("the run waited for a decoder that never returns instead of failing its row")
    summary = outcome["summary"]
    failed = {entry["question_id"]: entry for entry in summary.failed}
    assert set(failed) == {victim.question_id} and summary.processed == 9
    assert failed[victim.question_id]["error"] == "InputRowTimeout"
    assert f"more than {HUNG_ROW_TIMEOUT:g} s" in failed[victim.question_id]["message"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [entry["question_id"] for entry in errors] == [victim.question_id]
    log = (out / "extract.log").read_text()
    pids = [int(line.rsplit("pid ", 1)[1].split()[0]) for line in log.splitlines() if "input worker pid" in line]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)  # the hung worker was ended and replaced
    with h5py.File(out / "features.h5") as handle:
        assert victim.question_id not in {value.decode() for value in handle["question_id"][()]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def _ignores_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def test_closing_the_input_pipeline_ends_workers_that_answer_no_signal(tmp_path):
    """Ctrl-C or an error in the model closes the pipeline: workers stuck where no stop message or SIGTERM
    reaches them are killed, and none is started after the close (nothing outlives the run)."""
    spec = WorkerSpec(model="unused", trust_remote_code=False, init="halp.testing.faults:hang_in_worker")
    pipeline = InputPipeline(spec, workers=2, timing=StageTimes())
    with pipeline:
        while len(pipeline._pool) < 2 or not all(_ignores_sigterm(w.process.pid) for w in pipeline._pool):
            time.sleep(0.05)  # both workers are inside the hang: no stop message read, SIGTERM ignored
        pids = [worker.process.pid for worker in pipeline._pool]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    with pytest.raises(Exception, match="stopping"):
        pipeline._start_worker()


def test_ctrl_c_stops_the_workers_and_leaves_a_resumable_run(tmp_path, checkpoint_dir, data10, serial_run):
    table, images = data10
    out = tmp_path / "run"
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, workers=2)
    # The model halts before its second batch until Ctrl-C: the interrupt lands at a known point on any machine.
    env = {**os.environ, "HALP_HALT_MODEL_AFTER_BATCHES": "1"}
    log_file = tmp_path / "stderr.txt"  # a file, not a pipe: an unread full pipe would stall the child
    process = subprocess.Popen(
        [sys.executable, "-m", "halp.testing.slow_cli", "extract", *cli_args(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file.open("w"),
    )
    store = RunStore(out)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline and not (out.exists() and store.part_paths()):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # slow_cli prints every thread's stack: where it hangs
        time.sleep(2)
        process.kill()  # a hang after the interrupt is the failure; leave no process behind
        process.wait()
        pytest.fail("halp extract did not end within 90 s of Ctrl-C; its threads:\n" + log_file.read_text()[-6000:])
    stderr = log_file.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "resume" in stderr.splitlines()[-1]
    pids = [
        int(line.rsplit("pid ", 1)[1].split()[0])
        for line in (out / "extract.log").read_text().splitlines()
        if "input worker pid" in line
    ]
    assert pids and not any(_alive(pid) for pid in pids)
    committed = store.committed_ids()
    assert len(committed) == 2, sorted(committed)  # the one batch (of 2 rows) the model finished

    summary = run_extraction(config)
    assert summary.finished and summary.already_done == len(committed)
    _assert_same_run(read_run(out / "features.h5"), read_run(serial_run / "features.h5"))


def test_batch_size_auto_halves_from_the_longest_rows_until_they_fit():
    tried: list[list[str]] = []

    def try_batch(rows: list[str]) -> None:
        tried.append(rows)
        if len(rows) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    rows = [f"row{i}" for i in range(100)]  # longest first
    size = find_batch_size(rows, try_batch, (torch.OutOfMemoryError,), start=64)
    assert size == 4
    assert [len(batch) for batch in tried] == [64, 32, 16, 8, 4]
    assert all(batch == rows[: len(batch)] for batch in tried)  # always the longest rows


def test_batch_size_auto_on_cpu_is_recorded(tmp_path, checkpoint_dir, data10):
    table, images = data10
    out = tmp_path / "run"
    summary = run_extraction(cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, batch_size="auto"))
    assert summary.finished and summary.batch_size == 8
    with h5py.File(out / "features.h5") as handle:
        assert int(handle.attrs["batch_size"]) == 8 and bool(handle.attrs["batch_size_auto"])


def test_attention_kernels_agree_and_a_missing_kernel_is_a_clear_error(tmp_path, checkpoint_dir, data10, serial_run):
    table, images = data10
    out = tmp_path / "eager"
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, out, workers=0, attn_implementation="eager")
    assert run_extraction(config).finished
    with h5py.File(out / "features.h5") as handle:
        assert handle.attrs["attn_implementation"] == "eager"
    # float32 on CPU: eager and SDPA differ only by summation order.
    _assert_same_run(read_run(out / "features.h5"), read_run(serial_run / "features.h5"), rtol=1e-4)
    with pytest.raises(ModelLoadError, match="flash_attn"):
        run_extraction(replace(config, out=tmp_path / "flash", attn_implementation="flash_attention_2"))
    with pytest.raises(ModelLoadError, match="choose sdpa"):
        run_extraction(replace(config, out=tmp_path / "bad", attn_implementation="fastest"))


#: transformers' torchvision and PIL image-processor backends resize with different implementations: on this set the
#: normalised pixel values differ by up to 0.015 (of a range of about +-1.9) and the float32 features by up to
#: 6.7e-4 of their largest magnitude; the bound leaves a 7x margin. Documented in docs/benchmarks.md.
BACKEND_TOLERANCE = 5e-3


def test_processor_backends_give_the_same_features_within_tolerance(checkpoint_dir, loaded, data10):
    from transformers import AutoImageProcessor, AutoProcessor

    from halp.loading import load_processor

    table, images = data10
    model, torchvision_processor = loaded("qwen2_5_vl")
    assert type(torchvision_processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    path = str(checkpoint_dir("qwen2_5_vl"))
    pil_images = AutoImageProcessor.from_pretrained(path, backend="pil")
    pil_processor = AutoProcessor.from_pretrained(path, image_processor=pil_images)
    assert type(pil_processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    samples = read_samples(table)[:4]
    batch = [load_image(images, s.image_id) for s in samples], [s.question for s in samples]
    results = []
    for processor in (torchvision_processor, pil_processor, load_processor(str(checkpoint_dir("qwen2_5_vl")))):
        adapter = adapter_for(model, processor)
        results.append(FeatureExtractor(adapter, parse_layers("halp", adapter.num_layers))(*batch))
    torchvision, pil, reloaded = results
    for name, value in torchvision.features.items():
        scale = np.abs(value).max()
        assert np.abs(pil.features[name] - value).max() <= BACKEND_TOLERANCE * scale, name
        np.testing.assert_allclose(reloaded.features[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_processor_on_the_gpu_needs_the_model_there(loaded):
    model, processor = loaded("qwen2_vl")
    adapter = adapter_for(model, processor)
    extractor = FeatureExtractor(adapter, [0])
    assert resolve_processor_device("auto", extractor, "cpu") == "cpu"
    with pytest.raises(ParameterError, match="CUDA"):
        resolve_processor_device("cuda", extractor, "cpu")


@pytest.mark.parametrize(
    ("device", "cores", "torch_threads", "expected"),
    [
        ("cuda", 2, 2, 1),  # beside a GPU model one core is the model's, the other decodes
        ("cuda:1", 16, 16, 4),  # at most 4
        ("cuda", 1, 1, 1),  # at least one: the host is free while the device computes
        ("cpu", 2, 2, 0),  # the model's threads use both cores: a worker would compete with them
        ("cpu", 16, 16, 0),
        ("cpu", 8, 4, 4),  # torch left four cores free
        ("cpu", 8, 6, 2),
    ],
)
def test_default_workers_are_those_that_can_help_on_the_device(monkeypatch, device, cores, torch_threads, expected):
    import halp.pipeline as pipeline

    monkeypatch.setattr(pipeline, "usable_cores", lambda: cores)
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: torch_threads)
    assert pipeline.default_workers(device) == expected


def test_a_default_cpu_run_on_two_cores_runs_in_series(tmp_path, checkpoint_dir, data10, monkeypatch):
    import halp.pipeline as pipeline

    monkeypatch.setattr(pipeline, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline.torch, "get_num_threads", lambda: 2)
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), *data10, tmp_path / "run")
    assert config.workers is None
    summary = run_extraction(config)
    assert summary.finished and summary.stages.workers == 0
    with h5py.File(tmp_path / "run" / "features.h5", "r") as handle:
        assert int(handle.attrs["workers"]) == 0


def test_input_workers_start_while_the_model_loads_and_stop_if_it_fails(checkpoint_dir, monkeypatch, tmp_path, data10):
    """Entering the pipeline starts its workers, which load the processor before the model has loaded (issue 24: the
    cold start no longer delays the first batch); a model that fails to load leaves no worker behind."""
    import multiprocessing

    import halp.local_engine

    seen_during_loading: list[list[str]] = []

    def loading(*args, **kwargs):
        # The model "loads" until an input worker process exists (bounded): it was started before loading ended.
        deadline = time.monotonic() + 120
        while not any(child.name == "halp-input" for child in multiprocessing.active_children()):
            assert time.monotonic() < deadline, "no input worker started while the model was loading"
            time.sleep(0.05)
        seen_during_loading.append([child.name for child in multiprocessing.active_children()])
        raise ModelLoadError("the model could not be loaded (on purpose)")

    monkeypatch.setattr(halp.local_engine, "load_model", loading)
    table, images = data10
    config = cpu_extract_config(checkpoint_dir("qwen2_vl"), table, images, tmp_path / "run", workers=1)
    with pytest.raises(ModelLoadError):
        run_extraction(config)
    assert seen_during_loading and "halp-input" in seen_during_loading[0]
    assert not [child for child in multiprocessing.active_children() if child.name == "halp-input"]


def test_a_worker_loads_its_processor_before_it_is_given_the_setup(checkpoint_dir):
    spec = WorkerSpec(model=str(checkpoint_dir("qwen2_vl")), trust_remote_code=False)
    with InputPipeline(spec, workers=1, timing=StageTimes()) as pipeline:
        deadline = time.monotonic() + 120
        while not pipeline._pool:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker = pipeline._pool[0]
        assert worker.conn.poll(120), "the worker did not finish loading its processor"
        message = worker.conn.recv()
        assert message[0] == "ready" and message[1] == worker.process.pid  # ready without a plan or a setup
    assert not worker.process.is_alive()
