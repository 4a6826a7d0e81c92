"""Labels: was each stored answer a hallucination (1), not (0), or can't we tell (unknown)?

Three sources, in this order of trust:

* manual labels imported from a table (`--labels FILE`), e.g. HALP's `is_hallucinating_manual` CSV;
* conservative rules on (question, ground truth, answer) for yes/no, number, multiple-choice and
  short answers; any doubt gives `unknown` with the reason, never a guess;
* optionally, a local text model asked a fixed rubric (`--judge MODEL`) for the rows the rules leave
  unknown. Its reply must start with one of the rubric's verdict words; anything else stays unknown
  with the raw reply kept in `reason`.

`RUN_DIR/labels.csv` has the columns `question_id,label,method,reason,answer_type`; `label` is 1, 0
or empty.

This module is the orchestration (`label_run`: read the run, apply manual labels, the rules, the judge and the
reviews, write labels.csv), the judge and the one reader of label tables (`read_labels`). The rules themselves are
in `halp.label_rules`, the source-aware ones in `halp.sources.labels`, the reviews' merge in `halp.review.decisions`.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from halp.data import read_frame
from halp.errors import LabelError

# Every public name of the rules stays importable from here, as before they moved to halp.label_rules.
from halp.label_rules import (  # noqa: F401
    ANSWER_TYPES,
    SHORT_MAX_WORDS,
    Label,
    infer_answer_type,
    label_answer,
    normalize,
    numbers_in,
    parse_number,
    question_options,
    yes_no,
)
from halp.layout import LABELS_FILE, atomic_write, features_file
from halp.review.decisions import ReviewSummary, apply_reviews, check_resolve
from halp.review.label_studio import is_export
from halp.rows import read_row_texts
from halp.sources.labels import source_rules

LABEL_COLUMNS = ("question_id", "label", "method", "reason", "answer_type")
#: Label columns tried, in order, when none is named (HALP's manual-review CSVs use the second).
DEFAULT_LABEL_COLUMNS = ("label", "is_hallucinating_manual")


# ----- the judge ------------------------------------------------------------------------------
JUDGE_RUBRIC = (
    "You check answers to questions about images. You cannot see the image: compare the model's answer "
    "with the reference answer only.\n"
    "Question: {question}\n"
    "Reference answer: {ground_truth}\n"
    "Model answer: {answer}\n"
    "If the model answer states something that contradicts the reference answer or that the reference "
    "does not support, the verdict is HALLUCINATED. If it agrees with the reference, the verdict is CORRECT. "
    "If you cannot decide, the verdict is UNSURE.\n"
    "Reply with one word: HALLUCINATED, CORRECT or UNSURE.\n"
    "Verdict:"
)
_VERDICTS = {"HALLUCINATED": 1, "CORRECT": 0, "UNSURE": None}
_VERDICT_RE = re.compile(r"^[\s\"'*`(\[]*(HALLUCINATED|CORRECT|UNSURE)(?![A-Za-z])", re.IGNORECASE)


def parse_verdict(reply: str) -> tuple[int | None, bool]:
    """(label, understood): the verdict word the reply starts with; (None, False) when there is none."""
    match = _VERDICT_RE.match(reply)
    if not match:
        return None, False
    return _VERDICTS[match.group(1).upper()], True


class Judge:
    """A local causal LM asked the fixed rubric, greedy, for each row the rules leave unknown."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, model_id: str, trust_remote_code: bool = False, device: str = "auto") -> Judge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from halp.loading import resolve_device

        device = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code).to(device)
        model.eval()
        return cls(model, tokenizer, model_id)

    def prompt(self, question: str, ground_truth: str, answer: str) -> str:
        text = JUDGE_RUBRIC.format(question=question, ground_truth=ground_truth, answer=answer)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    def reply(self, question: str, ground_truth: str, answer: str) -> str:
        import torch

        encoded = self.tokenizer(self.prompt(question, ground_truth, answer), return_tensors="pt")
        device = next(self.model.parameters()).device
        encoded = {key: value.to(device) for key, value in encoded.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **encoded, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad
            )
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def __call__(self, question: str, ground_truth: str, answer: str, answer_type: str) -> Label:
        raw = self.reply(question, ground_truth, answer)
        verdict, understood = parse_verdict(raw)
        method = f"judge:{self.name}"
        if not understood:
            return Label(None, method, f"judge reply not understood: {raw!r}", answer_type)
        if verdict is None:
            return Label(None, method, f"judge unsure: {raw!r}", answer_type)
        return Label(verdict, method, f"judge says {'HALLUCINATED' if verdict else 'CORRECT'}: {raw!r}", answer_type)


# ----- manual labels --------------------------------------------------------------------------
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}
_MISSING = {"", "nan", "none", "null", "na", "n/a", "unknown", "?"}


def parse_label_value(value: object) -> int | None:
    """1/0 from the usual spellings (True, 'true', 1, '1.0', 'yes'); None for empty/NaN/'unknown'.

    Unlike the seeds (where `bool(nan)` made a missing review count as hallucinated), a missing
    value stays unknown; an unrecognized one raises.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    if text in _MISSING:
        return None
    raise LabelError(f"label value {value!r} is not one of 1/0, true/false, yes/no, or empty")


def resolve_label_column(columns: Sequence[str], requested: str | None, source: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise LabelError(f"{source} has no column {requested!r}; columns: {', '.join(columns)}")
        return requested
    for candidate in DEFAULT_LABEL_COLUMNS:
        if candidate in columns:
            return candidate
    raise LabelError(
        f"{source} has none of the label columns {', '.join(DEFAULT_LABEL_COLUMNS)}; name one with "
        f"label_column= (columns: {', '.join(columns)})"
    )


@dataclass
class LabelTable:
    """A label table read by `read_labels`: question_id -> 1/0/None, where it came from, and the table itself."""

    labels: dict[str, int | None]
    column: str
    source: str
    #: One row per question_id (the first of agreeing repeats), question_id as str: for --group-by columns.
    frame: pd.DataFrame


def read_labels(table: str | Path | pd.DataFrame, label_column: str | None = None) -> LabelTable:
    """The one reader of label tables (halp label --labels, halp probe --labels, RUN_DIR/labels.csv).

    Any table with a question_id column and a 0/1 column (DEFAULT_LABEL_COLUMNS, or `label_column`). A
    question_id may repeat when its labels agree (reviews exported once per reviewer); conflicting repeats and
    unreadable values are refused, naming the rows.
    """
    if isinstance(table, pd.DataFrame):
        frame, source = table.copy(), "DataFrame"
    else:
        frame, source = read_frame(table), str(table)
    frame.columns = [str(column) for column in frame.columns]
    if "question_id" not in frame.columns:
        raise LabelError(f"{source} has no question_id column; columns: {', '.join(frame.columns)}")
    column = resolve_label_column(list(frame.columns), label_column, source)
    frame["question_id"] = frame["question_id"].astype(str)
    labels: dict[str, int | None] = {}
    bad: list[str] = []
    for key, value in zip(frame["question_id"], frame[column], strict=True):
        try:
            parsed = parse_label_value(value)
        except LabelError:
            bad.append(f"{key}={value!r}")
            continue
        if key in labels and labels[key] != parsed:
            raise LabelError(f"{source}: question_id {key} has conflicting labels in column {column!r}")
        labels[key] = parsed
    if bad:
        raise LabelError(f"{source}: unreadable values in column {column!r} ({len(bad)}), e.g. {', '.join(bad[:5])}")
    frame = frame.drop_duplicates(subset="question_id", keep="first").reset_index(drop=True)
    return LabelTable(labels, column, source, frame)


def read_label_table(path: str | Path, label_column: str | None = None) -> tuple[dict[str, int | None], str]:
    """question_id -> 1/0/None and the column used (see `read_labels`)."""
    table = read_labels(path, label_column)
    return table.labels, table.column


# ----- a run ----------------------------------------------------------------------------------
@dataclass
class LabelSummary:
    path: Path
    total: int
    counts: Counter  # (answer_type, label) -> n
    methods: Counter
    label_column: str | None = None
    unmatched_manual: int = 0
    reviews: ReviewSummary | None = None  # when manual decisions were merged

    @property
    def labelled(self) -> int:
        return sum(n for (_, label), n in self.counts.items() if label is not None)

    @property
    def positives(self) -> int:
        return sum(n for (_, label), n in self.counts.items() if label == 1)


def write_labels(path: Path, question_ids: Sequence[str], labels: Sequence[Label]) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        for qid, item in zip(question_ids, labels, strict=True):
            writer.writerow([qid, "" if item.label is None else item.label, item.method, item.reason, item.answer_type])


def label_run(
    run_dir: str | Path,
    labels: str | Path | None = None,
    label_column: str | None = None,
    judge: Judge | Callable[[str, str, str, str], Label] | None = None,
    resolve: str = "none",
) -> LabelSummary:
    """Label every sample of a run and write RUN_DIR/labels.csv.

    With `labels`, the manual labels of that table are used as they are (rows it lacks are unknown);
    otherwise the rules run, then `judge` (if given) on the rows they leave unknown. Decisions of
    `halp review` (RUN_DIR/reviews.jsonl) and of a Label Studio export given as `labels` then take
    precedence (see halp.review.decisions.merge_decisions; `resolve` settles reviewers' conflicts).
    """
    check_resolve(resolve)
    run_dir = Path(run_dir)
    # A damaged features.h5 is named, with what to do.
    rows = read_row_texts(features_file(run_dir), ("question_id", "question", "ground_truth", "answer")).columns
    ids = rows["question_id"]
    results: list[Label] = []
    used_column = None
    unmatched = 0
    studio = labels is not None and is_export(labels)
    if studio:
        results = [Label(None, "none", f"not annotated in {Path(labels).name}", infer_answer_type(q, t))
                   for q, t in zip(rows["question"], rows["ground_truth"], strict=True)]  # fmt: skip
    elif labels is not None:
        manual, used_column = read_label_table(labels, label_column)
        unmatched = len(set(manual) - set(ids))
        source = f"{Path(labels).name}:{used_column}"
        for qid, question, truth in zip(ids, rows["question"], rows["ground_truth"], strict=True):
            answer_type = infer_answer_type(question, truth)
            if qid not in manual:
                results.append(Label(None, "manual", f"not in {source}", answer_type))
            elif manual[qid] is None:
                results.append(Label(None, "manual", f"empty in {source}", answer_type))
            else:
                results.append(Label(manual[qid], "manual", f"from {source}", answer_type))
    else:
        by_source = source_rules(run_dir)  # tables from `halp data convert`: rules that know each source's answers
        for index, (question, truth, answer) in enumerate(
            zip(rows["question"], rows["ground_truth"], rows["answer"], strict=True)
        ):
            item = (by_source(index, question, truth, answer) if by_source else None) or label_answer(
                question, truth, answer
            )
            if item.label is None and judge is not None and truth.strip() and answer.strip():
                item = judge(question, truth, answer, item.answer_type)
            results.append(item)
    results, reviews = apply_reviews(run_dir, ids, results, resolve, labels if studio else None)
    path = run_dir / LABELS_FILE
    write_labels(path, ids, results)
    counts = Counter((item.answer_type, item.label) for item in results)
    methods = Counter(item.method.split(":")[0] if item.method.startswith("judge") else item.method for item in results)
    return LabelSummary(path, len(results), counts, methods, used_column, unmatched, reviews)
