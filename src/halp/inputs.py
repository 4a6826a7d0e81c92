"""The per-row input rules: what makes a row usable, how its image is read, and how a failed row is recorded.

Every way rows reach a model obeys these rules the same way: the local loop in series, its input worker processes
(halp.pipeline), the Ray engine's actors, `halp predict` and `halp serve`. A row that breaks one is recorded with
a stage and a reason (`FailureList`) and never stops the others:

- `load_batch`: a question that is empty or cannot be stored in HDF5, an image that cannot be read (missing,
  truncated, a FIFO, a decompression bomb, ...); the row's content digest is taken from the bytes decoded;
- `special_token_message`: a question holding one of the model's special tokens (image placeholder, chat markers);
- `encode_rows`: rows the processor refuses, found one by one when their batch fails;
- `prepare`: all of the above for one batch, as an input worker or the serial loop runs it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from halp.data import ImageSource, Sample, as_image_source
from halp.digests import row_digest

log = logging.getLogger(__name__)

#: (sample, stage, error type, message): a row that failed before reaching the model.
RowFailure = tuple[Sample, str, str, str]


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


def one_line(err: BaseException, width: int = 500) -> str:
    """A row's error in one line of at most `width` characters (errors.jsonl, the log)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= width else text[: width - 1] + "…"


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


def special_tokens_of(encoder: Any) -> set[str]:
    """The model's special tokens (image placeholder, chat markers, ...), which a question must not contain.

    `encoder`: an adapter (halp.models.Adapter), or an object holding one as `.adapter` (a FeatureExtractor)."""
    adapter = getattr(encoder, "adapter", encoder)
    tokenizer = adapter.tokenizer()
    found = {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {str(token.content) for token in decoder.values() if getattr(token, "special", False)}
    for holder in (adapter.processor, tokenizer):
        for name in ("image_token", "video_token", "boi_token", "eoi_token", "audio_token"):
            value = getattr(holder, name, None)
            if isinstance(value, str):
                found.add(value)
    image_token = tokenizer.convert_ids_to_tokens(adapter.image_token_id)
    if isinstance(image_token, str):
        found.add(image_token)
    return {token for token in found if token.strip()}


def reject_special_tokens(
    samples: Sequence[Sample], images: Sequence[Image.Image], encoder: Any, failures: FailureList
) -> tuple[list[Sample], list[Image.Image]]:
    """Rows whose question contains one of the model's special tokens fail: the prompt would change shape (an
    image placeholder in the text gives the row a second image slot, a chat marker ends the user turn)."""
    specials = special_tokens_of(encoder)
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


@dataclass
class Prepared:
    """One batch ready for the model: its rows, their processor inputs, and the rows that failed before."""

    index: int
    samples: list[Sample]
    failures: list[RowFailure] = field(default_factory=list)
    inputs: dict[str, Any] | None = None
    #: Decoded images, kept only while the processor still has to run (processor on the GPU).
    images: list[Image.Image] | None = None
    loading_seconds: float = 0.0
    processing_seconds: float = 0.0
    #: Set by the feeder: token positions (halp.capture.Positions).
    positions: Any = None


@dataclass(frozen=True)
class RowRules:
    """How a row's inputs are read: the same rules in a worker process as in the serial loop."""

    #: The table's images: files under --images, or embedded in the table (halp.data.ImageSource; picklable).
    images: ImageSource
    exif_orientation: bool = True
    #: The model's special tokens: a question holding one fails (`special_token_message`).
    specials: frozenset[str] = frozenset()


#: Called by an input worker as it starts each step of a batch: ("row", position in the batch) before a row's image
#: is read, ("processing", rows) before the processor runs. The main process holds each step to a deadline.
Progress = Callable[[str, int], None]


def load_rows(
    samples: Sequence[Sample], rules: RowRules, progress: Progress | None = None
) -> tuple[list[Sample], list[Image.Image], list[RowFailure]]:
    """The rows that can be given to the processor, with their images (and content digests); the others as
    failures: the rules of `load_batch` and `special_token_message`.

    With `progress`, the rows are read one at a time, each announced first, so a row whose decoder never returns
    is known by its position."""
    class Collected(FailureList):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[RowFailure] = []

        def record(self, sample: Sample, stage: str, error: str, message: str) -> None:
            self.rows.append((sample, stage, error, message))

    collected = Collected()
    if progress is None:
        loaded, loaded_images = load_batch(samples, rules.images, collected, rules.exif_orientation)
    else:
        loaded, loaded_images = [], []
        for position, sample in enumerate(samples):
            progress("row", position)
            one, one_image = load_batch([sample], rules.images, collected, rules.exif_orientation)
            loaded += one
            loaded_images += one_image
    ready, images = [], []
    for sample, image in zip(loaded, loaded_images, strict=True):
        message = special_token_message(sample.question, rules.specials)
        if message:
            collected.rows.append((sample, "input", "SpecialTokenInQuestion", message))
            continue
        ready.append(sample)
        images.append(image)
    return ready, images, collected.rows


def encode_rows(
    encoder: Any, samples: list[Sample], images: list[Image.Image]
) -> tuple[list[Sample], dict[str, Any] | None, list[RowFailure]]:
    """Processor inputs for the rows; if the batch fails, each row alone tells which rows cannot be processed."""
    if not samples:
        return [], None, []
    try:
        return samples, encoder.encode(images, [s.question for s in samples]), []
    except Exception:  # any processor error: find the rows that cause it, the others go on
        if len(samples) == 1:
            raise
    kept, kept_images, failures = [], [], []
    for sample, image in zip(samples, images, strict=True):
        try:
            encoder.encode([image], [sample.question])
        except Exception as err:  # this row's error, recorded; the run goes on
            failures.append((sample, "extract", type(err).__name__, one_line(err)))
            continue
        kept.append(sample)
        kept_images.append(image)
    if not kept:
        return [], None, failures
    return kept, encoder.encode(kept_images, [s.question for s in kept]), failures


def prepare(
    index: int, samples: list[Sample], rules: RowRules, encoder: Any | None, progress: Progress | None = None
) -> Prepared:
    """Load (and, given an encoder, process) one batch; `encoder` is an Adapter (only `encode` is used)."""
    start = time.perf_counter()
    ready, images, failures = load_rows(samples, rules, progress)
    loaded = time.perf_counter()
    prepared = Prepared(index, ready, failures, images=images, loading_seconds=loaded - start)
    if encoder is not None:
        if progress is not None and ready:
            progress("processing", len(ready))
        try:
            ready, inputs, more = encode_rows(encoder, ready, images)
        except Exception as err:  # a lone row the processor cannot take
            ready, inputs, more = [], None, [(ready[0], "extract", type(err).__name__, one_line(err))]
        prepared.samples, prepared.inputs, prepared.images = ready, inputs, None
        prepared.failures += more
        prepared.processing_seconds = time.perf_counter() - loaded
    return prepared
