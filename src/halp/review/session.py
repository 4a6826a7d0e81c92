"""What the review page shows and records: the run's rows, their rule labels and risk, queues and progress.

No web code here: `halp.review.app` turns these into HTTP, and tests call them directly.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from halp.data import resolve_image_path
from halp.errors import ImageError, ReviewError, ScorerError
from halp.label import read_labels
from halp.label_rules import Label, label_answer
from halp.layout import PREDICTIONS_FILE, RESULTS_JSON_FILE, RISK_DIR, features_file, labels_file, probe_file
from halp.metrics import THRESHOLD
from halp.results import read_predictions, read_settings

# The queues, progress and pace live in halp.review.model; these names stay importable from here.
from halp.review.model import (  # noqa: F401
    ANSWER_TYPE,
    IDLE_CAP_S,
    LABEL_WORDS,
    ORDERS,
    PACE_WINDOW,
    QUEUES,
    VERDICTS,
    Decision,
    ReviewLog,
    check_reviewer,
    pace_per_minute,
    parse_time,
    parse_where,
    queue_filters,
    queue_progress,
    select_queue,
)
from halp.rows import open_run_file, read_row_texts


@dataclass
class Row:
    index: int
    question_id: str
    image_id: str
    question: str
    ground_truth: str
    answer: str
    meta: dict[str, str]
    rule: Label
    risk: float | None = None
    risk_source: str | None = None
    #: The row's label in RUN_DIR/labels.csv (what `halp probe` trains on), None when the run has no labels.csv
    #: or the row is not in it.
    label: Label | None = None

    @property
    def current(self) -> int | None:
        """The label the row has now: labels.csv's, else the rules'."""
        return self.label.label if self.label is not None else self.rule.label

    def value(self, column: str) -> str:
        """The row's value of a column a queue can be filtered by: its answer type, or a metadata column."""
        return self.rule.answer_type if column == ANSWER_TYPE else self.meta[column]

    def doubts(self) -> list[str]:
        """Why the row's labels.csv label is in doubt: the rules decide otherwise, or the probe's out-of-fold risk
        (or `halp predict`'s) falls on the other side of the probes' threshold."""
        if self.label is None or self.label.label is None:
            return []
        found = []
        if self.rule.label is not None and self.rule.label != self.label.label:
            found.append(f"the rules say {LABEL_WORDS[self.rule.label]} ({self.rule.reason})")
        if self.risk is not None and int(self.risk >= THRESHOLD) != self.label.label:
            found.append(f"the probe's risk is {self.risk:.2f} ({'>=' if self.risk >= THRESHOLD else '<'} {THRESHOLD})")
        return found


def label_origin(label: Label) -> str:
    """Where a labels.csv label came from, in words (its `method` and `reason` columns, as `halp label` writes them)."""
    kind, _, detail = label.method.partition(":")
    if label.method == "manual":  # an imported table: reason "from|not in|empty in <file>:<column>"
        for lead, said in (("from ", "imported from"), ("not in ", "not in"), ("empty in ", "empty in")):
            if label.reason.startswith(lead):
                table, _, column = label.reason.removeprefix(lead).rpartition(":")
                return f"{said} {table} (column {column})" if table else f"{said} {label.reason}"
        return f"imported ({label.reason})"
    if kind == "manual":
        if detail == "conflict":
            return "reviewers disagree"
        return "review by " + ", ".join(detail.split("+"))
    if kind == "rule":
        return f"rule ({detail})"
    if kind == "judge":
        return f"judge {detail}"
    return label.method or "unknown origin"


def attach_labels(run_dir: str | Path, rows: Sequence[Row]) -> str | None:
    """Give rows their labels.csv label (halp.label.read_labels, the one reader of label tables); returns the file
    read, or None without one."""
    path = labels_file(run_dir)
    if not path.is_file():
        return None
    table = read_labels(path)
    details = table.frame.set_index("question_id")
    for row in rows:
        if row.question_id not in table.labels:
            continue
        entry = details.loc[row.question_id]
        row.label = Label(
            table.labels[row.question_id], str(entry.get("method", "")), str(entry.get("reason", "")),
            str(entry.get("answer_type", "") or row.rule.answer_type),
        )  # fmt: skip
    return str(path)


def read_rows(run_dir: str | Path) -> list[Row]:
    """The run's rows with their rule labels; refuses a run without answers."""
    path = features_file(run_dir)
    texts = read_row_texts(path)  # a damaged file is named, with what to do
    strings, meta = texts.columns, texts.meta
    generated = texts.attrs.get("generated", True)
    if not bool(generated) or not any(answer.strip() for answer in strings["answer"]):
        why = "was extracted with --no-generate" if not bool(generated) else "has only empty answers"
        raise ReviewError(
            f"{path} {why}: there are no answers to review. Extract again without --no-generate "
            "(halp extract ... --max-new-tokens N) to review what the model says."
        )
    rows = []
    for index, qid in enumerate(strings["question_id"]):
        question, truth, answer = strings["question"][index], strings["ground_truth"][index], strings["answer"][index]
        rows.append(
            Row(
                index, qid, strings["image_id"][index], question, truth, answer,
                {column: values[index] for column, values in meta.items()}, label_answer(question, truth, answer),
            )
        )  # fmt: skip
    return rows


# ----- risk ------------------------------------------------------------------------------------------------------
def attach_risk(run_dir: str | Path, rows: Sequence[Row]) -> list[str]:
    """Give rows the probe's risk where the run has one; returns a description of each source used.

    In order of preference: the out-of-fold score of the best probe (`halp probe`'s predictions.csv: the
    probe that scored a row never saw its label); for rows that had no label when the probes were trained
    with k-fold CV, the final probe's score (it never saw them either); then `halp predict`'s risk/*.csv.
    """
    run_dir = Path(run_dir)
    by_id = {row.question_id: row for row in rows}
    used: list[str] = []
    predictions = probe_file(run_dir, PREDICTIONS_FILE)
    if predictions.is_file():
        from halp.predict import choose_probe  # imports torch: only where the run has probes

        try:
            chosen: tuple[str, str] | None = choose_probe(run_dir)
        except ScorerError as err:  # probes/ without a usable results.csv: the page says so and shows no risk
            chosen = None
            used.append(f"no probe risk: {err}")
        if chosen is not None:
            feature, probe = chosen
            frame = read_predictions(predictions)
            frame = frame[(frame["feature"] == feature) & (frame["probe"] == probe)]
            source = f"out-of-fold score of the {probe} probe on {feature}"
            for qid, score in zip(frame["question_id"], frame["score"], strict=True):
                if qid in by_id and not math.isnan(score):
                    by_id[qid].risk, by_id[qid].risk_source = float(score), source
            used.append(source)
            final = _final_probe_risk(run_dir, rows, feature, probe, set(frame["question_id"]))
            if final:
                used.append(final)
    risk_dir = run_dir / RISK_DIR
    for table in sorted(risk_dir.glob("*.csv")) if risk_dir.is_dir() else []:
        frame = pd.read_csv(table, dtype={"question_id": str})
        if not {"question_id", "risk"} <= set(frame.columns):
            continue
        source = f"halp predict ({RISK_DIR}/{table.name})"
        found = False
        for qid, risk in zip(frame["question_id"], pd.to_numeric(frame["risk"], errors="coerce"), strict=True):
            row = by_id.get(qid)
            if row is not None and row.risk is None and not math.isnan(risk):
                row.risk, row.risk_source, found = float(risk), source, True
        if found:
            used.append(source)
    return used


def _final_probe_risk(run_dir: Path, rows: Sequence[Row], feature: str, probe: str, scored: set[str]) -> str | None:
    """Score the rows the probes were not trained on with the final probe, when that set is known (k-fold CV)."""
    from halp.probe import load_probe, probe_stem  # imports torch: only where the run has probes

    settings = read_settings(probe_file(run_dir, RESULTS_JSON_FILE))
    # With a single split only the test rows are in predictions.csv; the training rows are absent yet the
    # final probe saw them, so "absent" would not mean "unseen".
    if settings.get("split") is not None or "validation" not in settings:
        return None
    stem = probe_stem(run_dir, feature, probe)
    if not stem.with_name(stem.name + ".safetensors").is_file():
        return None
    todo = [row for row in rows if row.question_id not in scored and row.risk is None]
    if not todo:
        return None
    fitted, _ = load_probe(stem)
    with open_run_file(features_file(run_dir)) as handle:
        if feature not in handle:
            return None
        matrix = np.asarray(handle[feature][[row.index for row in todo]])
    scores = fitted.predict_proba(matrix)[:, 1]
    source = f"final {probe} probe on {feature} (row was unlabelled when it was trained)"
    for row, score in zip(todo, scores, strict=True):
        row.risk, row.risk_source = float(score), source
    return source


# ----- the session -----------------------------------------------------------------------------------------------
class ReviewSession:
    """One run under review: rows, the decisions log, queues and progress."""

    def __init__(self, run_dir: str | Path, images_dir: str | Path, reviewer: str) -> None:
        self.run_dir = Path(run_dir)
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise ReviewError(f"images={self.images_dir} is not a directory")
        self.reviewer = check_reviewer(reviewer)
        self.rows = read_rows(self.run_dir)
        self.labels_source = attach_labels(self.run_dir, self.rows)
        self.risk_sources = attach_risk(self.run_dir, self.rows)
        self.index_of = {row.question_id: row.index for row in self.rows}
        self.log = ReviewLog.of_run(self.run_dir)
        writable = self.log.path if self.log.path.exists() else self.run_dir
        if not os.access(writable, os.W_OK):  # say so now, not at the first key press
            raise ReviewError(f"{writable} is not writable: decisions could not be saved to {self.log.path}")
        self._queues: dict[tuple, tuple[int, ...]] = {}

    # --- what can be filtered
    @functools.cache  # noqa: B019  (one session per server: the cache lives as long as it does)
    def filter_values(self, limit: int = 200) -> dict[str, list[str]]:
        """Columns a queue can be narrowed by, with their values (columns with more than `limit` are left out)."""
        columns: dict[str, list[str]] = {ANSWER_TYPE: sorted({row.rule.answer_type for row in self.rows})}
        for column in self.rows[0].meta if self.rows else []:
            values = sorted({row.meta[column] for row in self.rows})
            if len(values) <= limit:
                columns[column] = values
        return columns

    def starting_queue(self) -> str:
        """The queue a review opens on when none is asked for: the rows without a label, or, on a run where every row
        has one (halp world's exact labels), the rows whose label the rules or the probe's risk doubt."""
        return "doubtful" if not self.queue("unknown") and self.queue("doubtful") else "unknown"

    def queue(self, name: str = "unknown", where: str | Mapping[str, str] | None = None, order: str = "table"
              ) -> list[int]:
        """Row indices of a queue, filtered by column values, in table or risk order."""
        filters = queue_filters(name, where, order, [ANSWER_TYPE, *(self.rows[0].meta if self.rows else [])])
        key = (name, tuple(sorted(filters.items())), order)
        if key in self._queues:  # every queue but `disagree` depends on the run alone
            return list(self._queues[key])
        disputed = self.log.refresh().disputed() if name == "disagree" else set()
        chosen = select_queue(self.rows, name, filters, order, disputed)
        if name != "disagree":
            self._queues[key] = tuple(chosen)
        return chosen

    def progress(self, indices: Sequence[int], reviewer: str) -> dict[str, Any]:
        """Done / total of a queue for a reviewer, their pace (decisions per minute) and the time left."""
        return queue_progress(self.log.refresh(), self.index_of, indices, reviewer)

    def reviewed(self, indices: Sequence[int], reviewer: str) -> list[bool]:
        mine = self.log.refresh().reviewed_by(check_reviewer(reviewer))
        return [self.rows[i].question_id in mine for i in indices]

    def row(self, index: int) -> Row:
        if not 0 <= index < len(self.rows):
            raise ReviewError(f"row {index} is not in the run ({len(self.rows)} rows)")
        return self.rows[index]

    def image(self, index: int) -> tuple[Path | None, str, str]:
        """(path to serve or None, status ok/missing/outside, the path or reason to show)."""
        row = self.row(index)
        try:
            path = resolve_image_path(self.images_dir, row.image_id)
        except ImageError as err:
            return None, "outside", str(err)
        if not path.is_file():
            return None, "missing", str(path)
        return path, "ok", str(path)

    def item(self, index: int, reviewer: str) -> dict[str, Any]:
        """Everything the page shows about one row (plain strings; the page escapes them)."""
        row = self.row(index)
        state = self.log.refresh()
        _, status, shown = self.image(index)
        mine = state.current(check_reviewer(reviewer), row.question_id)
        others = [
            {"reviewer": d.reviewer, "label": d.label, "time": d.time}
            for _, d in state.verdicts(row.question_id)
            if d.reviewer != reviewer
        ]
        return {
            "index": row.index,
            "question_id": row.question_id,
            "image_id": row.image_id,
            "image": {"url": f"image/{row.index}", "status": status, "path": shown},
            "question": row.question,
            "ground_truth": row.ground_truth,
            "answer": row.answer,
            "meta": row.meta,
            "rule": {
                "label": LABEL_WORDS[row.rule.label],
                "method": row.rule.method,
                "reason": row.rule.reason,
                "answer_type": row.rule.answer_type,
            },
            "label": None if row.label is None else {
                "label": LABEL_WORDS[row.label.label],
                "method": row.label.method,
                "origin": label_origin(row.label),
                "reason": row.label.reason,
            },
            "doubts": row.doubts(),
            "risk": row.risk,
            "risk_source": row.risk_source,
            "mine": mine,
            "others": others,
        }

    def decide(self, index: int, label: str | None, reviewer: str) -> Decision:
        if label is not None and label not in VERDICTS:
            raise ReviewError(f"label {label!r} is not one of {', '.join(VERDICTS)}")
        return self.log.decide(self.row(index).question_id, label, reviewer)

    def undo(self, decision_id: str, reviewer: str) -> Decision:
        return self.log.undo(decision_id, reviewer)
