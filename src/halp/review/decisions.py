"""`RUN_DIR/reviews.jsonl`: every manual decision, appended, and how the decisions become labels.

One JSON object per line::

    {"id": "3f2c…", "question_id": "q0007", "label": "hallucinated", "reviewer": "ana",
     "time": "2026-12-01T02:15:59.123Z", "previous": null, "action": "decide", "undoes": null}

`label` is `hallucinated`, `correct`, `unsure`, or null: the reviewer withdrew their decision (an
undo back to "not reviewed"). `previous` is what that reviewer had said about the row before this
line. `action` is `decide` or `undo` (then `undoes` is the id of the decision it reverts). Lines are
never rewritten: an undo is a new line. The log's order is the order of the decisions (writers
append under an exclusive lock), so "latest" means "later in the file", whatever the clocks say.

Each append is one fsynced `write` (`halp.layout.append_line_durably`): a crash loses at most the
line in flight. A torn last line (no newline) is left alone by readers; the next writer ends it with
a newline, so it becomes one damaged line that readers count and report, never a lost neighbour.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from halp.errors import ReviewError
from halp.layout import append_line_durably, reviews_file

if TYPE_CHECKING:
    from halp.label import Label

#: A reviewer's verdicts and the label each one gives (`unsure` is a decision that leaves the row unknown).
VERDICT_LABELS: dict[str, int | None] = {"hallucinated": 1, "correct": 0, "unsure": None}
VERDICTS = tuple(VERDICT_LABELS)
LABEL_WORDS = {1: "hallucinated", 0: "correct", None: "unknown"}
#: Reviewer names go into labels.csv's method column and URLs: letters, digits and . _ @ - only.
REVIEWER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def default_reviewer() -> str:
    """The login name where it is a valid reviewer name, else "reviewer" (some containers have no login name)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"
    return name if REVIEWER_PATTERN.match(name) else "reviewer"
RESOLVE_CHOICES = ("none", "latest")


def check_resolve(resolve: str) -> str:
    """How reviewers' conflicts are settled: one of RESOLVE_CHOICES (checked even when there are no reviews yet)."""
    if resolve not in RESOLVE_CHOICES:
        raise ReviewError(f"resolve={resolve!r}: choose one of {', '.join(RESOLVE_CHOICES)}")
    return resolve


def check_reviewer(name: str) -> str:
    if not REVIEWER_PATTERN.match(name):
        raise ReviewError(
            f"reviewer name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Decision:
    """One line of reviews.jsonl."""

    id: str
    question_id: str
    label: str | None
    reviewer: str
    time: str
    previous: str | None = None
    action: str = "decide"
    undoes: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "question_id": self.question_id,
                "label": self.label,
                "reviewer": self.reviewer,
                "time": self.time,
                "previous": self.previous,
                "action": self.action,
                "undoes": self.undoes,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """A decision from a parsed line; ValueError when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for key in ("id", "question_id", "reviewer", "time"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"missing or empty {key!r}")
        for key in ("label", "previous"):
            value = data.get(key)
            if value is not None and value not in VERDICT_LABELS:
                raise ValueError(f"{key} {value!r} is not one of {', '.join(VERDICTS)} or null")
        action = data.get("action", "decide")
        if action not in ("decide", "undo"):
            raise ValueError(f"action {action!r} is not decide or undo")
        return cls(
            data["id"], data["question_id"], data.get("label"), data["reviewer"], data["time"],
            data.get("previous"), action, data.get("undoes"),
        )  # fmt: skip


# ----- state: who said what, in order --------------------------------------------------------------------------
class ReviewState:
    """The decisions in log order, and each reviewer's current verdict per row (their latest line wins)."""

    def __init__(self, decisions: Iterable[Decision] = ()) -> None:
        self.decisions: list[Decision] = []
        self._rows: dict[str, dict[str, tuple[int, Decision]]] = {}  # question_id -> reviewer -> latest
        self._by_id: dict[str, Decision] = {}
        for decision in decisions:
            self.add(decision)

    def add(self, decision: Decision) -> None:
        position = len(self.decisions)
        self.decisions.append(decision)
        self._rows.setdefault(decision.question_id, {})[decision.reviewer] = (position, decision)
        self._by_id[decision.id] = decision

    def extend(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            self.add(decision)

    def find(self, decision_id: str) -> Decision | None:
        return self._by_id.get(decision_id)

    def current(self, reviewer: str, question_id: str) -> str | None:
        """The reviewer's verdict on the row now (None: not reviewed, or withdrawn)."""
        found = self._rows.get(question_id, {}).get(reviewer)
        return found[1].label if found else None

    def verdicts(self, question_id: str) -> list[tuple[int, Decision]]:
        """(log position, decision) of every reviewer whose current verdict on the row is not withdrawn."""
        found = [item for item in self._rows.get(question_id, {}).values() if item[1].label is not None]
        return sorted(found, key=lambda item: item[0])

    def by_row(self) -> dict[str, list[tuple[int, Decision]]]:
        """question_id -> its current, not withdrawn, verdicts in log order (rows without any are left out)."""
        rows = {qid: self.verdicts(qid) for qid in self._rows}
        return {qid: items for qid, items in rows.items() if items}

    def reviewed_by(self, reviewer: str) -> dict[str, Decision]:
        """question_id -> the reviewer's current decision, for rows they have a verdict on."""
        found = {qid: by.get(reviewer) for qid, by in self._rows.items()}
        return {qid: item[1] for qid, item in found.items() if item is not None and item[1].label is not None}

    def reviewers(self) -> list[str]:
        return sorted({decision.reviewer for decision in self.decisions})


# ----- the log ---------------------------------------------------------------------------------------------------
class ReviewLog:
    """reviews.jsonl, read incrementally and appended under an exclusive lock (several servers may share it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.state = ReviewState()
        self.damaged: list[int] = []  # 1-based line numbers that are not a decision
        self._offset = 0
        self._lines = 0
        self._lock = threading.Lock()

    @classmethod
    def of_run(cls, run_dir: str | Path) -> ReviewLog:
        log = cls(reviews_file(run_dir))
        log.refresh()
        return log

    def refresh(self) -> ReviewState:
        """Read what other writers appended since the last read; complete lines only."""
        with self._lock:
            self._read_new()
        return self.state

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # nothing, or a line still being written: read it once it is complete
        for raw in chunk[:end].split(b"\n"):
            self._lines += 1
            try:
                decision = Decision.from_json(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, ValueError):
                self.damaged.append(self._lines)
                continue
            self.state.add(decision)
        self._offset += end + 1

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This thread and no other process appends now; the state is fresh inside."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as err:
                raise ReviewError(f"cannot open {self.path} to append: {err}; the decision was not saved") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A writer died mid-line: end that line so the next decision is not glued onto it.
                    os.write(fd, b"\n")
                    os.fsync(fd)
                self._read_new()
                yield
                self._read_new()
            finally:
                os.close(fd)  # releases the lock

    def _append(self, decision: Decision) -> Decision:
        try:
            append_line_durably(self.path, decision.to_json())
        except OSError as err:
            raise ReviewError(f"cannot append to {self.path}: {err}; the decision was not saved") from err
        return decision

    def decide(self, question_id: str, label: str | None, reviewer: str) -> Decision:
        """Record the reviewer's verdict on a row (None withdraws it); returns the line written."""
        check_reviewer(reviewer)
        if label is not None and label not in VERDICT_LABELS:
            raise ReviewError(f"label {label!r} is not one of {', '.join(VERDICTS)}")
        with self._exclusive():
            previous = self.state.current(reviewer, question_id)
            return self._append(Decision(uuid.uuid4().hex, question_id, label, reviewer, utc_now(), previous))

    def undo(self, decision_id: str, reviewer: str) -> Decision:
        """Revert a decision of `reviewer` to what they had said before it, if nothing changed the row since."""
        check_reviewer(reviewer)
        with self._exclusive():
            target = self.state.find(decision_id)
            if target is None:
                raise ReviewError(f"no decision {decision_id!r} in {self.path}")
            if target.reviewer != reviewer:
                raise ReviewError(f"decision {decision_id} is {target.reviewer}'s, not {reviewer}'s")
            now = self.state.current(reviewer, target.question_id)
            if now != target.label:
                raise ReviewError(
                    f"row {target.question_id} changed since that decision ({reviewer} now says {now or 'nothing'},"
                    " perhaps in another tab); nothing was undone"
                )
            return self._append(
                Decision(
                    uuid.uuid4().hex, target.question_id, target.previous, reviewer, utc_now(), now, "undo", target.id
                )
            )


# ----- from decisions to labels ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowVerdict:
    """The manual verdict of one row once its reviewers' current verdicts are combined."""

    label: int | None
    method: str
    reason: str
    conflict: bool
    resolved: bool = False  # a conflict settled by --resolve latest


def _said(items: Sequence[tuple[int, Decision]]) -> str:
    return ", ".join(f"{decision.reviewer} {decision.label}" for _, decision in items)


def combine(items: Sequence[tuple[int, Decision]], resolve: str = "none") -> RowVerdict:
    """One row's verdict from its reviewers' current verdicts (in log order, none withdrawn)."""
    check_resolve(resolve)
    if not items:
        raise ValueError("combine needs at least one verdict")
    verdicts = {decision.label for _, decision in items}
    names = [decision.reviewer for _, decision in items]
    if len(verdicts) == 1:
        verdict = verdicts.pop()
        assert verdict is not None
        method = "manual:" + "+".join(sorted(names))
        return RowVerdict(VERDICT_LABELS[verdict], method, f"{verdict} ({', '.join(sorted(names))})", False)
    if resolve == "latest":
        _, latest = max(items, key=lambda item: item[0])
        assert latest.label is not None
        return RowVerdict(
            VERDICT_LABELS[latest.label],
            f"manual:{latest.reviewer}",
            f"{latest.label}: latest of {_said(items)}",
            True,
            True,
        )
    return RowVerdict(None, "manual:conflict", f"reviewers disagree: {_said(items)}", True)


@dataclass(frozen=True)
class Agreement:
    """How often two sources give the same label on the rows both labelled."""

    first: str
    second: str
    n: int
    agree: int
    kappa: float | None  # None when undefined (fewer than two rows, or one category used by both)
    table: dict[tuple[str, str], int] = field(default_factory=dict)  # (first's, second's) -> rows

    @property
    def rate(self) -> float | None:
        return self.agree / self.n if self.n else None


def agreement(first: str, second: str, pairs: Sequence[tuple[str, str]]) -> Agreement:
    """Agreement and Cohen's kappa (scikit-learn's) of two label sequences over the same rows."""
    from sklearn.metrics import cohen_kappa_score

    a = [pair[0] for pair in pairs]
    b = [pair[1] for pair in pairs]
    agree = sum(x == y for x, y in pairs)
    kappa = None
    if len(pairs) >= 2 and len(set(a) | set(b)) >= 2:
        kappa = float(cohen_kappa_score(a, b))
    return Agreement(first, second, len(pairs), agree, kappa, dict(Counter(pairs)))


@dataclass
class ReviewSummary:
    """What the manual decisions did to labels.csv."""

    sources: list[str]  # reviews.jsonl and/or a Label Studio export
    reviewers: dict[str, int]  # reviewer -> rows they have a verdict on (in this run)
    reviewed: int = 0  # rows with at least one verdict
    labelled: int = 0  # rows the verdicts label 1/0
    unsure: int = 0  # rows whose reviewers agree on unsure
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (question_id, reason), left unknown
    resolved: list[tuple[str, str]] = field(default_factory=list)  # conflicts settled by --resolve latest
    changed: int = 0  # rows whose automatic label (1/0) the review changed or withdrew
    unmatched: int = 0  # reviewed question_ids that are not in the run
    damaged: list[int] = field(default_factory=list)  # unreadable lines of reviews.jsonl
    automatic: list[Agreement] = field(default_factory=list)  # per automatic method vs the manual verdict
    reviewer_pairs: list[Agreement] = field(default_factory=list)  # Cohen's kappa between reviewers
    resolve: str = "none"


def _automatic_source(method: str) -> str:
    """rule, judge, or `table` for labels imported with --labels (method `manual`)."""
    source = method.split(":", 1)[0] or method
    return "table" if source == "manual" else source


def merge_decisions(
    question_ids: Sequence[str],
    automatic: Sequence[Label],
    state: ReviewState,
    resolve: str = "none",
    sources: Sequence[str] = (),
) -> tuple[list[Label], ReviewSummary]:
    """The labels with the manual verdicts applied over the automatic ones, and what changed.

    A row with verdicts gets method `manual:<reviewer>` (`manual:a+b` when several agree); reviewers who
    disagree leave it unknown (`manual:conflict`) unless `resolve="latest"`, where the verdict latest in the
    log wins. `unsure` leaves the row unknown even where a rule had labelled it: a person looked and could
    not tell, so the rule's label is not trusted either.
    """
    from halp.label import Label

    check_resolve(resolve)
    rows = state.by_row()
    in_run = set(question_ids)
    summary = ReviewSummary(list(sources), {}, resolve=resolve)
    summary.unmatched = sum(qid not in in_run for qid in rows)
    per_reviewer: Counter = Counter()
    versus: dict[str, list[tuple[str, str]]] = {}
    merged: list[Label] = []
    for qid, auto in zip(question_ids, automatic, strict=True):
        items = rows.get(qid)
        if not items:
            merged.append(auto)
            continue
        summary.reviewed += 1
        per_reviewer.update(decision.reviewer for _, decision in items)
        verdict = combine(items, resolve)
        before = f"{auto.method} said {LABEL_WORDS[auto.label]}" if auto.method != "none" else "no automatic label"
        merged.append(Label(verdict.label, verdict.method, f"{verdict.reason}; {before}", auto.answer_type))
        if verdict.conflict and not verdict.resolved:
            summary.conflicts.append((qid, verdict.reason))
        elif verdict.resolved:
            summary.resolved.append((qid, verdict.reason))
        if verdict.label is not None:
            summary.labelled += 1
        elif not verdict.conflict:
            summary.unsure += 1
        if auto.label is not None and verdict.label != auto.label:
            summary.changed += 1
        if auto.label is not None and verdict.label is not None:
            source = _automatic_source(auto.method)
            versus.setdefault(source, []).append((LABEL_WORDS[auto.label], LABEL_WORDS[verdict.label]))
    summary.reviewers = dict(sorted(per_reviewer.items()))
    summary.automatic = [agreement(source, "manual", pairs) for source, pairs in sorted(versus.items())]
    summary.reviewer_pairs = reviewer_agreement(state, in_run)
    return merged, summary


def reviewer_agreement(state: ReviewState, question_ids: set[str] | None = None) -> list[Agreement]:
    """Cohen's kappa of every pair of reviewers over the rows both have a verdict on (unsure is a category)."""
    rows = state.by_row()
    names = sorted({decision.reviewer for items in rows.values() for _, decision in items})
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = []
            for qid, items in rows.items():
                if question_ids is not None and qid not in question_ids:
                    continue
                said = {decision.reviewer: decision.label for _, decision in items}
                if first in said and second in said:
                    shared.append((str(said[first]), str(said[second])))
            if shared:
                pairs.append(agreement(first, second, shared))
    return pairs


def apply_reviews(
    run_dir: str | Path,
    question_ids: Sequence[str],
    automatic: Sequence[Label],
    resolve: str = "none",
    label_studio: str | Path | None = None,
) -> tuple[list[Label], ReviewSummary | None]:
    """`halp label`'s hook: merge RUN_DIR/reviews.jsonl (and a Label Studio export) over the automatic labels.

    Without either, the labels come back unchanged and the summary is None.
    """
    state = ReviewState()
    sources: list[str] = []
    damaged: list[int] = []
    if label_studio is not None:
        from halp.review.label_studio import read_export

        state.extend(read_export(label_studio))
        sources.append(str(label_studio))
    path = reviews_file(run_dir)
    if path.is_file():
        log = ReviewLog.of_run(run_dir)
        state.extend(log.state.decisions)  # after the export: a local review is the later word
        damaged = log.damaged
        sources.append(str(path))
    if not sources:
        return list(automatic), None
    merged, summary = merge_decisions(question_ids, automatic, state, resolve, sources)
    summary.damaged = damaged
    return merged, summary


def review_agreement(run_dir: str | Path) -> ReviewSummary | None:
    """The review summary of a run against its rule labels (for `halp report`); None without reviews.jsonl."""
    from halp.label import _run_rows, label_answer

    if not reviews_file(run_dir).is_file():
        return None
    rows = _run_rows(Path(run_dir))
    rules = [
        label_answer(question, truth, answer)
        for question, truth, answer in zip(rows["question"], rows["ground_truth"], rows["answer"], strict=True)
    ]
    log = ReviewLog.of_run(run_dir)
    _, summary = merge_decisions(rows["question_id"], rules, log.state, sources=[str(log.path)])
    summary.damaged = log.damaged
    return summary
