"""The review model: what a review is, apart from the web app and from labels.csv.

The reviewers (names, checks), their decisions and the log that keeps them, the state that log gives (who says
what about each row, now), and the queues and progress the review page offers. `halp.review.session` and
`halp.review.app` build on this module; it imports neither.

`RUN_DIR/reviews.jsonl` holds every manual decision, appended. One JSON object per line::

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

A queue is the rows of a run still to look at (`QUEUES`), narrowed by column values and ordered by table position
or risk (`ORDERS`); its progress counts the reviewer's decisions and their pace.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from halp.errors import ReviewError
from halp.label_rules import Label
from halp.layout import append_line_durably, reviews_file
from halp.locks import appender_lock

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

    def disputed(self) -> set[str]:
        """question_ids whose reviewers' current verdicts differ."""
        return {qid for qid, items in self.by_row().items() if len({d.label for _, d in items}) > 1}


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
        """This thread and no other process appends now; the state is fresh inside. Processes take the log's lock
        file (halp.locks.appender_lock: the maintained `filelock`), threads of this one `_lock`."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                held = appender_lock(self.path)
                held.acquire()
            except OSError as err:
                raise ReviewError(f"cannot lock {self.path} to append: {err}; the decision was not saved") from err
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as err:
                held.release()
                raise ReviewError(f"cannot open {self.path} to append: {err}; the decision was not saved") from err
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A writer died mid-line: end that line so the next decision is not glued onto it.
                    os.write(fd, b"\n")
                    os.fsync(fd)
                self._read_new()
                yield
                self._read_new()
            finally:
                os.close(fd)
                held.release()

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


# ----- queues ----------------------------------------------------------------------------------------------------
QUEUES: dict[str, str] = {
    "unknown": "rows without a label (in labels.csv; without it, those the rules leave unknown)",
    "all": "every row",
    "rules": "rows the rules label (audit them)",
    "disagree": "rows where reviewers disagree",
    "doubtful": "rows whose label (labels.csv) the rules or the probe contradict",
}
ORDERS: dict[str, str] = {"table": "the run's order", "risk": "highest risk first"}
#: The column every row can be filtered by besides the run's metadata columns.
ANSWER_TYPE = "answer_type"


class QueuedRow(Protocol):
    """What a queue needs of a row under review (`halp.review.session.Row` is one)."""

    index: int
    question_id: str
    rule: Label
    risk: float | None

    @property
    def current(self) -> int | None: ...

    def doubts(self) -> list[str]: ...

    def value(self, column: str) -> str: ...


def parse_where(where: str | Mapping[str, str] | None) -> dict[str, str]:
    """`column=value` (several joined by `&` in a URL, or a mapping) into a mapping."""
    if where is None or where == "":
        return {}
    if isinstance(where, Mapping):
        return dict(where)
    found = {}
    for part in where.split(";"):
        column, sep, value = part.partition("=")
        if not sep or not column.strip():
            raise ReviewError(f"filter {part!r} is not column=value")
        found[column.strip()] = value.strip()
    return found


def queue_filters(name: str, where: str | Mapping[str, str] | None, order: str, columns: Sequence[str]
                  ) -> dict[str, str]:
    """The filters of a queue request, once its queue, order and filter columns (of `columns`) are checked."""
    if name not in QUEUES:
        raise ReviewError(f"queue {name!r}: choose one of {', '.join(QUEUES)}")
    if order not in ORDERS:
        raise ReviewError(f"order {order!r}: choose one of {', '.join(ORDERS)}")
    filters = parse_where(where)
    for column in filters:
        if column not in columns:
            raise ReviewError(f"cannot filter by {column!r}: the run has {', '.join(columns)}")
    return filters


def select_queue(
    rows: Sequence[QueuedRow], name: str, filters: Mapping[str, str], order: str, disputed: set[str]
) -> list[int]:
    """Row indices of queue `name` (checked by `queue_filters`) among `rows`, filtered by column values, in table or
    risk order; `disputed` holds the question_ids reviewers disagree on (`ReviewState.disputed`)."""
    chosen = []
    for row in rows:
        if any(row.value(column) != value for column, value in filters.items()):
            continue
        if name == "unknown" and row.current is not None:
            continue
        if name == "rules" and row.rule.label is None:
            continue
        if name == "disagree" and row.question_id not in disputed:
            continue
        if name == "doubtful" and not row.doubts():
            continue
        chosen.append(row.index)
    if order == "risk":
        chosen.sort(key=lambda i: (rows[i].risk is None, -(rows[i].risk or 0.0), i))
    return chosen


# ----- progress and pace -----------------------------------------------------------------------------------------
#: A pause longer than this between two decisions counts as this long (a coffee break is not review time).
IDLE_CAP_S = 120.0
#: The pace is measured over this many of the reviewer's latest decisions.
PACE_WINDOW = 60


def parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def pace_per_minute(times: Sequence[datetime], idle_cap_s: float = IDLE_CAP_S) -> float | None:
    """Decisions per minute over consecutive decisions, each pause capped at `idle_cap_s`; None below 3."""
    ordered = sorted(times)[-PACE_WINDOW:]
    if len(ordered) < 3:
        return None
    spent = sum(min((b - a).total_seconds(), idle_cap_s) for a, b in itertools.pairwise(ordered))
    return (len(ordered) - 1) / spent * 60.0 if spent > 0 else None


def queue_progress(
    state: ReviewState, index_of: Mapping[str, int], indices: Sequence[int], reviewer: str
) -> dict[str, Any]:
    """Done / total of a queue (row `indices`; `index_of`: question_id -> row index) for a reviewer, their pace
    (decisions per minute) and the time left."""
    mine = state.reviewed_by(check_reviewer(reviewer))
    queued = set(indices)
    done = sum(index_of.get(qid) in queued for qid in mine)
    times = []
    for decision in reversed(state.decisions):  # the latest PACE_WINDOW decisions are all the pace needs
        if decision.reviewer == reviewer and decision.action == "decide" and decision.label:
            time = parse_time(decision.time)
            if time is not None:
                times.append(time)
            if len(times) == PACE_WINDOW:
                break
    pace = pace_per_minute(times)
    left = len(indices) - done
    eta = left / pace * 60.0 if pace else None
    return {"done": done, "total": len(indices), "per_minute": pace, "eta_seconds": eta}
