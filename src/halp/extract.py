"""The batch loop: table -> images -> adapter -> one prefill pass -> decode -> committed part.

One process extracts the whole table (`num_shards` 1), or one shard of it (`halp.shard`): each shard commits
to its own directory of the run and the last one to finish assembles `features.h5` (see `halp.store`).
The Ray engine (`halp.ray_engine`) runs the same per-batch core, `extract_batch`, in its workers.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from halp.capture import BatchResult, FeatureExtractor, parse_layers
from halp.data import ImageError, Sample, load_image, read_samples
from halp.errors import ExtractOptionError
from halp.loading import check_attn_implementation, load_model, resolve_device, resolve_dtype
from halp.models import adapter_for
from halp.pipeline import (
    AUTO_BATCH_CPU,
    AUTO_BATCH_START,
    InputPipeline,
    OrderedWriter,
    Prepared,
    StageTimes,
    TokenCounter,
    WorkerSpec,
    default_workers,
    find_batch_size,
    load_rows,
    padding_of,
    pin,
    plan_batches,
    warm_up,
)
from halp.shard import Shard, resolve_shard
from halp.store import ERRORS_FILE, RunStore, rows_for, table_digest

log = logging.getLogger(__name__)

#: --processor-device choices.
PROCESSOR_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ExtractConfig:
    model: str
    data: Path
    images: Path
    out: Path
    layers: str = "halp"
    #: Rows per prefill pass, or "auto": the largest that fits in the device's memory (found at start).
    batch_size: int | str = 8
    max_new_tokens: int = 32
    generate: bool = True
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True
    #: Both None: one shard, or the shard a torch launcher (torchrun, accelerate launch) assigns.
    num_shards: int | None = None
    shard_index: int | None = None
    #: Input worker processes (decode + processor); None: one per spare core, at most 4; 0: all in series.
    workers: int | None = None
    #: Where the image processor runs: auto (the GPU when the model is on one and the processor can), cpu, cuda.
    processor_device: str = "auto"
    #: Attention kernel: sdpa, flash_attention_2 or eager.
    attn_implementation: str = "sdpa"
    #: Fault injection for tests: "module:function" run first in every input worker (halp.testing.faults).
    worker_init: str | None = None
    #: (model, processor) already in memory, used instead of loading `model` (benchmarks on random-weight
    #: full-size shapes); `model` must still name a checkpoint whose processor the input workers can load.
    preloaded: tuple[Any, Any] | None = None


@dataclass
class ExtractSummary:
    run_dir: Path
    total: int
    already_done: int
    processed: int
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False
    #: Sharded runs: this process's shard, whether features.h5 now holds every shard, shards still to finish,
    #: and the failed rows of the whole run once assembled.
    shard: Shard | None = None
    assembled: bool = False
    pending_shards: list[str] = field(default_factory=list)
    run_failed: int = 0
    #: Seconds per stage of this pass, the model's input-stall fraction, the padding paid.
    stages: StageTimes = field(default_factory=StageTimes)
    #: The batch size used (resolved from "auto").
    batch_size: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def versions() -> dict[str, str]:
    import transformers

    from halp import __version__

    return {"halp": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def batches(items: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "extract.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("halp").addHandler(handler)
    logging.getLogger("halp").setLevel(logging.INFO)
    return handler


def _model_ref(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def run_extraction(config: ExtractConfig) -> ExtractSummary:
    """Extract features for every sample of the table into config.out, resuming what is there."""
    validate_options(config)
    shard = resolve_shard(config.num_shards, config.shard_index)
    if shard.is_sharded and config.overwrite:
        raise ValueError(
            "--overwrite cannot be combined with several shards: one shard would delete what another has just "
            f"committed. Delete {config.out} first (or run once with --overwrite and one shard), then start the shards."
        )
    samples = read_table(config)  # table problems surface before the model loads
    if not Path(config.images).is_dir():
        raise FileNotFoundError(f"--images {config.images} is not a directory")

    device = device_for(resolve_device(config.device), shard)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    max_new_tokens = config.max_new_tokens if config.generate else 0
    if shard.is_sharded:
        return _run_shard(config, shard, samples, device, dtype, max_new_tokens)

    store = RunStore(config.out)
    store.lock()
    try:
        return _locked_run(config, store, samples, device, dtype, max_new_tokens)
    finally:
        store.unlock()


def validate_options(config: ExtractConfig) -> None:
    """Option errors surface before the table is read or a model loads."""
    if config.batch_size != "auto" and (not isinstance(config.batch_size, int) or config.batch_size < 1):
        raise ExtractOptionError(f"--batch-size {config.batch_size!r}: a positive integer or auto")
    if config.workers is not None and config.workers < 0:
        raise ExtractOptionError("--workers must be 0 (all stages in series) or more")
    if config.processor_device not in PROCESSOR_DEVICES:
        choices = ", ".join(PROCESSOR_DEVICES)
        raise ExtractOptionError(f"--processor-device {config.processor_device!r}: choose {choices}")
    check_attn_implementation(config.attn_implementation, resolve_device(config.device))


def read_table(config: ExtractConfig) -> list[Sample]:
    samples = read_samples(config.data)
    return samples[: config.limit] if config.limit is not None else samples


def device_for(device: str, shard: Shard) -> str:
    """A process started by a torch launcher uses the GPU of its LOCAL_RANK; otherwise `device` as resolved."""
    if shard.local_rank is None or device != "cuda":
        return device
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK is {shard.local_rank} but torch sees {count} GPU(s): start at most {count} processes per node"
        )
    torch.cuda.set_device(shard.local_rank)
    return f"cuda:{shard.local_rank}"


def run_identity(config: ExtractConfig, dtype: str, max_new_tokens: int, num_shards: int) -> dict[str, Any]:
    # The layer list is resolved after loading; the identity check uses the spec until then.
    return {
        "model": _model_ref(config.model),
        "layers": config.layers,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompt_format": "chat_template/user[image,text]",
        "num_shards": num_shards,
    }


def _locked_run(
    config: ExtractConfig, store: RunStore, samples: list[Sample], device: str, dtype: str, max_new_tokens: int
) -> ExtractSummary:
    store.open(run_identity(config, dtype, max_new_tokens, num_shards=1), overwrite=config.overwrite)
    handler = attach_log(store.root)
    try:
        return _run(config, store, samples, device, dtype, max_new_tokens)
    finally:
        logging.getLogger("halp").removeHandler(handler)
        handler.close()


def _run(
    config: ExtractConfig, store: RunStore, samples: list[Sample], device: str, dtype: str, max_new_tokens: int
) -> ExtractSummary:
    store.remove_stale_temporaries()
    store.remove_assembled_parts()
    order = [sample.question_id for sample in samples]
    done = store.committed_ids()
    todo = [sample for sample in samples if sample.question_id not in done]
    summary = ExtractSummary(store.root, len(samples), len(samples) - len(todo), 0)
    log.info("%d samples, %d already committed, %d to do", len(samples), summary.already_done, len(todo))

    if not todo and store.features_path.exists() and not store.all_part_paths():
        summary.finished = True  # nothing is missing: the assembled file stands, no model needed
        return summary

    warm_up(resolve_workers(config))
    extractor, attrs = prepare_extractor(config, device, dtype, max_new_tokens)
    if todo and store.features_path.exists():
        store.reopen_finished()
    failures = FailureLog(store.root / ERRORS_FILE, summary)
    start = time.perf_counter()
    _extract_all(config, extractor, todo, store, attrs, failures, dtype, max_new_tokens, summary, "extract")
    summary.seconds = time.perf_counter() - start
    attrs["stage_seconds"] = json.dumps(summary.stages.as_dict())

    attrs["hidden_size"] = _dim(store, "vision_projected")
    attrs["vision_hidden_size"] = _dim(store, "vision_only")
    attrs["complete"] = not summary.failed
    attrs["num_failed"] = len(summary.failed)
    store.assemble(order, attrs)
    summary.finished = not summary.failed
    log_rate(summary)
    return summary


def prepare_extractor(
    config: ExtractConfig, device: str, dtype: str, max_new_tokens: int
) -> tuple[FeatureExtractor, dict[str, Any]]:
    """Load the model, pick its adapter and layers; the attributes every committed part records."""
    if config.preloaded is not None:
        model, processor = config.preloaded
    else:
        model, processor = load_model(
            config.model, device, dtype, config.trust_remote_code, attn_implementation=config.attn_implementation
        )
    adapter = adapter_for(model, processor)
    layers = parse_layers(config.layers, adapter.num_layers)
    extractor = FeatureExtractor(adapter, layers)
    attrs: dict[str, Any] = {
        "model_id": config.model,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "adapter": type(adapter).__name__,
        "layers": layers,
        "num_layers": adapter.num_layers,
        "dtype": dtype,
        "device": device,
        "batch_size": config.batch_size,
        "max_new_tokens": max_new_tokens,
        "attn_implementation": getattr(model.config, "_attn_implementation", None) or config.attn_implementation,
        "generated": max_new_tokens > 0,
        "versions": json.dumps(versions()),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    return extractor, attrs


def log_rate(summary: ExtractSummary) -> None:
    log.info(
        "processed %d samples in %.1fs (%.2f samples/s); %d failed",
        summary.processed,
        summary.seconds,
        summary.samples_per_second,
        len(summary.failed),
    )
    if summary.stages.batches:
        log.info("%s", summary.stages.line())


def _extract_all(
    config: ExtractConfig,
    extractor: FeatureExtractor,
    todo: Sequence[Sample],
    store: RunStore,
    attrs: dict[str, Any],
    failures: FailureList,
    dtype: str,
    max_new_tokens: int,
    summary: ExtractSummary,
    desc: str,
) -> None:
    """The overlapped loop (halp.pipeline): input workers -> the model in this thread -> the in-order writer."""
    if not todo:
        return
    device = str(extractor.input_device())
    counter = TokenCounter(extractor.adapter, Path(config.images))
    batch_size = resolve_batch_size(config, extractor, todo, counter, max_new_tokens, device)
    attrs["batch_size"] = summary.batch_size = batch_size
    attrs["batch_size_auto"] = config.batch_size == "auto"
    workers = resolve_workers(config)
    processor_device = resolve_processor_device(config.processor_device, extractor, device)
    attrs["workers"] = workers
    attrs["processor_device"] = processor_device
    timing = summary.stages
    timing.workers, timing.processor_device = workers, processor_device
    # With the processor on the GPU the workers only decode; the feeder thread processes on the device.
    device_encoder = _device_encoder(extractor, processor_device) if processor_device != "cpu" else None
    spec = WorkerSpec(
        model=_model_ref(config.model),
        trust_remote_code=config.trust_remote_code,
        adapter_class=type(extractor.adapter),
        images_dir=Path(config.images),
        encode=device_encoder is None,
        init=config.worker_init,
    )
    pinned = device.startswith("cuda")

    def finish(prepared: Prepared) -> Prepared:
        if prepared.samples and prepared.inputs is None and device_encoder is not None:
            start = time.perf_counter()
            try:
                with _DEVICE_PROCESSOR_LOCK:
                    prepared.inputs = device_encoder.encode(prepared.images, [s.question for s in prepared.samples])
            finally:
                timing.add(processing=time.perf_counter() - start)
            prepared.images = None
        if prepared.inputs is not None:
            tokens, padding = padding_of(prepared.inputs)
            timing.add(tokens=tokens, padding_tokens=padding, batches=1)
            prepared.positions = extractor.locate(prepared.inputs)
            if pinned:
                prepared.inputs = pin(prepared.inputs)
        return prepared

    plan = plan_batches(todo, batch_size, counter)
    start = time.perf_counter()
    with (
        tqdm(total=len(todo), unit="sample", disable=not config.progress, desc=desc) as bar,
        InputPipeline(plan, spec, workers, finish, timing, encoder=extractor.adapter) as inputs,
        OrderedWriter(timing, background=workers > 0) as writer,
    ):
        try:
            for prepared in inputs:
                for failure in prepared.failures:
                    failures.record(*failure)
                bar.update(len(prepared.failures))
                if not prepared.samples:
                    continue
                model_start = time.perf_counter()
                batches_done = _extract_splitting_on_oom(
                    extractor,
                    prepared.samples,
                    _reloading_encoder(extractor, Path(config.images), failures),
                    max_new_tokens,
                    failures,
                    inputs=prepared.inputs,
                    positions=prepared.positions,
                )
                for samples_done, result in batches_done:
                    timing.add(model=time.perf_counter() - model_start)
                    writer.submit(
                        lambda s=samples_done, r=result: _commit_finite_rows(store, s, r, attrs, failures, dtype)
                    )
                    summary.processed += len(samples_done)
                    model_start = time.perf_counter()
                bar.update(len(prepared.samples))
        finally:
            timing.wall += time.perf_counter() - start
    log.info(
        "batch size %d%s, %d input worker(s), processor on %s, attention %s",
        batch_size,
        " (auto)" if config.batch_size == "auto" else "",
        workers,
        processor_device,
        attrs.get("attn_implementation"),
    )


#: The processor on the GPU runs in the feeder thread only; the lock keeps the OOM path's re-encoding apart.
_DEVICE_PROCESSOR_LOCK = threading.Lock()


def resolve_workers(config: ExtractConfig) -> int:
    return default_workers() if config.workers is None else config.workers


def _device_encoder(extractor: FeatureExtractor, device: str) -> Any:
    """An adapter whose processor returns its image tensors on `device` (transformers' torchvision backend)."""
    processor = copy.deepcopy(extractor.adapter.processor)
    processor.image_processor.device = torch.device(device)
    return type(extractor.adapter)(extractor.adapter.model, processor)


def resolve_processor_device(choice: str, extractor: FeatureExtractor, device: str) -> str:
    """cpu, or the model's CUDA device where transformers' torchvision image-processor backend can run there."""
    from transformers.image_processing_backends import TorchvisionBackend

    image_processor = getattr(extractor.adapter.processor, "image_processor", None)
    capable = isinstance(image_processor, TorchvisionBackend)
    on_gpu = device.startswith("cuda")
    if choice == "cpu" or (choice == "auto" and not (capable and on_gpu)):
        return "cpu"
    if not on_gpu:
        raise ExtractOptionError(f"--processor-device cuda needs the model on a CUDA device; it is on {device}")
    if not capable:
        raise ExtractOptionError(
            f"--processor-device cuda: this checkpoint's image processor ({type(image_processor).__name__}) is not "
            "a torchvision backend, which is what runs on a GPU; use --processor-device cpu"
        )
    return device


def resolve_batch_size(
    config: ExtractConfig,
    extractor: FeatureExtractor,
    todo: Sequence[Sample],
    counter: TokenCounter,
    max_new_tokens: int,
    device: str,
) -> int:
    """config.batch_size, or for "auto" the largest batch of the longest rows that runs without out-of-memory."""
    if config.batch_size != "auto":
        return int(config.batch_size)
    if not device.startswith("cuda"):
        log.info("--batch-size auto on %s: no device memory to fit, using %d", device, AUTO_BATCH_CPU)
        return AUTO_BATCH_CPU
    counts = counter(todo)
    longest = [todo[i] for i in sorted(range(len(todo)), key=lambda i: -counts[i])[:AUTO_BATCH_START]]

    def try_batch(rows: list[Sample]) -> None:
        ready, images, _ = load_rows(rows, Path(config.images))
        if ready:
            extractor.run(extractor.adapter.encode(images, [s.question for s in ready]), max_new_tokens)

    size = find_batch_size(longest, try_batch, _out_of_memory_errors(), on_out_of_memory=_free_device_cache)
    log.info("--batch-size auto: %d (the %d longest rows fit on %s)", size, size, device)
    return size


def _free_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reloading_encoder(
    extractor: FeatureExtractor, images_dir: Path, failures: FailureList
) -> Callable[[list[Sample]], tuple[list[Sample], dict[str, Any] | None]]:
    """Encodes part of a batch again (after an out-of-memory split): images reloaded, processed in this thread."""

    def encode(samples: list[Sample]) -> tuple[list[Sample], dict[str, Any] | None]:
        ready, images, failed = load_rows(samples, images_dir)
        for failure in failed:
            failures.record(*failure)
        if not ready:
            return [], None
        return ready, extractor.adapter.encode(images, [s.question for s in ready])

    return encode


def batches_by_size(images: Sequence[Image.Image], batch_size: int) -> list[list[int]]:
    """Indices of `images` in batches of similar size: dynamic-resolution models give big images more tokens,
    so such batches pad less. Features do not depend on batch composition (batch invariance)."""
    by_size = sorted(range(len(images)), key=lambda i: images[i].width * images[i].height)
    return [by_size[start : start + batch_size] for start in range(0, len(by_size), batch_size)]


def load_batch(
    batch: Sequence[Sample], images_dir: Path, failures: FailureList
) -> tuple[list[Sample], list[Image.Image]]:
    """The rows of `batch` that have a question and a readable image, with their images; others are recorded."""
    ready, images = [], []
    for sample in batch:
        if not sample.question.strip():
            failures.record(sample, "input", "EmptyQuestion", "the question is empty")
            continue
        try:
            images.append(load_image(images_dir, sample.image_id))
            ready.append(sample)
        except ImageError as err:
            failures.record(sample, "image", type(err).__name__, str(err))
    return ready, images


def extract_loaded(
    ready: Sequence[Sample],
    images: Sequence[Image.Image],
    extractor: FeatureExtractor,
    max_new_tokens: int,
    store: RunStore,
    attrs: dict[str, Any],
    failures: FailureList,
    dtype: str,
) -> int:
    """Extract loaded rows (splitting on out-of-memory) and commit the finite ones. Returns rows extracted."""
    processed = 0
    if ready:
        by_id = {sample.question_id: image for sample, image in zip(ready, images, strict=True)}

        def encode(samples: list[Sample]) -> tuple[list[Sample], dict[str, Any]]:
            images_of = [by_id[s.question_id] for s in samples]
            return samples, extractor.adapter.encode(images_of, [s.question for s in samples])

        for samples_done, result in _extract_splitting_on_oom(extractor, list(ready), encode, max_new_tokens, failures):
            _commit_finite_rows(store, samples_done, result, attrs, failures, dtype)
            processed += len(samples_done)
    return processed


def extract_batch(
    batch: Sequence[Sample],
    images_dir: Path,
    extractor: FeatureExtractor,
    max_new_tokens: int,
    store: RunStore,
    attrs: dict[str, Any],
    failures: FailureList,
    dtype: str,
) -> int:
    """Extract one batch and commit its good rows to `store`; bad rows go to `failures`. Returns rows extracted."""
    ready, images = load_batch(batch, images_dir, failures)
    return extract_loaded(ready, images, extractor, max_new_tokens, store, attrs, failures, dtype)


def _run_shard(
    config: ExtractConfig, shard: Shard, samples: list[Sample], device: str, dtype: str, max_new_tokens: int
) -> ExtractSummary:
    """Extract this shard's rows into RUN_DIR/shards/<i>-of-<k>/; the last shard to finish assembles features.h5."""
    store = RunStore.for_shard(config.out, shard.name)
    store.lock()  # one writer per shard directory, for the life of this process
    try:
        with store.sync():  # the run lock, briefly: identity, clean-up and the committed rows form one view
            store.open(run_identity(config, dtype, max_new_tokens, num_shards=shard.count))
            store.remove_stale_temporaries()
            store.remove_assembled_parts()
            done = store.committed_ids()
            store.clear_done()  # until this pass ends, the run cannot be assembled
        handler = attach_log(store.writer_dir)
        try:
            return _shard_pass(config, shard, store, samples, done, device, dtype, max_new_tokens)
        finally:
            logging.getLogger("halp").removeHandler(handler)
            handler.close()
    finally:
        store.unlock()


def _shard_pass(
    config: ExtractConfig,
    shard: Shard,
    store: RunStore,
    samples: list[Sample],
    done: set[str],
    device: str,
    dtype: str,
    max_new_tokens: int,
) -> ExtractSummary:
    mine = shard.select(samples)
    todo = [sample for _, sample in mine if sample.question_id not in done]
    summary = ExtractSummary(store.root, len(mine), len(mine) - len(todo), 0, shard=shard)
    log.info(
        "shard %s: %d of %d samples, %d already committed", shard.name, len(mine), len(samples), summary.already_done
    )
    failures = FailureLog(store.writer_dir / ERRORS_FILE, summary)
    if todo:
        warm_up(resolve_workers(config))
        extractor, attrs = prepare_extractor(config, device, dtype, max_new_tokens)
        attrs["num_shards"] = shard.count
        start = time.perf_counter()
        _extract_all(
            config, extractor, todo, store, attrs, failures, dtype, max_new_tokens, summary, f"extract {shard.name}"
        )
        summary.seconds = time.perf_counter() - start
        log_rate(summary)
    store.write_done(
        {
            "shard": shard.name,
            "table_rows": len(samples),
            "table_sha256": table_digest([sample.question_id for sample in samples]),
            "positions": [position for position, _ in mine],
            "question_ids": [sample.question_id for _, sample in mine],
            "failed": summary.failed,
            "processed": summary.processed,
            "ended": datetime.now(timezone.utc).isoformat(),
        }
    )
    with store.sync():
        assembly = store.assemble_shards(shard.count)
    summary.pending_shards = assembly.missing
    summary.assembled = assembly.finished
    summary.run_failed = len(assembly.failed)
    summary.finished = assembly.finished and not assembly.failed
    if assembly.assembled:
        log.info("shard %s was the last: assembled %d rows into features.h5", shard.name, assembly.num_samples)
    elif assembly.missing:
        log.info("shard %s done; waiting for %s", shard.name, ", ".join(assembly.missing))
    return summary


class FailureList:
    """Failed rows are recorded, never committed; a rerun retries them."""

    def __init__(self) -> None:
        self.failed: list[dict[str, str]] = []
        self._lock = threading.Lock()  # the model's thread and the writer's both record

    def record(self, sample: Sample, stage: str, error: str, message: str) -> None:
        entry = {"question_id": sample.question_id, "stage": stage, "error": error, "message": message}
        with self._lock:
            self.failed.append(entry)
            self._written(entry)
        log.warning("%s failed at %s: %s: %s", sample.question_id, stage, error, message)

    def _written(self, entry: dict[str, str]) -> None:
        """Where else an entry goes (nowhere here)."""


class FailureLog(FailureList):
    """Failed rows go to errors.jsonl (this attempt's failures) and the summary."""

    def __init__(self, path: Path, summary: ExtractSummary) -> None:
        super().__init__()
        self.failed = summary.failed
        self.path = path
        self.summary = summary
        path.write_text("")  # a rerun retries every uncommitted row, so only this attempt's failures matter

    def _written(self, entry: dict[str, str]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,)


def _extract_splitting_on_oom(
    extractor: FeatureExtractor,
    samples: list[Sample],
    encode: Callable[[list[Sample]], tuple[list[Sample], dict[str, Any] | None]],
    max_new_tokens: int,
    failures: FailureList,
    inputs: dict[str, Any] | None = None,
    positions: Any = None,
) -> Iterator[tuple[list[Sample], BatchResult]]:
    """Extract a batch (its processor inputs given, or made by `encode`); on out-of-memory, free the cache and
    retry the halves, encoded again; a lone sample that fails is recorded."""
    try:
        if inputs is None:
            samples, inputs = encode(samples)
            positions = None
            if inputs is None:
                return
        result = extractor.run(inputs, max_new_tokens, positions)
    except _out_of_memory_errors() as err:
        del inputs
        _free_device_cache()
        if len(samples) == 1:
            failures.record(samples[0], "extract", "OutOfMemoryError", f"does not fit even alone: {err}")
            return
        half = len(samples) // 2
        log.warning("out of memory with %d samples; retrying as %d + %d", len(samples), half, len(samples) - half)
        yield from _extract_splitting_on_oom(extractor, samples[:half], encode, max_new_tokens, failures)
        yield from _extract_splitting_on_oom(extractor, samples[half:], encode, max_new_tokens, failures)
        return
    yield samples, result


def _commit_finite_rows(
    store: RunStore,
    samples: list[Sample],
    result: BatchResult,
    attrs: dict[str, Any],
    failures: FailureList,
    dtype: str,
) -> None:
    """Commit rows whose every feature is finite; flag the others (float16 overflow, typically)."""
    finite = np.ones(len(samples), dtype=bool)
    for values in result.features.values():
        finite &= np.isfinite(values).all(axis=1)
    for index in np.flatnonzero(~finite):
        bad = [name for name, values in result.features.items() if not np.isfinite(values[index]).all()]
        advice = " Use --dtype bfloat16 or float32." if dtype == "float16" else " Check the model and input."
        failures.record(
            samples[index],
            "features",
            "NonFiniteFeatures",
            f"inf/nan in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} (dtype {dtype}).{advice}",
        )
    keep = np.flatnonzero(finite)
    if len(keep):
        kept = [samples[i] for i in keep]
        features = {name: values[keep] for name, values in result.features.items()}
        store.commit(rows_for(kept, [result.answers[i] for i in keep], features), attrs)


def _dim(store: RunStore, name: str) -> int:
    import h5py

    for path in [*store.all_part_paths(), store.features_path]:
        if path.exists():
            with h5py.File(path, "r") as handle:
                if name in handle:
                    return int(handle[name].shape[1])
    return 0
