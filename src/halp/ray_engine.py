"""`halp extract --engine ray`: the same extraction core in a pool of Ray actors (the optional `ray` extra).

The driver (the `halp extract` process) validates the table, holds the run lock for its whole life like a
single-process run, and lists what is already committed. The rows still to do become a Ray Dataset,
one block per batch; `map_batches` runs them through `ExtractWorker`, a callable class: each actor
loads the model once on the GPU(s) Ray gives it and commits parts to its own directory of the run,
`RUN_DIR/ray/<worker>/parts/` (the run directory must be on a filesystem every node sees). Only a
small status record per row travels back to the driver, which logs failed rows and assembles
`features.h5` in table order.

Ray retries a task whose actor died, on a restarted actor: rows the dead actor had committed are then
committed again. That is the only way a row can be committed twice, and the assembly keeps one copy
(`RunStore.assemble`), so the finished run holds every row exactly once. A rerun after the driver
died resumes from everything committed, like a single-process run.

`ray` is imported only here, and only when this engine runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from halp.data import Sample
from halp.errors import MissingDependencyError, ParameterError, RayWorkerError, ShardError, install_hint
from halp.extract import run_extraction
from halp.inputs import FailureList
from halp.layout import LOG_FILE
from halp.loading import resolve_device
from halp.local_engine import extract_batch, prepare_extractor
from halp.run_records import ExtractConfig, ExtractPass, ExtractSummary, Job, RunAttributes, image_source
from halp.shard import Shard
from halp.store import RunLockedError, RunStore

log = logging.getLogger(__name__)

_STATUS_FIELDS = ("question_id", "status", "stage", "error", "message")
#: Ray stops an actor pool asynchronously once the dataset is consumed; its actors exit within seconds.
WORKER_EXIT_GRACE_S = 60.0
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(:|$)")


def _worker_failure(err: Exception, run_dir: Path) -> RayWorkerError:
    """One line a user can act on; Ray's full remote traceback goes to the run's log."""
    log.error("Ray worker failure:\n%s", err)
    lines = [line.strip() for line in str(err).splitlines() if _ERROR_LINE.match(line.strip())]
    cause = lines[-1] if lines else type(err).__name__
    return RayWorkerError(
        f"a Ray worker failed: {cause}. Committed rows are kept; fix the cause and rerun the same command "
        f"(Ray's traceback is in {run_dir / LOG_FILE})."
    )


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # Ray Data comes with the ray[data] extra, not plain ray
    except ImportError as err:
        raise MissingDependencyError(
            f"--engine ray needs Ray Data ({err}); install it with: {install_hint('ray')}"
        ) from err
    return ray


def _wait_for_workers_to_exit(store: RunStore, timeout: float) -> dict[Path, str]:
    """Wait until no worker (or shard) of the run holds its directory; what is still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while (live := store.live_writers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def worker_dtype(dtype: str, gpus_per_worker: float, device: str) -> str:
    """The dtype the workers run in, decided on the driver (it may have no GPU) because run.json records it."""
    if dtype != "auto":
        return dtype
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus_per_worker > 0)
    # The single-process path picks float16 on GPUs without bfloat16; here the driver cannot ask the workers'
    # GPUs, so those users pass --dtype float16.
    return "bfloat16" if on_gpu else "float32"


class ExtractWorker:
    """One Ray actor: loads the model once, then extracts and commits the batches Ray Data hands it."""

    def __init__(self, config: dict[str, Any], dtype: str, max_new_tokens: int) -> None:
        self.config = ExtractConfig(**config)
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        # A fresh directory per actor process (a restarted actor gets a new one): one writer per parts directory.
        worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.store = RunStore.for_ray_worker(self.config.out, worker_id)
        self.store.lock()
        device = resolve_device(self.config.device)  # on the worker: the GPU(s) Ray assigned it, if any
        self.extractor, self.attrs = prepare_extractor(ExtractPass(self.config, device, dtype, max_new_tokens))
        self.attrs.engine = "ray"
        self.images = image_source(self.config)  # files under --images, or the table's embedded images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        samples = [
            Sample(str(qid), str(image_id), str(question), str(truth), json.loads(str(meta)),
                   image_row=None if int(row) < 0 else int(row))
            for qid, image_id, question, truth, meta, row in zip(
                batch["question_id"],
                batch["image_id"],
                batch["question"],
                batch["ground_truth"],
                batch["meta"],
                batch["image_row"],
                strict=True,
            )
        ]
        failures = FailureList()
        extract_batch(
            samples,
            self.images,
            self.extractor,
            self.max_new_tokens,
            self.store,
            self.attrs,
            failures,
            self.dtype,
            self.config.exif_orientation,
        )
        failed = {entry["question_id"]: entry for entry in failures.failed}
        status: dict[str, list[str]] = {name: [] for name in _STATUS_FIELDS}
        for sample in samples:
            entry = failed.get(sample.question_id)
            status["question_id"].append(sample.question_id)
            status["status"].append("failed" if entry else "ok")
            for name in ("stage", "error", "message"):
                status[name].append(entry[name] if entry else "")
        return status


class RayEngine:
    """The rows run in a pool of Ray actors, each a model copy committing to its own directory of the run; this
    process is the driver (the run's one writer of record, as a single-process run is)."""

    name = "ray"

    def __init__(
        self,
        num_workers: int,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float = 1.0,
        worker_class: type[ExtractWorker] = ExtractWorker,
    ) -> None:
        self.num_workers = num_workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.worker_class = worker_class
        self.ray: Any = None

    def check(self, config: ExtractConfig, shard: Shard) -> None:
        if config.batch_size == "auto":
            raise ParameterError("batch_size", "auto applies to the local engine; give Ray workers a number")
        if self.num_workers < 1:
            raise ParameterError("num_workers", "must be at least 1")
        if shard.is_sharded:
            raise ShardError(
                "--engine ray spreads the rows over its workers itself: drop --num-shards/--shard-index "
                "and do not start it under torchrun/accelerate"
            )

    def resolve(self, config: ExtractConfig, shard: Shard) -> ExtractPass:
        """Connect to the cluster (RAY_ADDRESS, the one this process runs in, or a new local one) and decide the
        workers' dtype here, on the driver, because run.json records it."""
        # Workers may run on other nodes: every path they open must be absolute (and on a shared filesystem).
        config = replace(
            config,
            out=Path(config.out).resolve(),
            images=Path(config.images).resolve() if config.images is not None else None,
            data=_absolute_data(config.data),
            model=str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
        )
        self.ray = ray = _import_ray()
        if not ray.is_initialized():
            ray.init()
        if self.gpus_per_worker is None:
            self.gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        dtype = worker_dtype(config.dtype, self.gpus_per_worker, config.device)
        return ExtractPass(config, config.device, dtype, config.max_new_tokens if config.generate else 0)

    def opened(self, store: RunStore) -> None:
        """Workers of an earlier run of this directory must be gone before its rows are planned."""
        live = _wait_for_workers_to_exit(store, WORKER_EXIT_GRACE_S)
        if live:
            running = ", ".join(f"{path.relative_to(store.root)} (pid {pid})" for path, pid in live.items())
            raise RunLockedError(
                f"{store.root}: {running} still holds its directory (a Ray worker of an earlier run, or a shard); "
                "stop it (ray job stop ...) before rerunning"
            )

    def execute(self, job: Job) -> RunAttributes:
        """One block per batch through `map_batches` on the actor pool; failed rows are recorded as they report.
        The attributes are those the workers recorded in their parts, with the pool's size."""
        ray, config, summary = self.ray, job.run.config, job.summary
        start = time.perf_counter()
        ray.data.DataContext.get_current().enable_progress_bars = config.progress
        items = [
            {
                "question_id": sample.question_id,
                "image_id": sample.image_id,
                "question": sample.question,
                "ground_truth": sample.ground_truth,
                "meta": json.dumps(sample.meta),
                "image_row": -1 if sample.image_row is None else sample.image_row,
            }
            for sample in job.todo
        ]
        # One block per batch: Ray balances blocks over the actors, and a retry redoes one batch only.
        blocks = -(-len(items) // config.batch_size)
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        worker_config = {**asdict(config), "progress": False, "overwrite": False}
        statuses = dataset.map_batches(
            self.worker_class,
            fn_constructor_kwargs={
                "config": worker_config, "dtype": job.run.dtype, "max_new_tokens": job.run.max_new_tokens,
            },
            batch_size=config.batch_size,
            concurrency=self.num_workers,
            num_gpus=self.gpus_per_worker,
            num_cpus=self.cpus_per_worker,
        )
        by_id = {sample.question_id: sample for sample in job.todo}
        seen: set[str] = set()
        try:
            for row in statuses.iter_rows():
                qid = str(row["question_id"])
                if qid in seen:  # a retried task reports its rows again
                    continue
                seen.add(qid)
                if row["status"] == "ok":
                    summary.processed += 1
                else:
                    job.failures.record(by_id[qid], str(row["stage"]), str(row["error"]), str(row["message"]))
        except ray.exceptions.RayError as err:
            raise _worker_failure(err, job.store.root) from err
        # Our actors must be gone before we return: a rerun right away would otherwise see live writers.
        lingering = _wait_for_workers_to_exit(job.store, WORKER_EXIT_GRACE_S)
        if lingering:
            log.warning("Ray workers still alive %.0fs after the run: %s", WORKER_EXIT_GRACE_S, sorted(lingering))
        missing = set(by_id) - seen
        if missing:
            raise RayWorkerError(f"Ray returned no status for {len(missing)} row(s), e.g. {sorted(missing)[:3]}")
        summary.seconds = time.perf_counter() - start
        attributes = job.store.recorded_attributes()
        attributes.engine, attributes.num_workers, attributes.batch_size = "ray", self.num_workers, config.batch_size
        return attributes


def run_ray_extraction(
    config: ExtractConfig,
    num_workers: int,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    worker_class: type[ExtractWorker] = ExtractWorker,
) -> ExtractSummary:
    """Extract the table with `num_workers` Ray actors into config.out, resuming what is there.

    Connects to the cluster in RAY_ADDRESS (or the one this process runs in, e.g. under `ray job submit`), or starts
    a local one. gpus_per_worker None: 1 if the cluster has GPUs, else 0. `worker_class` is for tests (fault
    injection) and for users who wrap the worker.
    """
    return run_extraction(config, RayEngine(num_workers, gpus_per_worker, cpus_per_worker, worker_class))


def _absolute_data(data: Path | str | None) -> Path | str | None:
    """--data as the workers must open it: an absolute path (on a shared file system), or a URL as given."""
    if data is None or (isinstance(data, str) and "://" in data):
        return data
    return Path(data).resolve()
