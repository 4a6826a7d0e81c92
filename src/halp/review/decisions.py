"""From decisions to labels: how reviewers' verdicts (`halp.review.model`) merge over the automatic labels.

A row's reviewers are combined (agreeing verdicts; a conflict left unknown, or settled by `--resolve latest`),
applied over the rule, judge or imported label (`merge_decisions`, `halp label`'s hook `apply_reviews`), and
compared with it and with each other (agreement, Cohen's kappa: `review_agreement`, for `halp report`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from halp.label_rules import Label, label_answer
from halp.layout import features_file, reviews_file
from halp.review.label_studio import read_export

# The log, its state and the reviewer checks live in halp.review.model; they stay importable from here.
from halp.review.model import (  # noqa: F401
    LABEL_WORDS,
    RESOLVE_CHOICES,
    REVIEWER_PATTERN,
    VERDICT_LABELS,
    VERDICTS,
    Decision,
    ReviewLog,
    ReviewState,
    check_resolve,
    check_reviewer,
    default_reviewer,
    utc_now,
)
from halp.rows import read_row_texts


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
    if not reviews_file(run_dir).is_file():
        return None
    rows = read_row_texts(features_file(Path(run_dir)), ("question_id", "question", "ground_truth", "answer")).columns
    rules = [
        label_answer(question, truth, answer)
        for question, truth, answer in zip(rows["question"], rows["ground_truth"], rows["answer"], strict=True)
    ]
    log = ReviewLog.of_run(run_dir)
    _, summary = merge_decisions(rows["question_id"], rules, log.state, sources=[str(log.path)])
    summary.damaged = log.damaged
    return summary
