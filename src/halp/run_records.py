"""The records of one extraction, shared by its lifecycle (halp.extract) and its engines.

- `ExtractConfig`: what the user asked for (the `halp extract` options);
- `ExtractPass`: the same, resolved once (device, dtype, answer length) and handed down whole;
- `RunAttributes`: what `features.h5` records at its root (model, layers, dtype, batch size, ...), typed;
- `ExtractSummary`: what the pass did (rows done, failed, stage times), returned to the caller;
- `Job` and `Engine`: what the lifecycle hands an engine, and what an engine offers (halp.extract);

and what a config names: its table (`read_table`), its images (`image_source`), the run identity `run.json` holds
(`run_identity`: the settings a rerun must agree on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from halp.data import ImageSource, Sample, input_table
from halp.errors import ParameterError, ShardError
from halp.inputs import FailureList
from halp.loading import check_attn_implementation, resolve_device, resolve_dtype
from halp.pipeline import ROW_TIMEOUT, StageTimes
from halp.rows import RunAttributes
from halp.shard import Shard
from halp.store import RunStore

log = logging.getLogger(__name__)

#: --processor-device choices.
PROCESSOR_DEVICES = ("auto", "cpu", "cuda")


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
    """The table's rows (after `limit`), read and checked: a bad table fails here, before any model loads."""
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


def model_ref(model: str) -> str:
    """The model as a run records it: a local checkpoint's absolute path, else the hub id as given."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def run_identity(config: ExtractConfig, dtype: str, max_new_tokens: int, num_shards: int) -> dict[str, Any]:
    """The settings `run.json` records and a rerun must agree on (halp.store.IDENTITY_KEYS)."""
    # The layer list is resolved after loading; the identity check uses the spec until then.
    return {
        "model": model_ref(config.model),
        "layers": config.layers,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompt_format": "chat_template/user[image,text]",
        "exif_orientation": config.exif_orientation,
        "num_shards": num_shards,
        "data": data_identity(config),
    }


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


@dataclass(frozen=True)
class ExtractPass:
    """One extraction pass's settings: the user's config and where and how the model runs (device, dtype, answer
    length), resolved once by the engine and handed down whole."""

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

    def log_rate(self) -> None:
        log.info(
            "processed %d samples in %.1fs (%.2f samples/s); %d failed",
            self.processed,
            self.seconds,
            self.samples_per_second,
            len(self.failed),
        )
        if self.stages.batches:
            log.info("%s", self.stages.line())


@dataclass
class Job:
    """The rows one engine extracts, and where their results and failures go: what the lifecycle hands it."""

    run: ExtractPass
    #: The rows to extract (a view of the table's rows, or a list), in table order.
    todo: Sequence[Sample]
    #: This writer's store: committed parts go to its parts directory.
    store: RunStore
    failures: FailureList
    summary: ExtractSummary
    #: The progress bar's label ("extract", or "extract 0-of-2" for a shard).
    label: str = "extract"
    #: Recorded in every part of a sharded run.
    num_shards: int | None = None
    #: Called once the engine has loaded the model (the run's checks that need it loaded).
    model_loaded: Callable[[], None] = lambda: None


class Engine(Protocol):
    """How an extraction's rows are executed: in this process (halp.local_engine) or by Ray actors
    (halp.ray_engine). The lifecycle (halp.extract.run_extraction) does everything else."""

    name: str

    def check(self, config: ExtractConfig, shard: Shard) -> None:
        """Refuse options this engine cannot honour, before the table is read."""

    def resolve(self, config: ExtractConfig, shard: Shard) -> ExtractPass:
        """Where and how the model runs (device, dtype), decided before the run directory is opened."""

    def opened(self, store: RunStore) -> None:
        """Called once the run directory is held, before its rows are planned."""

    def execute(self, job: Job) -> RunAttributes | None:
        """Extract `job.todo` and commit parts; the attributes the parts recorded (None: read them back from the
        parts), which the assembly completes."""
