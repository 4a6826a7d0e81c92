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
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from halp.capture import BatchResult, FeatureExtractor, parse_layers
from halp.compact import RowDigests
from halp.data import ImageSource, Sample, TableRows, as_image_source, input_table
from halp.errors import ParameterError, ShardError
from halp.loading import (
    check_attn_implementation,
    check_model_source,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from halp.models import adapter_for
from halp.pipeline import (
    AUTO_BATCH_CPU,
    AUTO_BATCH_START,
    BUCKET_BATCHES,
    ROW_TIMEOUT,
    InputPipeline,
    OrderedWriter,
    Prepared,
    RowRules,
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
from halp.store import ERRORS_FILE, RunStore, row_digest, rows_for, table_text_digest

log = logging.getLogger(__name__)

#: --processor-device choices.
PROCESSOR_DEVICES = ("auto", "cpu", "cuda")
#: Rows whose images are hashed at a time when planning a resume (their bytes are read, hashed and dropped).
DIGEST_WINDOW = 1024
#: Re-exported: bench_extract.py and older callers import it from here.
__all__ = ["BUCKET_BATCHES"]


@dataclass
class ExtractConfig:
    model: str
    #: A table file or directory (see halp.data), or an hf://... Parquet file; None with hf_dataset.
    data: Path | str | None
    #: Directory of the table's image files; None when the table embeds its images.
    images: Path | None
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
    #: Apply the EXIF Orientation tag (the default) or feed the stored pixels; part of the run identity.
    exif_orientation: bool = True
    overwrite: bool = False
    progress: bool = True
    #: Both None: one shard, or the shard a torch launcher (torchrun, accelerate launch) assigns.
    num_shards: int | None = None
    shard_index: int | None = None
    #: A hub dataset (datasets.load_dataset) instead of --data, with its config and split.
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str | None = None
    #: Input worker processes (decode + processor); None: as many as help on the device (pipeline.default_workers).
    workers: int | None = None
    #: Where the image processor runs: auto (the GPU when the model is on one and the processor can), cpu, cuda.
    processor_device: str = "auto"
    #: Attention kernel: sdpa, flash_attention_2 or eager.
    attn_implementation: str = "sdpa"
    #: Seconds an input worker may spend reading one row's image (and, per row, processing a batch) before the
    #: worker is ended and the row recorded as failed (halp.pipeline.ROW_TIMEOUT); not with workers=0.
    row_timeout: float = ROW_TIMEOUT
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
    #: Committed rows whose content (question, image bytes, ...) changed since: extracted again.
    changed: list[str] = field(default_factory=list)
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


@dataclass(frozen=True)
class ExtractPass:
    """One extraction pass's settings: the user's config and where and how the model runs (device, dtype, answer
    length), resolved once in run_extraction and handed down whole."""

    config: ExtractConfig
    device: str
    dtype: str
    max_new_tokens: int

    @classmethod
    def resolve(cls, config: ExtractConfig, shard: Shard) -> ExtractPass:
        device = device_for(resolve_device(config.device), shard)
        dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
        return cls(config, device, dtype, config.max_new_tokens if config.generate else 0)

    def identity(self, num_shards: int) -> dict[str, Any]:
        return run_identity(self.config, self.dtype, self.max_new_tokens, num_shards=num_shards)


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
        raise ParameterError(
            "overwrite",
            "cannot be combined with several shards: one shard would delete what another has just "
            f"committed. Delete {config.out} first (or run once with overwrite=True and one shard), then start the "
            "shards.",
        )
    samples = read_table(config)  # table problems surface before the model loads
    image_source(config)  # as do missing images: no --images for a table without embedded images
    check_model_source(config.model, config.trust_remote_code)  # a missing or refused model touches no run dir

    run = ExtractPass.resolve(config, shard)
    if shard.is_sharded:
        return _run_shard(run, shard, samples)

    store = RunStore(config.out)
    store.lock()
    try:
        return _locked_run(run, store, samples)
    finally:
        store.unlock()


def validate_options(config: ExtractConfig) -> None:
    """Option errors surface before the table is read or a model loads."""
    if config.batch_size != "auto" and (not isinstance(config.batch_size, int) or config.batch_size < 1):
        raise ParameterError("batch_size", "must be at least 1, or auto")
    if config.workers is not None and config.workers < 0:
        raise ParameterError("workers", "must be 0 (all stages in series) or more")
    if not config.row_timeout > 0:
        raise ParameterError("row_timeout", f"must be a positive number of seconds, not {config.row_timeout}")
    if config.processor_device not in PROCESSOR_DEVICES:
        raise ParameterError("processor_device", f"{config.processor_device!r}: choose {', '.join(PROCESSOR_DEVICES)}")
    check_attn_implementation(config.attn_implementation, resolve_device(config.device))


def read_table(config: ExtractConfig) -> list[Sample]:
    samples = input_table(config.data, config.hf_dataset, config.hf_config, config.split).samples
    return samples[: config.limit] if config.limit is not None else samples


def image_source(config: ExtractConfig) -> ImageSource:
    """The images of the run's table: embedded in it, or files under config.images."""
    return input_table(config.data, config.hf_dataset, config.hf_config, config.split).image_source(config.images)


def data_identity(config: ExtractConfig) -> dict[str, str] | None:
    """What the run identity records of an input that --images does not name: the hub dataset (id, config,
    split), a remote table's URL, the image column (halp.data.Table.content_identity). None for a table of image
    files (identity as before). The rows' content is covered row by row (row_digest)."""
    table = input_table(config.data, config.hf_dataset, config.hf_config, config.split)
    return table.content_identity() if table.images is not None else None


def device_for(device: str, shard: Shard) -> str:
    """A process started by a torch launcher uses the GPU of its LOCAL_RANK; otherwise `device` as resolved."""
    if shard.local_rank is None or device != "cuda":
        return device
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise ShardError(
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
        "exif_orientation": config.exif_orientation,
        "num_shards": num_shards,
        "data": data_identity(config),
    }


def with_model_fingerprint(identity: dict[str, Any], store: RunStore, model: str) -> dict[str, Any]:
    """The identity plus the checkpoint's content fingerprint (cheap on reruns: the run's file record is reused)."""
    existing = store.read_identity() if store.run_path.exists() else None
    fingerprint, files = model_fingerprint(model, (existing or {}).get("model_files"))
    return {**identity, "model_sha256": fingerprint, "model_files": files}


def recheck_model_after_loading(identity: dict[str, Any], store: RunStore, model: str) -> None:
    """A hub model not cached before loading has a fingerprint (its snapshot commit) only now."""
    if identity.get("model_sha256") is None:
        fingerprint, files = model_fingerprint(model)
        with store.sync():
            store.check_model(fingerprint, files)


@dataclass
class ResumePlan:
    """What a rerun must do: the table's content digests, and the rows to extract (new, failed or changed)."""

    digests: RowDigests
    todo: Sequence[Sample]  # a view of the table's rows (halp.data.TableRows) or a list
    changed: list[str]


def content_digests(samples: Sequence[Sample], images: ImageSource | Path) -> RowDigests:
    """question_id -> the row's content digest (its text and its image's bytes: a file under --images, or the bytes
    the table embeds), read now, a window of rows at a time; kept compact (halp.compact.RowDigests)."""
    source = as_image_source(images)

    def pairs() -> Iterator[tuple[str, str]]:
        for start in range(0, len(samples), DIGEST_WINDOW):
            window = samples[start : start + DIGEST_WINDOW]
            for sample, digest in zip(window, source.digests(window), strict=True):
                yield sample.question_id, row_digest(sample, digest)

    return RowDigests(pairs())


def plan_resume(
    store: RunStore, samples: Sequence[Sample], images: ImageSource | Path, digests: RowDigests | None = None
) -> ResumePlan:
    """Compare the table's rows (text and image bytes) with what is committed: a row is done only if committed with
    the same content digest. Changed rows are extracted again; their old copies leave at assembly."""
    if digests is None:
        digests = content_digests(samples, images)
    committed = store.committed_digests()
    keep = [
        index
        for index, (question_id, digest) in enumerate(digests.items_in_order())
        if not committed.holds(question_id, digest)
    ]
    todo: Sequence[Sample] = samples.take(keep) if isinstance(samples, TableRows) else [samples[i] for i in keep]
    changed = [sample.question_id for sample in todo if sample.question_id in committed] if len(committed) else []
    if changed:
        log.warning(
            "%d committed row(s) changed in the table or image since they were extracted; extracting them again: %s",
            len(changed), ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
        )
    return ResumePlan(digests, todo, changed)


def _locked_run(run: ExtractPass, store: RunStore, samples: list[Sample]) -> ExtractSummary:
    identity = with_model_fingerprint(run.identity(num_shards=1), store, run.config.model)
    store.open(identity, overwrite=run.config.overwrite)
    handler = attach_log(store.root)
    try:
        return _run(run, store, samples)
    finally:
        logging.getLogger("halp").removeHandler(handler)
        handler.close()


def _run(run: ExtractPass, store: RunStore, samples: list[Sample]) -> ExtractSummary:
    config = run.config
    store.remove_stale_temporaries()
    store.remove_assembled_parts()
    order = [sample.question_id for sample in samples]
    plan = plan_resume(store, samples, image_source(config))
    todo = plan.todo
    summary = ExtractSummary(store.root, len(samples), len(samples) - len(todo), 0, changed=plan.changed)
    log.info("%d samples, %d already committed, %d to do", len(samples), summary.already_done, len(todo))

    if not todo and store.assembled_as(order, plan.digests) and not store.all_part_paths():
        summary.finished = True  # nothing is missing: the assembled file stands, no model needed
        return summary
    if not todo:
        # Every row is committed, but features.h5 must follow the table now (rows removed or reordered, parts
        # not yet assembled): assemble again, no model needed.
        FailureLog(store.root / ERRORS_FILE, summary)
        attrs = store.recorded_attrs(store.all_part_paths())
        attrs.update(complete=True, num_failed=0)
        store.assemble(order, attrs, plan.digests)
        summary.finished = True
        return summary

    warm_up(resolve_workers(config, run.device))
    extractor, attrs = prepare_extractor(run)
    recheck_model_after_loading(store.read_identity() or {}, store, config.model)
    if store.features_path.exists():
        store.reopen_finished()
    failures = FailureLog(store.root / ERRORS_FILE, summary)
    start = time.perf_counter()
    _extract_all(run, extractor, todo, store, attrs, failures, summary, "extract")
    summary.seconds = time.perf_counter() - start
    attrs["stage_seconds"] = json.dumps(summary.stages.as_dict())

    attrs["hidden_size"] = _dim(store, "vision_projected")
    attrs["vision_hidden_size"] = _dim(store, "vision_only")
    attrs["complete"] = not summary.failed
    attrs["num_failed"] = len(summary.failed)
    store.assemble(order, attrs, plan.digests)
    summary.finished = not summary.failed and _assembled_count(store) == len(order)
    if not summary.failed and not summary.finished:
        # A row whose image changed between the start of the run and its loading was committed with the new
        # content's digest and left out of features.h5; the next rerun extracts it.
        log.warning("some rows changed while the run was in progress; rerun the same command to extract them")
    log_rate(summary)
    return summary


def prepare_extractor(run: ExtractPass) -> tuple[FeatureExtractor, dict[str, Any]]:
    """Load the model, pick its adapter and layers; the attributes every committed part records."""
    config, device, dtype, max_new_tokens = run.config, run.device, run.dtype, run.max_new_tokens
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
        "exif_orientation": config.exif_orientation,
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
    run: ExtractPass,
    extractor: FeatureExtractor,
    todo: Sequence[Sample],
    store: RunStore,
    attrs: dict[str, Any],
    failures: FailureList,
    summary: ExtractSummary,
    desc: str,
) -> None:
    """The overlapped loop (halp.pipeline): input workers -> the model in this thread -> the in-order writer."""
    if not todo:
        return
    config, dtype, max_new_tokens = run.config, run.dtype, run.max_new_tokens
    device = str(extractor.input_device())
    source = image_source(config)
    rules = RowRules(source, config.exif_orientation, frozenset(special_tokens_of(extractor)))
    counter = TokenCounter(extractor.adapter, source)
    batch_size = resolve_batch_size(config, extractor, todo, counter, rules, max_new_tokens, device)
    attrs["batch_size"] = summary.batch_size = batch_size
    attrs["batch_size_auto"] = config.batch_size == "auto"
    workers = resolve_workers(config, run.device)
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
        rules=rules,
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
        InputPipeline(
            plan, spec, workers, finish, timing, encoder=extractor.adapter, row_timeout=config.row_timeout
        ) as inputs,
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
                batches_done = _extract_isolating_failures(
                    extractor,
                    prepared.samples,
                    _reloading_encoder(extractor, rules, failures),
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


def resolve_workers(config: ExtractConfig, device: str) -> int:
    """--workers, or by default as many input workers as can help on `device` (halp.pipeline.default_workers)."""
    return default_workers(device) if config.workers is None else config.workers


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
        raise ParameterError("processor_device", f"cuda needs the model on a CUDA device; it is on {device}")
    if not capable:
        raise ParameterError(
            "processor_device",
            f"cuda: this checkpoint's image processor ({type(image_processor).__name__}) is not a torchvision "
            "backend, which is what runs on a GPU; use cpu",
        )
    return device


def resolve_batch_size(
    config: ExtractConfig,
    extractor: FeatureExtractor,
    todo: Sequence[Sample],
    counter: TokenCounter,
    rules: RowRules,
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
        ready, images, _ = load_rows(rows, rules)
        if ready:
            extractor.run(extractor.adapter.encode(images, [s.question for s in ready]), max_new_tokens)

    size = find_batch_size(longest, try_batch, _out_of_memory_errors(), on_out_of_memory=_free_device_cache)
    log.info("--batch-size auto: %d (the %d longest rows fit on %s)", size, size, device)
    return size


def _free_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reloading_encoder(
    extractor: FeatureExtractor, rules: RowRules, failures: FailureList
) -> Callable[[list[Sample]], tuple[list[Sample], dict[str, Any] | None]]:
    """Encodes part of a batch again (after an out-of-memory split): images reloaded, processed in this thread."""

    def encode(samples: list[Sample]) -> tuple[list[Sample], dict[str, Any] | None]:
        ready, images, failed = load_rows(samples, rules)
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
    batch: Sequence[Sample], images: ImageSource | Path, failures: FailureList, exif_orientation: bool = True
) -> tuple[list[Sample], list[Image.Image]]:
    """The rows of `batch` that have a question and a readable image, with their images; others are recorded.
    `images` is an image directory or the table's embedded images (halp.data.ImageSource)."""
    asked = []
    for sample in batch:
        if not sample.question.strip():
            failures.record(sample, "input", "EmptyQuestion", "the question is empty")
            continue
        unstorable = unstorable_text(sample)
        if unstorable:
            failures.record(sample, "input", "UnstorableText", unstorable)
            continue
        asked.append(sample)
    ready, loaded = [], []
    for sample, item in zip(asked, as_image_source(images).read(asked, exif_orientation), strict=True):
        if isinstance(item, Exception):
            failures.record(sample, "image", type(item).__name__, str(item))
            continue
        image, image_sha256 = item
        loaded.append(image)
        # The digest of the bytes decoded here is what the committed row records.
        ready.append(replace(sample, row_sha256=row_digest(sample, image_sha256)))
    return ready, loaded


def unstorable_text(sample: Sample) -> str:
    """Why one of the row's strings cannot be stored in features.h5 (HDF5 strings are NUL-free UTF-8), or ""."""
    fields = {
        "question_id": sample.question_id,
        "image_id": sample.image_id,
        "question": sample.question,
        "ground_truth": sample.ground_truth,
        **{f"meta/{column}": value for column, value in sample.meta.items()},
    }
    for name, value in fields.items():
        if "\x00" in value:
            return f"{name} contains a NUL byte, which HDF5 strings cannot hold"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"{name} is not valid Unicode text ({err.reason} at position {err.start})"
    return ""


def special_tokens_of(extractor: FeatureExtractor) -> set[str]:
    """The model's special tokens (image placeholder, chat markers, ...), which a question must not contain."""
    tokenizer = extractor.adapter.tokenizer()
    found = {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {str(token.content) for token in decoder.values() if getattr(token, "special", False)}
    for holder in (extractor.adapter.processor, tokenizer):
        for name in ("image_token", "video_token", "boi_token", "eoi_token", "audio_token"):
            value = getattr(holder, name, None)
            if isinstance(value, str):
                found.add(value)
    image_token = tokenizer.convert_ids_to_tokens(extractor.adapter.image_token_id)
    if isinstance(image_token, str):
        found.add(image_token)
    return {token for token in found if token.strip()}


def reject_special_tokens(
    samples: Sequence[Sample], images: Sequence[Image.Image], extractor: FeatureExtractor, failures: FailureList
) -> tuple[list[Sample], list[Image.Image]]:
    """Rows whose question contains one of the model's special tokens fail: the prompt would change shape (an
    image placeholder in the text gives the row a second image slot, a chat marker ends the user turn)."""
    specials = special_tokens_of(extractor)
    kept, kept_images = [], []
    for sample, image in zip(samples, images, strict=True):
        message = special_token_message(sample.question, specials)
        if message:
            failures.record(sample, "input", "SpecialTokenInQuestion", message)
            continue
        kept.append(sample)
        kept_images.append(image)
    return kept, kept_images


def special_token_message(question: str, specials: Collection[str]) -> str:
    """Why the question cannot be used (it holds special tokens), or ""."""
    present = sorted(token for token in specials if token in question)
    if not present:
        return ""
    return (
        f"the question contains the model's special token(s) {', '.join(map(repr, present[:3]))}; "
        "remove them from the question"
    )


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
    ready, images = reject_special_tokens(ready, images, extractor, failures)
    if ready:
        by_id = {sample.question_id: image for sample, image in zip(ready, images, strict=True)}

        def encode(samples: list[Sample]) -> tuple[list[Sample], dict[str, Any]]:
            images_of = [by_id[s.question_id] for s in samples]
            return samples, extractor.adapter.encode(images_of, [s.question for s in samples])

        isolated = _extract_isolating_failures(extractor, list(ready), encode, max_new_tokens, failures)
        for samples_done, result in isolated:
            _commit_finite_rows(store, samples_done, result, attrs, failures, dtype)
            processed += len(samples_done)
    return processed


def extract_batch(
    batch: Sequence[Sample],
    images_dir: ImageSource | Path,
    extractor: FeatureExtractor,
    max_new_tokens: int,
    store: RunStore,
    attrs: dict[str, Any],
    failures: FailureList,
    dtype: str,
    exif_orientation: bool = True,
) -> int:
    """Extract one batch and commit its good rows to `store`; bad rows go to `failures`. Returns rows extracted."""
    ready, images = load_batch(batch, images_dir, failures, exif_orientation)
    return extract_loaded(ready, images, extractor, max_new_tokens, store, attrs, failures, dtype)


def _run_shard(run: ExtractPass, shard: Shard, samples: list[Sample]) -> ExtractSummary:
    """Extract this shard's rows into RUN_DIR/shards/<i>-of-<k>/; the last shard to finish assembles features.h5."""
    config = run.config
    store = RunStore.for_shard(config.out, shard.name)
    store.lock()  # one writer per shard directory, for the life of this process
    try:
        mine = shard.share(samples)
        digests = content_digests(mine, image_source(config))  # the images are read outside the run lock
        with store.sync():  # the run lock, briefly: identity, clean-up and the committed rows form one view
            identity = with_model_fingerprint(run.identity(num_shards=shard.count), RunStore(config.out), config.model)
            store.open(identity)
            store.remove_stale_temporaries()
            store.remove_assembled_parts()
            plan = plan_resume(store, mine, image_source(config), digests)
            store.clear_done()  # until this pass ends, the run cannot be assembled
        handler = attach_log(store.writer_dir)
        try:
            return _shard_pass(run, shard, store, samples, plan)
        finally:
            logging.getLogger("halp").removeHandler(handler)
            handler.close()
    finally:
        store.unlock()


def _shard_pass(
    run: ExtractPass, shard: Shard, store: RunStore, samples: list[Sample], plan: ResumePlan
) -> ExtractSummary:
    config = run.config
    mine = shard.select(samples)
    todo = plan.todo
    summary = ExtractSummary(store.root, len(mine), len(mine) - len(todo), 0, shard=shard, changed=plan.changed)
    log.info(
        "shard %s: %d of %d samples, %d already committed", shard.name, len(mine), len(samples), summary.already_done
    )
    failures = FailureLog(store.writer_dir / ERRORS_FILE, summary)
    if todo:
        warm_up(resolve_workers(config, run.device))
        extractor, attrs = prepare_extractor(run)
        recheck_model_after_loading(store.read_identity() or {}, store, config.model)
        attrs["num_shards"] = shard.count
        start = time.perf_counter()
        _extract_all(run, extractor, todo, store, attrs, failures, summary, f"extract {shard.name}")
        summary.seconds = time.perf_counter() - start
        log_rate(summary)
    store.write_done(
        {
            "shard": shard.name,
            "table_rows": len(samples),
            "table_sha256": table_text_digest(samples),
            "positions": [position for position, _ in mine],
            "question_ids": [sample.question_id for _, sample in mine],
            "row_sha256": [plan.digests[sample.question_id] for _, sample in mine],
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


def _extract_isolating_failures(
    extractor: FeatureExtractor,
    samples: list[Sample],
    encode: Callable[[list[Sample]], tuple[list[Sample], dict[str, Any] | None]],
    max_new_tokens: int,
    failures: FailureList,
    inputs: dict[str, Any] | None = None,
    positions: Any = None,
) -> Iterator[tuple[list[Sample], BatchResult]]:
    """Extract a batch (its processor inputs given, or made by `encode`). On out-of-memory, free the cache and
    retry the halves, encoded again. On any other error (the processor refusing an image, a prompt the model
    rejects), retry the rows one by one, so only the guilty row is recorded and the others are extracted. A lone
    row that fails is recorded with its error."""
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
        yield from _extract_isolating_failures(extractor, samples[:half], encode, max_new_tokens, failures)
        yield from _extract_isolating_failures(extractor, samples[half:], encode, max_new_tokens, failures)
        return
    except Exception as err:
        if len(samples) == 1:
            failures.record(samples[0], "extract", type(err).__name__, _one_line(err))
            return
        log.warning("batch of %d failed (%s: %s); retrying its rows one by one", len(samples), type(err).__name__,
                    _one_line(err))
        for index in range(len(samples)):
            yield from _extract_isolating_failures(
                extractor, samples[index : index + 1], encode, max_new_tokens, failures
            )
        return
    yield samples, result


def _one_line(err: BaseException, width: int = 500) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= width else text[: width - 1] + "…"


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
        advice = " Use dtype=bfloat16 or float32." if dtype == "float16" else " Check the model and input."
        failures.record(
            samples[index],
            "features",
            "NonFiniteFeatures",
            f"inf/nan in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} (dtype {dtype}).{advice}",
        )
    for index in np.flatnonzero(finite):
        if "\x00" in result.answers[index]:
            # HDF5 strings cannot hold NUL; storing a cut answer would be a silent change.
            failures.record(samples[index], "answer", "UnstorableAnswer", "the decoded answer contains a NUL byte")
            finite[index] = False
    keep = np.flatnonzero(finite)
    if len(keep):
        kept = [samples[i] for i in keep]
        features = {name: values[keep] for name, values in result.features.items()}
        store.commit(rows_for(kept, [result.answers[i] for i in keep], features), attrs)


def _assembled_count(store: RunStore) -> int:
    with store.reading(store.features_path) as handle:
        return int(handle["question_id"].shape[0])


def _dim(store: RunStore, name: str) -> int:
    import h5py

    for path in [*store.all_part_paths(), store.features_path]:
        if path.exists():
            with h5py.File(path, "r") as handle:
                if name in handle:
                    return int(handle[name].shape[1])
    return 0
