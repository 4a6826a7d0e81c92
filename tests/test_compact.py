"""Compact per-row bookkeeping (halp.compact): the same answers as the dicts and sets it replaces."""

from __future__ import annotations

import hashlib

import halp.compact as compact
from halp.compact import CommittedDigests, RowDigests


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def test_row_digests_answer_like_a_dict(monkeypatch):
    monkeypatch.setattr(compact, "CHUNK_ROWS", 3)  # several chunks
    ids = [f"q{i}" for i in range(10)] + ["é/ü", "\ud800lone", ""]
    expected = {qid: _hex(qid) for qid in ids}
    digests = RowDigests(expected.items())
    assert len(digests) == len(expected) and list(digests) == ids
    assert {qid: digests[qid] for qid in ids} == expected and dict(digests) == expected
    assert list(digests.items_in_order()) == list(expected.items())
    assert digests.get("missing") is None and "missing" not in digests and "q3" in digests
    assert digests.nbytes < 200 * len(ids)


def test_a_hash_collision_does_not_mix_rows(monkeypatch):
    monkeypatch.setattr(compact, "id_hash", lambda question_id: 7)  # every id collides
    digests = RowDigests((f"q{i}", _hex(str(i))) for i in range(5))
    assert [digests[f"q{i}"] for i in range(5)] == [_hex(str(i)) for i in range(5)]
    committed = CommittedDigests()
    committed.add(["a", "b"], [_hex("a"), _hex("b")])
    committed.seal()
    assert committed.holds("a", _hex("a")) and not committed.holds("a", _hex("b"))


def test_committed_digests_like_sets_of_digests():
    committed = CommittedDigests()
    committed.add(["q1", "q2"], [_hex("one"), ""])  # q2: written before digests were recorded
    committed.add(["q1", "q3"], [_hex("one, changed"), "not hex"])  # q1 twice while a changed copy awaits assembly
    committed.seal()
    assert len(committed) == 4
    assert committed.holds("q1", _hex("one")) and committed.holds("q1", _hex("one, changed"))
    assert not committed.holds("q1", _hex("two")) and not committed.holds("q2", _hex("two"))
    assert committed.holds("q2", "")  # a blank digest matches only a blank one
    assert not committed.holds("q3", _hex("not hex")) and not committed.holds("q4", _hex("one"))
    assert "q3" in committed and "q4" not in committed
    empty = CommittedDigests().seal()
    assert len(empty) == 0 and "q1" not in empty and not empty.holds("q1", _hex("one"))
