"""Content digests: the one home of every SHA-256 halp computes over a user's bytes.

- `bytes_sha256` / `file_sha256`: an image's or a table's bytes (a file is opened by `halp.userfiles`: regular
  files only, never blocking on a FIFO);
- `row_digest`: a table row's content identity (its text and its image's bytes), what a committed row records as
  `row_sha256` and what a rerun compares (halp.store);
- `table_text_digest`: the text of a whole table in order (the shards of one run must have read the same table);
- `handle_sha256`: an open binary file, streamed (a checkpoint's files, halp.loading.model_fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from halp.errors import HalpError, UserFileError
from halp.userfiles import open_user_file

if TYPE_CHECKING:  # annotations only: halp.data hashes through this module
    from halp.data import Sample


def bytes_sha256(data: bytes | None) -> str:
    """SHA-256 of `data` in hex; "" for no bytes (a row without an image: its load fails later with a reason)."""
    return hashlib.sha256(data).hexdigest() if data else ""


def handle_sha256(handle: BinaryIO) -> str:
    """SHA-256 of an open binary file from its current position to its end, read in chunks."""
    return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: str | Path, what: str = "file", error: type[HalpError] = UserFileError) -> str:
    """SHA-256 of a regular file's bytes (opened by `halp.userfiles`); `error`, naming the file, when it cannot be
    opened or read."""
    with open_user_file(path, what, error=error) as handle:
        try:
            return handle_sha256(handle)
        except OSError as err:
            raise error(f"{what} {path} cannot be read: {err.strerror or err}") from err


def row_digest(sample: Sample, image_sha256: str) -> str:
    """The content identity of one row: everything of the table row (ids, question, ground truth, metadata) and
    the image's bytes. A rerun re-extracts a committed row whose digest differs from the table's."""
    text = json.dumps(
        [sample.question_id, sample.image_id, sample.question, sample.ground_truth, sorted(sample.meta.items())],
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{text}\n{image_sha256}".encode("utf-8", "surrogatepass")).hexdigest()


def table_text_digest(samples: Sequence[Sample]) -> str:
    """Fingerprint of a table's text (every row's ids, question, ground truth, metadata) in order: the shards of one
    run must have read the same table. Images are not read here (each shard digests its own rows' images)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(row_digest(sample, "").encode("ascii") + b"\n")
    return digest.hexdigest()
