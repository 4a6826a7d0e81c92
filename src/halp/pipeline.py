"""The overlapped extraction pipeline: input workers with bounded prefetch, an in-order writer, stage timing.

A batch goes through four stages: load its images (decode), process them (the processor's tensors), run the
model (one prefill, then the greedy answer), commit (an HDF5 part: temporary file, fsync, rename). Done in
series, the device waits while the host decodes, processes and commits. Here the stages overlap:

- `--workers N` input worker **processes** decode the images and run the processor, at most `prefetch`
  batches ahead of the model. A process, not a thread: the processor's Python does not contend with the
  model's for the GIL, and a worker that crashes (a native decoder on a malformed file) takes only its own
  batch down: those rows are recorded as failed (stage `worker`) and a fresh worker replaces it.
- a **feeder thread** in the main process hands batches to idle workers, puts their results back in batch
  order, finds the token positions, pins host tensors for an asynchronous copy to CUDA, and, with
  `--processor-device cuda`, runs the processor on the GPU (the workers then only decode);
- the **model** runs in the main thread, one batch after the other, in plan order;
- a **writer thread** commits finished batches in the same order. The commit is unchanged (atomic parts), so
  a crash loses at most the batches not yet committed — the one in the model, the one being committed and
  one waiting for the writer — never a committed row; a rerun extracts exactly the rows with no committed part.

`--workers 0` runs every stage in series in the calling thread (no process, no thread), as before.

Batches are planned by token count: within windows of `BUCKET_BATCHES` batches, rows are sorted by the
number of tokens the processor will give them (its own `_get_num_multimodal_tokens` for the image, the
tokenizer for the text), so a batch pads little. The padding actually paid is measured from the attention
masks and reported with the stage times (`StageTimes`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import torch
from PIL import Image

from halp.data import ImageSource, Sample
from halp.errors import InputWorkerError
from halp.inputs import Prepared, RowFailure, RowRules, prepare
from halp.loading import load_processor

log = logging.getLogger(__name__)

#: Rows are planned this many batches at a time and sorted by token count within that window.
BUCKET_BATCHES = 16
#: `--batch-size auto` starts here and halves on out-of-memory.
AUTO_BATCH_START = 64
#: `--batch-size auto` on a device without a memory limit to probe (CPU): the default batch size.
AUTO_BATCH_CPU = 8


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: More input workers than this rarely help: past it the processor is not the bottleneck.
MAX_DEFAULT_WORKERS = 4


def default_workers(device: str) -> int:
    """Input workers only where they can help.

    With the model on a GPU the host is free while the device computes, so decoding and processing ahead of it
    pays: one worker per core beyond the model's thread, at most `MAX_DEFAULT_WORKERS`, at least one. With the
    model on the CPU its torch threads already use the cores, and a worker would compete with them (on 2 cores,
    measured: the model stage 1.5x slower, the run 1.7x slower); the input stage is a few percent of a batch
    there (docs/benchmarks.md), so workers start only on cores the model's torch threads leave free.
    """
    cores = usable_cores()
    if device.startswith("cuda"):
        return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))
    return max(0, min(MAX_DEFAULT_WORKERS, cores - torch.get_num_threads()))


def _context() -> Any:
    import multiprocessing

    # forkserver: workers fork from a clean process, never from one whose threads hold locks (OpenMP, CUDA).
    context = multiprocessing.get_context("forkserver")
    # What every worker imports to load a processor, imported once in the server (workers fork with it).
    context.set_forkserver_preload(
        ["halp.inputs", "halp.loading", "transformers", "transformers.models.auto.processing_auto", "torchvision"]
    )
    return context


# ----- stage timing ------------------------------------------------------------------------------------


@dataclass
class StageTimes:
    """Seconds per stage of one extraction pass, and the padding its batches paid.

    `loading_images` and `processing` are summed over the input workers (they run in parallel, so they can
    exceed the wall time); `model` and `committing` are the main thread's and the writer's. `waiting_for_input`
    is the time the model waited for its next batch; `stall_fraction` is that over the wall time.
    """

    loading_images: float = 0.0
    processing: float = 0.0
    model: float = 0.0
    committing: float = 0.0
    waiting_for_input: float = 0.0
    #: Of waiting_for_input, the wait for the first batch (worker start-up, processor loading).
    first_batch_wait: float = 0.0
    wall: float = 0.0
    batches: int = 0
    tokens: int = 0
    padding_tokens: int = 0
    workers: int = 0
    processor_device: str = "cpu"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **seconds: float) -> None:
        with self._lock:
            for name, value in seconds.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def stall_fraction(self) -> float:
        return self.waiting_for_input / self.wall if self.wall > 0 else 0.0

    @property
    def steady_stall_fraction(self) -> float:
        """The stall once the first batch has arrived (without the workers' start-up)."""
        steady = self.wall - self.first_batch_wait
        return (self.waiting_for_input - self.first_batch_wait) / steady if steady > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        values["stall_fraction"] = self.stall_fraction
        values["steady_stall_fraction"] = self.steady_stall_fraction
        values["padding_fraction"] = self.padding_fraction
        return values

    def line(self) -> str:
        """One line for the log and the console."""
        return (
            f"stages: loading images {self.loading_images:.1f}s, processing {self.processing:.1f}s "
            f"({self.workers} worker(s), processor on {self.processor_device}), model {self.model:.1f}s, "
            f"committing {self.committing:.1f}s, wall {self.wall:.1f}s; model waited for input "
            f"{self.stall_fraction:.1%} of the time ({self.first_batch_wait:.1f}s for the first batch, "
            f"{self.steady_stall_fraction:.1%} after it); "
            f"padding {self.padding_fraction:.1%} of "
            f"{self.tokens + self.padding_tokens} tokens in {self.batches} batch(es)"
        )


# ----- preparing a batch (shared by the workers and the serial path) -------------------------------------


# ----- input worker processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What an input worker process needs to start: the checkpoint whose processor it loads. Workers start with
    this alone, while the model loads; what depends on the loaded model comes later as a `WorkerSetup`."""

    model: str
    trust_remote_code: bool
    #: "module:function" called first in each worker: fault injection in tests (halp.testing.faults).
    init: str | None = None
    #: The main process's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), applied in the workers too.
    max_image_pixels: int | None = field(default_factory=lambda: Image.MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class WorkerSetup:
    """What the workers learn once the model has loaded, before their first batch: the adapter class (how its
    processor is called), the row rules (images, EXIF policy, the model's special tokens), and whether they run the
    processor or only decode (the processor then runs on the GPU, in the main process)."""

    adapter_class: type
    rules: RowRules
    encode: bool = True


def _worker_main(conn: Any, spec: WorkerSpec) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the workers itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Row failures are reported to the main process, which logs them; nothing here goes to the console.
    logging.getLogger("halp").addHandler(logging.NullHandler())
    logging.getLogger("halp").propagate = False
    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = spec.max_image_pixels
    try:
        if spec.init:
            module, _, function = spec.init.partition(":")
            getattr(importlib.import_module(module), function)()
        processor = load_processor(spec.model, spec.trust_remote_code)
    except Exception:  # reported to the main process, which fails the run with it
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    setup: WorkerSetup | None = None
    encoder = None
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if task is None:
            return
        if task[0] == "setup":
            setup = task[1]
            encoder = setup.adapter_class(None, processor) if setup.encode else None
            continue
        index, samples = task

        def progress(step: str, value: int, index: int = index) -> None:
            conn.send(("progress", index, step, value))

        prepared = prepare(index, samples, setup.rules, encoder, progress)
        if prepared.inputs is not None:
            # Through the pipe as numpy arrays (a copy), not torch's shared-memory files: those fail where
            # /dev/shm is small (64 MiB in a default Docker container) or a file-size limit applies.
            prepared.inputs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
        conn.send(prepared)


class _Worker:
    def __init__(self, context: Any, spec: WorkerSpec) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, spec), daemon=True, name="halp-input")
        self.process.start()
        child.close()
        self.task: tuple[int, list[Sample]] | None = None
        self.ready = False
        self.closed = False
        #: The step of its task the worker last announced ("sent": none yet; "row": reading the row at `position`;
        #: "processing": `position` rows in the processor), and when (time.monotonic).
        self.step = "sent"
        self.position = 0
        self.since = 0.0

    def give(self, task: tuple[int, list[Sample]]) -> None:
        self.task = task
        self.step, self.position, self.since = "sent", 0, time.monotonic()
        self.conn.send(task)

    def overdue(self, row_timeout: float, now: float) -> bool:
        """Whether the step in progress has run past its deadline: `row_timeout` for a row (or for starting the
        task), `row_timeout` per row for the processor."""
        if self.task is None:
            return False
        allowed = row_timeout * max(1, self.position) if self.step == "processing" else row_timeout
        return now - self.since > allowed

    def ask_to_stop(self) -> None:
        """The worker ends after its current batch (a task message is small: this never blocks)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)

    def end(self, deadline: float) -> None:
        """Wait until `deadline` (time.monotonic) for the worker to end, then terminate it, then kill it.

        A worker blocked sending a large batch to a main process that no longer reads never reads its stop
        message: it is terminated. Each step is bounded, so a Ctrl-C never waits on a worker for long."""
        self.process.join(max(0.0, deadline - time.monotonic()))
        for signal_it in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                break
            signal_it()
            self.process.join(_WORKER_SIGNAL_WAIT)
        with contextlib.suppress(OSError):
            self.conn.close()


_END = object()
#: Seconds an input worker may spend on one row's image (and, per row, on a batch in the processor) before it is
#: ended and that row recorded as failed (`--row-timeout`).
ROW_TIMEOUT = 120.0
#: Seconds a stopping worker gets to finish its batch, and then to end after SIGTERM (and after SIGKILL).
_WORKER_STOP_WAIT = 5.0
_WORKER_SIGNAL_WAIT = 2.0
#: Seconds the model's thread waits for the feeder thread when stopping; every wait in the feeder is shorter.
_FEEDER_STOP_WAIT = 10.0


class _Stopping(Exception):
    """Raised in the feeder thread when the pipeline is closing."""


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class InputPipeline:
    """Prepared batches, in plan order, from `workers` background processes (or in series with 0 workers).

    Entering the pipeline starts its workers at once, each loading the checkpoint's processor, so that they are
    ready when the model has loaded; `start` then gives it the plan, the `WorkerSetup` that depends on the model,
    and `finish(prepared)`, which runs in the feeder thread on every batch before the model gets it (positions,
    pinning, the processor on the GPU). Iterating measures the model's wait for input into `timing`.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        timing: StageTimes,
        prefetch: int | None = None,
        row_timeout: float = ROW_TIMEOUT,
    ) -> None:
        self.spec = spec
        self.workers = workers
        self.timing = timing
        self.prefetch = prefetch if prefetch is not None else max(2, workers + 1)
        self.row_timeout = row_timeout
        self.plan: Iterator[tuple[int, list[Sample]]] = iter(())
        self.setup: WorkerSetup | None = None
        self.finish: Callable[[Prepared], Prepared] = lambda prepared: prepared
        self.encoder: Any | None = None  # the serial path's (workers=0)
        self._started = threading.Event()
        self._out: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: list[_Worker] = []
        self._pool_lock = threading.Lock()
        self.replaced = 0
        #: Rows of a batch whose worker died or ran out of time on one row: handed out again before new batches.
        self._retry: collections.deque[tuple[int, list[Sample]]] = collections.deque()
        #: Failures of a batch's guilty rows, joined to the batch's result when its retried rows come back.
        self._carried: dict[int, list[RowFailure]] = {}

    # -- the consumer side (the model's thread)
    def __enter__(self) -> InputPipeline:
        if self.workers > 0:
            # The feeder thread starts the workers (forking from the fork server waits for its imports): the
            # caller goes on loading the model meanwhile.
            self._thread = threading.Thread(target=self._feed, name="halp-feeder", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        plan: Iterator[list[Sample]],
        setup: WorkerSetup,
        finish: Callable[[Prepared], Prepared] | None = None,
        encoder: Any | None = None,
    ) -> None:
        """Hand out `plan`'s batches: to the workers with `setup`, or in series through `encoder` (an adapter)."""
        self.plan = enumerate(plan)
        self.setup = setup
        self.finish = finish or self.finish
        self.encoder = encoder if setup.encode else None
        self._started.set()

    def __iter__(self) -> Iterator[Prepared]:
        if not self._started.is_set():
            raise RuntimeError("InputPipeline.start must be called before its batches are read")
        if self.workers == 0:
            yield from self._serial()
            return
        first = True
        while True:
            start = time.perf_counter()
            item = self._out.get()
            waited = time.perf_counter() - start
            self.timing.add(waiting_for_input=waited, first_batch_wait=waited if first else 0.0)
            first = False
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def _serial(self) -> Iterator[Prepared]:
        assert self.setup is not None
        for index, samples in self.plan:
            start = time.perf_counter()
            prepared = self.finish(prepare(index, samples, self.setup.rules, self.encoder))
            # In series the model waits for every stage of its input.
            self.timing.add(
                loading_images=prepared.loading_seconds,
                processing=prepared.processing_seconds,
                waiting_for_input=time.perf_counter() - start,
            )
            yield prepared

    def close(self) -> None:
        """Stop the feeder and the workers (also on Ctrl-C or an error in the model thread).

        Every worker is asked to stop at once and they end in parallel under one deadline; once stopping, the
        feeder starts no new worker (a replacement started during a Ctrl-C would otherwise outlive the run)."""
        start = time.monotonic()
        with self._pool_lock:
            self._stop.set()
            for worker in self._pool:
                worker.ask_to_stop()
        if self._thread is not None:
            self._thread.join(_FEEDER_STOP_WAIT)
            if self._thread.is_alive():
                log.warning("the input feeder did not stop within %.0f s; its workers are ended", _FEEDER_STOP_WAIT)
            self._thread = None
        with self._pool_lock:
            pool, self._pool = self._pool, []
        # Every worker in the pool was asked above: none can start once _stop is set (both under the lock).
        deadline = time.monotonic() + _WORKER_STOP_WAIT
        for worker in pool:
            worker.end(deadline)
        if pool:
            log.info("stopped %d input worker(s) in %.1f s", len(pool), time.monotonic() - start)

    # -- the feeder thread
    def _feed(self) -> None:
        try:
            self._feed_loop()
            self._out.put(_END)
        except _Stopping:  # close() was called: nobody reads any more
            pass
        except BaseException as err:  # handed to the model's thread, which raises it
            self._out.put(_Raised(err))

    def _start_worker(self) -> _Worker:
        """A new worker, registered in the pool under the lock; none once the pipeline is stopping."""
        with self._pool_lock:
            if self._stop.is_set():
                raise _Stopping("the input pipeline is stopping: no new worker")
            worker = _Worker(_context(), self.spec)
            self._pool.append(worker)
            return worker

    def _feed_loop(self) -> None:
        for _ in range(self.workers):
            self._start_worker()
        while not self._started.wait(0.2):  # the model is loading; the workers load their processor meanwhile
            if self._stop.is_set():
                return
        ready: dict[int, Prepared] = {}
        next_index = 0
        exhausted = False
        while not self._stop.is_set():
            # Hand out tasks while fewer than `prefetch` batches are on their way or waiting for the model; the
            # rows of a batch that lost its worker first (its index is the one the model waits for).
            outstanding = sum(w.task is not None for w in self._pool) + len(ready) + self._out.qsize()
            for worker in self._pool:
                if worker.ready and worker.task is None and self._retry:
                    worker.give(self._retry.popleft())
                    continue
                if exhausted or outstanding >= self.prefetch:
                    break
                if worker.ready and worker.task is None:
                    item = next(self.plan, None)
                    if item is None:
                        exhausted = True
                        break
                    worker.give((item[0], item[1]))
                    outstanding += 1
            while next_index in ready:
                self._deliver(ready.pop(next_index))
                next_index += 1
            if exhausted and not ready and not self._retry and all(w.task is None for w in self._pool):
                return
            waitables = [w.conn for w in self._pool] + [w.process.sentinel for w in self._pool]
            wait(waitables, timeout=0.2)
            now = time.monotonic()
            for worker in list(self._pool):
                while (message := self._receive(worker)) is not None:
                    ready[message.index] = message
                overdue = worker.overdue(self.row_timeout, now)
                if overdue or worker.closed or not worker.process.is_alive():
                    while (message := self._receive(worker)) is not None:  # what it sent before it ended
                        ready[message.index] = message
                    lost = self._replace(worker, overdue and worker.task is not None)
                    if lost is not None:
                        ready[lost.index] = lost

    def _receive(self, worker: _Worker) -> Prepared | None:
        """The worker's next result, if one is waiting; sets worker.closed when its end of the pipe is gone."""
        while not worker.closed:
            try:
                if not worker.conn.poll():
                    return None
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.closed = True
                return None
            if isinstance(message, tuple) and message and message[0] == "failed":
                raise InputWorkerError(f"an input worker could not start: {message[1].strip().splitlines()[-1]}")
            if isinstance(message, tuple) and message and message[0] == "ready":
                worker.ready = True
                worker.conn.send(("setup", self.setup))  # before any task: the pipe keeps the order
                log.info("input worker pid %d ready", message[1])
                continue
            if isinstance(message, tuple) and message and message[0] == "progress":
                worker.step, worker.position, worker.since = message[2], message[3], time.monotonic()
                continue
            worker.task = None
            message.failures = self._carried.pop(message.index, []) + message.failures
            if message.inputs is not None:
                message.inputs = {
                    k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in message.inputs.items()
                }
            self.timing.add(loading_images=message.loading_seconds, processing=message.processing_seconds)
            return message
        return None

    def _replace(self, worker: _Worker, timed_out: bool = False) -> Prepared | None:
        """A worker died, or ran past the deadline of one step (`timed_out`: it is ended now), and a new worker takes
        its place. The row it was reading fails (a rerun retries it) and the batch's other rows are handed out again;
        a worker lost while processing (no one row to blame) costs its batch's rows."""
        pid = worker.process.pid
        # A live worker whose pipe is gone, or that is stuck, is no use any more.
        worker.end(time.monotonic() + (0.0 if timed_out else _WORKER_STOP_WAIT))
        code = worker.process.exitcode
        if not worker.ready:
            raise InputWorkerError(f"an input worker exited with code {code} before it was ready")
        with self._pool_lock:
            self._pool.remove(worker)
        self._start_worker()
        self.replaced += 1
        if worker.task is None:
            log.warning("input worker %s exited with code %s between batches; replaced", pid, code)
            return None
        index, samples = worker.task
        if timed_out:
            error = "InputRowTimeout"
            what = (f"took more than {self.row_timeout:g} s" + (" per row" if worker.step == "processing" else "")
                    + f" in the input worker (pid {pid}), which was ended")
        else:
            error = "InputWorkerDied"
            what = (f"ended the input worker (pid {pid}, exit code {code}): a decoder crash on a malformed image, or "
                    "the worker was killed")
        if worker.step == "row" and 0 <= worker.position < len(samples):
            guilty = samples[worker.position]
            rest = samples[: worker.position] + samples[worker.position + 1 :]
            failure = (guilty, "worker", error, f"reading this row's image {what}; a rerun retries it")
            log.warning("input worker %s: row %s %s; its batch's other rows are retried", pid, guilty.question_id,
                        "timed out" if timed_out else f"died (exit code {code})")
            if rest:
                self._carried.setdefault(index, []).append(failure)
                self._retry.append((index, rest))
                return None
            return Prepared(index, [], [*self._carried.pop(index, []), failure])
        stage = "processing" if worker.step == "processing" else "starting"
        message = f"{stage} this row's batch {what}; a rerun retries it"
        log.warning("input worker %s %s with batch %d; replaced", pid,
                    "timed out" if timed_out else f"died (exit code {code})", index)
        return Prepared(index, [], self._carried.pop(index, []) + [(s, "worker", error, message) for s in samples])

    def _deliver(self, prepared: Prepared) -> None:
        self._out.put(self.finish(prepared))


# ----- the in-order writer --------------------------------------------------------------------------------


class OrderedWriter:
    """Runs commits one after the other in submission order, in a thread (or inline with background=False).

    At most `depth` commits wait; the model then waits too (its time is counted as model time). The first
    error stops the writer: later commits are not run (the order would break) and the error is raised in the
    submitting thread at its next submit or at close.
    """

    def __init__(self, timing: StageTimes, background: bool = True, depth: int = 1) -> None:
        self.timing = timing
        self.background = background
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="halp-writer", daemon=True)
            self._thread.start()

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(raise_error=exc_type is None)

    def submit(self, commit: Callable[[], None]) -> None:
        self._raise_error()
        if not self.background:
            self._run(commit)
            return
        self._queue.put(commit)

    def close(self, raise_error: bool = True) -> None:
        """Wait for every submitted commit (on Ctrl-C too: what the model finished is worth keeping)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if raise_error:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self, commit: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            commit()
        finally:
            self.timing.add(committing=time.perf_counter() - start)

    def _loop(self) -> None:
        while True:
            commit = self._queue.get()
            if commit is None:
                return
            if self._error is not None:
                continue  # after a failed commit nothing later may be committed
            try:
                self._run(commit)
            except BaseException as err:  # raised in the submitting thread
                self._error = err


# ----- planning batches by token count --------------------------------------------------------------------


class TokenCounter:
    """How many tokens the processor will give a row, without processing it: the tokenizer for the text and
    the processor's own count for an image of that size (a file's header is read, not decoded)."""

    def __init__(self, encoder: Any, images: ImageSource) -> None:
        self.encoder = encoder
        self.images = images
        # Its own tokenizer: the feeder thread counts while the model's thread decodes answers, and a Rust
        # tokenizer called with padding/truncation settings must not be shared across threads ("Already borrowed").
        self.tokenizer = copy.deepcopy(encoder.tokenizer())
        self.image_token_id = encoder.image_token_id
        processor = encoder.processor
        self.counts_images = callable(getattr(processor, "_get_num_multimodal_tokens", None))

    def image_size(self, sample: Sample) -> tuple[int, int] | None:
        return self.images.size(sample)  # None: the worker records the real error when it loads the image

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        sizes = [self.image_size(sample) for sample in samples]
        counts = []
        for sample, size in zip(samples, sizes, strict=True):
            if size is None:
                counts.append(0.0)
                continue
            ids = self.tokenizer(self.encoder.prompt(sample.question), add_special_tokens=False)["input_ids"]
            # The processor replaces the prompt's image placeholder by the image's tokens.
            counts.append(len(ids) - ids.count(self.image_token_id) + self._image_tokens(size))
        return counts

    def _image_tokens(self, size: tuple[int, int]) -> float:
        if self.counts_images:
            try:
                counted = self.encoder.processor._get_num_multimodal_tokens(image_sizes=[list(size)])
                value = counted["num_image_tokens"] if isinstance(counted, dict) else counted.num_image_tokens
                return float(value[0])
            except (NotImplementedError, AttributeError, KeyError, TypeError, ValueError):
                self.counts_images = False
        # The processor cannot count: a dynamic-resolution model's tokens grow with the area, so order by it.
        return size[0] * size[1] / (28 * 28)


def plan_batches(
    todo: Sequence[Sample], batch_size: int, count: Callable[[Sequence[Sample]], list[float]]
) -> Iterator[list[Sample]]:
    """Batches of rows with similar token counts, window by window (features do not depend on the batch)."""
    window = batch_size * BUCKET_BATCHES
    for start in range(0, len(todo), window):
        rows = list(todo[start : start + window])
        counts = count(rows)
        order = sorted(range(len(rows)), key=lambda i: counts[i])
        for first in range(0, len(order), batch_size):
            yield [rows[i] for i in order[first : first + batch_size]]


def padding_of(inputs: dict[str, Any]) -> tuple[int, int]:
    """(tokens, padding tokens) of a batch's processor inputs."""
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return 0, 0
    tokens = int(mask.sum())
    return tokens, int(mask.numel()) - tokens


def pin(inputs: dict[str, Any]) -> dict[str, Any]:
    """Host tensors in page-locked memory, so the copy to the GPU runs without blocking the host."""
    return {
        key: value.pin_memory() if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value
        for key, value in inputs.items()
    }


# ----- --batch-size auto ----------------------------------------------------------------------------------


def find_batch_size(
    rows_longest_first: Sequence[Sample],
    try_batch: Callable[[list[Sample]], None],
    out_of_memory: tuple[type[BaseException], ...],
    start: int = AUTO_BATCH_START,
    on_out_of_memory: Callable[[], None] = lambda: None,
) -> int:
    """The largest batch size, halving from `start`, at which the longest rows run without running out of
    memory. The longest rows are the worst case: every later batch has rows no longer than these."""
    size = max(1, min(start, len(rows_longest_first)))
    while True:
        try:
            try_batch(list(rows_longest_first[:size]))
            return size
        except out_of_memory:
            on_out_of_memory()
            if size == 1:
                return 1  # not even one row fits: the run records those rows as out-of-memory failures
            log.info("--batch-size auto: %d rows do not fit; trying %d", size, size // 2)
            size //= 2
