"""The local engine: the model in this process, fed by the input pipeline, committing to this writer's parts.

`LocalEngine.execute` runs one extraction's rows (a whole run, or one shard of it): the input workers start first
and load the checkpoint's processor while the model loads here; the rows are batched by token count; each batch
runs one prefill inside `generate` with the hooks armed (halp.capture), its answer decoded from the same cache;
the in-order writer commits each batch as an HDF5 part. A batch that fails is retried in halves (out of memory) or
row by row (any other error), so only the guilty rows are recorded. `extract_batch` is the same per-batch core
without the pipeline, for the Ray engine's actors.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from halp.capture import BatchResult, FeatureExtractor, parse_layers
from halp.data import ImageSource, Sample
from halp.errors import ParameterError
from halp.inputs import (
    FailureList,
    Prepared,
    RowRules,
    load_batch,
    load_rows,
    one_line,
    reject_special_tokens,
    special_tokens_of,
)
from halp.loading import load_model
from halp.models import adapter_for
from halp.pipeline import (
    AUTO_BATCH_CPU,
    AUTO_BATCH_START,
    InputPipeline,
    OrderedWriter,
    TokenCounter,
    WorkerSetup,
    WorkerSpec,
    default_workers,
    find_batch_size,
    padding_of,
    pin,
    plan_batches,
)
from halp.rows import rows_for
from halp.run_records import ExtractConfig, ExtractPass, Job, RunAttributes, image_source, model_ref
from halp.shard import Shard
from halp.store import RunStore
from halp.version import __version__

log = logging.getLogger(__name__)


class LocalEngine:
    """The rows run in this process (one GPU, or the CPU); `--workers` input processes prepare their batches."""

    name = "local"

    def check(self, config: ExtractConfig, shard: Shard) -> None:
        """Nothing beyond the options every engine checks (halp.run_records.validate_options)."""

    def resolve(self, config: ExtractConfig, shard: Shard) -> ExtractPass:
        return ExtractPass.resolve(config, shard)

    def opened(self, store: RunStore) -> None:
        """Nothing to wait for: this process is the run's one writer of its directory."""

    def execute(self, job: Job) -> RunAttributes:
        """Load the model (input workers start first, in parallel), extract `job.todo`, commit each batch; the
        attributes every committed part recorded, with this pass's stage times."""
        config, device = job.run.config, job.run.device
        workers = resolve_workers(config, device)
        timing = job.summary.stages
        spec = WorkerSpec(model=model_ref(config.model), trust_remote_code=config.trust_remote_code,
                          init=config.worker_init)
        with InputPipeline(spec, workers, timing, row_timeout=config.row_timeout) as inputs:
            extractor, attrs = prepare_extractor(job.run)  # the workers load their processor meanwhile
            job.model_loaded()
            if job.num_shards is not None:
                attrs.num_shards = job.num_shards
            start = time.perf_counter()  # the rate counts the extraction, not the model's loading
            try:
                _extract_all(job, extractor, attrs, inputs, workers)
            finally:
                job.summary.seconds = time.perf_counter() - start
        attrs.stage_seconds = json.dumps(timing.as_dict())
        return attrs


def versions() -> dict[str, str]:
    """The versions a run records (halp, torch, transformers)."""
    import transformers  # the model is being loaded: transformers is imported anyway

    return {"halp": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def attributes_for_model(run: ExtractPass, model: Any, adapter: Any, layers: list[int]) -> RunAttributes:
    """What every part committed by a loaded model's pass records (completed once the batch size is known)."""
    config = run.config
    return RunAttributes(
        model_id=config.model,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        model_type=model.config.model_type,
        adapter=type(adapter).__name__,
        layers=list(layers),
        num_layers=adapter.num_layers,
        dtype=run.dtype,
        device=run.device,
        batch_size=config.batch_size,
        max_new_tokens=run.max_new_tokens,
        attn_implementation=getattr(model.config, "_attn_implementation", None) or config.attn_implementation,
        generated=run.max_new_tokens > 0,
        exif_orientation=config.exif_orientation,
        versions=json.dumps(versions()),
        created=datetime.now(timezone.utc).isoformat(),
    )


def prepare_extractor(run: ExtractPass) -> tuple[FeatureExtractor, RunAttributes]:
    """Load the model, pick its adapter and layers; the attributes every committed part records."""
    config = run.config
    if config.preloaded is not None:
        model, processor = config.preloaded
    else:
        model, processor = load_model(
            config.model, run.device, run.dtype, config.trust_remote_code,
            attn_implementation=config.attn_implementation,
        )
    adapter = adapter_for(model, processor)
    layers = parse_layers(config.layers, adapter.num_layers)
    attrs = attributes_for_model(run, model, adapter, layers)
    return FeatureExtractor(adapter, layers), attrs


def _extract_all(
    job: Job, extractor: FeatureExtractor, attrs: RunAttributes, inputs: InputPipeline, workers: int
) -> None:
    """The overlapped loop (halp.pipeline): input workers -> the model in this thread -> the in-order writer."""
    config, dtype, max_new_tokens = job.run.config, job.run.dtype, job.run.max_new_tokens
    todo, store, failures, summary = job.todo, job.store, job.failures, job.summary
    device = str(extractor.input_device())
    source = image_source(config)
    rules = RowRules(source, config.exif_orientation, frozenset(special_tokens_of(extractor)))
    counter = TokenCounter(extractor.adapter, source)
    batch_size = resolve_batch_size(config, extractor, todo, counter, rules, max_new_tokens, device)
    processor_device = resolve_processor_device(config.processor_device, extractor, device)
    attrs.batch_size = summary.batch_size = batch_size
    attrs.batch_size_auto = config.batch_size == "auto"
    attrs.workers, attrs.processor_device = workers, processor_device
    timing = summary.stages
    timing.workers, timing.processor_device = workers, processor_device
    # With the processor on the GPU the workers only decode; the feeder thread processes on the device.
    device_encoder = _device_encoder(extractor, processor_device) if processor_device != "cpu" else None
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

    setup = WorkerSetup(type(extractor.adapter), rules, encode=device_encoder is None)
    inputs.start(plan_batches(todo, batch_size, counter), setup, finish, encoder=extractor.adapter)
    start = time.perf_counter()
    with (
        tqdm(total=len(todo), unit="sample", disable=not config.progress, desc=job.label) as bar,
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
        attrs.attn_implementation,
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


def extract_loaded(
    ready: Sequence[Sample],
    images: Sequence[Image.Image],
    extractor: FeatureExtractor,
    max_new_tokens: int,
    store: RunStore,
    attrs: RunAttributes,
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
    attrs: RunAttributes,
    failures: FailureList,
    dtype: str,
    exif_orientation: bool = True,
) -> int:
    """Extract one batch and commit its good rows to `store`; bad rows go to `failures`. Returns rows extracted."""
    ready, images = load_batch(batch, images_dir, failures, exif_orientation)
    return extract_loaded(ready, images, extractor, max_new_tokens, store, attrs, failures, dtype)


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
            failures.record(samples[0], "extract", type(err).__name__, one_line(err))
            return
        log.warning("batch of %d failed (%s: %s); retrying its rows one by one", len(samples), type(err).__name__,
                    one_line(err))
        for index in range(len(samples)):
            yield from _extract_isolating_failures(
                extractor, samples[index : index + 1], encode, max_new_tokens, failures
            )
        return
    yield samples, result


def _commit_finite_rows(
    store: RunStore,
    samples: list[Sample],
    result: BatchResult,
    attrs: RunAttributes,
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
