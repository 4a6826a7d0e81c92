"""Per-row run bookkeeping in compact arrays: each row's content digest, and what a run directory has committed.

A Python dict of 100,000 question_ids to 64-character hex digests costs ~25 MB, and one to sets of digests ~40 MB;
these hold the same in about 60 bytes a row (the ids as Arrow text, 32 digest bytes, an 8-byte hash and an 8-byte
position), so the memory of planning a resume grows with the table only by that. Lookups go through a stable
64-bit hash of the question_id, sorted, and compare the id itself, so a hash collision cannot mix two rows up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

#: Rows converted at a time when building (one chunk's Python objects exist at once).
CHUNK_ROWS = 4096


def id_hash(question_id: str) -> int:
    """A stable signed 64-bit hash of a question_id (BLAKE2b; any text, lone surrogates included)."""
    digest = hashlib.blake2b(question_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _digest_bytes(hex_digest: str) -> bytes:
    """32 bytes for a SHA-256 hex digest; zeros for "" (a row committed before digests were recorded). Any other
    text (never written by halp) becomes a digest of itself, which matches no row's content digest."""
    if not hex_digest:
        return bytes(32)
    try:
        value = bytes.fromhex(hex_digest)
    except ValueError:
        value = b""
    if len(value) != 32:
        return hashlib.sha256(b"not a digest:" + hex_digest.encode("utf-8", "surrogatepass")).digest()
    return value


def _digest_array(hex_digests: Iterable[str]) -> np.ndarray:
    """The digests as rows of 32 bytes."""
    return np.frombuffer(b"".join(_digest_bytes(value) for value in hex_digests), dtype=np.uint8).reshape(-1, 32)


class _IdIndex:
    """question_ids in Arrow with a sorted hash index: position of an id, or None."""

    def __init__(self, ids: list[str] | None = None) -> None:
        import pyarrow as pa

        self._chunks: list[pa.Array] = []
        self._hash_chunks: list[np.ndarray] = []
        self._ids: pa.ChunkedArray | None = None
        self._hashes = np.zeros(0, dtype=np.int64)
        self._order = np.zeros(0, dtype=np.int64)
        if ids:
            self.extend(ids)

    def extend(self, ids: list[str]) -> None:
        import pyarrow as pa

        # As bytes ("surrogatepass"): a question_id from a JSON escape may hold a lone surrogate.
        self._chunks.append(pa.array([qid.encode("utf-8", "surrogatepass") for qid in ids], type=pa.large_binary()))
        self._hash_chunks.append(np.fromiter((id_hash(qid) for qid in ids), dtype=np.int64, count=len(ids)))

    def seal(self) -> None:
        import pyarrow as pa

        self._ids = pa.chunked_array(self._chunks, type=pa.large_binary())
        hashes = np.concatenate(self._hash_chunks) if self._hash_chunks else np.zeros(0, dtype=np.int64)
        self._chunks, self._hash_chunks = [], []
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]

    def __len__(self) -> int:
        return len(self._hashes)

    def positions(self, question_id: str) -> Iterator[int]:
        """Every position holding this id (several where the same id was added more than once)."""
        assert self._ids is not None, "seal() first"
        key = id_hash(question_id)
        start = int(np.searchsorted(self._hashes, key, side="left"))
        stop = int(np.searchsorted(self._hashes, key, side="right"))
        for index in range(start, stop):
            position = int(self._order[index])
            if self._ids[position].as_py() == question_id.encode("utf-8", "surrogatepass"):
                yield position

    @property
    def nbytes(self) -> int:
        return self._hashes.nbytes + self._order.nbytes + (self._ids.nbytes if self._ids is not None else 0)

    def ids(self) -> Iterator[str]:
        assert self._ids is not None, "seal() first"
        for start in range(0, len(self._ids), CHUNK_ROWS):
            for value in self._ids.slice(start, CHUNK_ROWS).to_pylist():
                yield value.decode("utf-8", "surrogatepass")


class RowDigests(Mapping[str, str]):
    """question_id -> the row's content digest (hex), in table order; built from (id, hex digest) pairs."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._index = _IdIndex()
        digests: list[np.ndarray] = []
        ids: list[str] = []
        values: list[str] = []
        for question_id, hex_digest in pairs:
            ids.append(question_id)
            values.append(hex_digest)
            if len(ids) == CHUNK_ROWS:
                self._index.extend(ids)
                digests.append(_digest_array(values))
                ids, values = [], []
        if ids:
            self._index.extend(ids)
            digests.append(_digest_array(values))
        self._index.seal()
        self._digests = np.concatenate(digests) if digests else np.zeros((0, 32), dtype=np.uint8)

    def __getitem__(self, question_id: str) -> str:
        for position in self._index.positions(question_id):
            return self.hex_at(position)
        raise KeyError(question_id)

    def __iter__(self) -> Iterator[str]:
        return self._index.ids()

    def __len__(self) -> int:
        return len(self._index)

    def hex_at(self, position: int) -> str:
        return self._digests[position].tobytes().hex()

    def items_in_order(self) -> Iterator[tuple[str, str]]:
        for position, question_id in enumerate(self._index.ids()):
            yield question_id, self.hex_at(position)

    @property
    def nbytes(self) -> int:
        return self._digests.nbytes + self._index.nbytes


class CommittedDigests:
    """What a run directory has committed: (question_id, content digest) pairs, a row several times while a changed
    copy awaits assembly; "" is the digest of a row written before digests were recorded."""

    def __init__(self) -> None:
        self._index = _IdIndex()
        self._digests: list[np.ndarray] = []
        self._sealed: np.ndarray | None = None

    def add(self, question_ids: list[str], hex_digests: list[str]) -> None:
        for start in range(0, len(question_ids), CHUNK_ROWS):
            self._index.extend(question_ids[start : start + CHUNK_ROWS])
            self._digests.append(_digest_array(hex_digests[start : start + CHUNK_ROWS]))

    def seal(self) -> CommittedDigests:
        self._index.seal()
        self._sealed = np.concatenate(self._digests) if self._digests else np.zeros((0, 32), dtype=np.uint8)
        self._digests = []
        return self

    def __contains__(self, question_id: object) -> bool:
        return isinstance(question_id, str) and next(self._index.positions(question_id), None) is not None

    def holds(self, question_id: str, hex_digest: str) -> bool:
        """Whether this id is committed with this digest."""
        assert self._sealed is not None, "seal() first"
        wanted = np.frombuffer(_digest_bytes(hex_digest), dtype=np.uint8)
        return any(np.array_equal(self._sealed[position], wanted) for position in self._index.positions(question_id))

    def __len__(self) -> int:
        return len(self._index)
