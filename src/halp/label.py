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

from halp.errors import LabelError
from halp.layout import LABELS_FILE, atomic_write
from halp.rows import open_run_file
from halp.store import read_strings

LABEL_COLUMNS = ("question_id", "label", "method", "reason", "answer_type")
ANSWER_TYPES = ("yesno", "number", "choice", "short", "open")
#: Label columns tried, in order, when none is named (HALP's manual-review CSVs use the second).
DEFAULT_LABEL_COLUMNS = ("label", "is_hallucinating_manual")
#: A short answer has at most this many words after normalization; longer ones are open-ended.
SHORT_MAX_WORDS = 3


@dataclass(frozen=True)
class Label:
    label: int | None  # 1 hallucinated, 0 not, None unknown
    method: str
    reason: str
    answer_type: str


# ----- normalization ------------------------------------------------------------------------
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "hundred": 100,
}  # fmt: skip
_YES = {"yes", "yeah", "yep", "true"}
_NO = {"no", "nope", "false"}
# Openings whose first word is not the answer's polarity ("No doubt, there is a beach" means yes).
_IDIOMS = re.compile(r"^\W*(no (doubt|question|wonder|matter)|not (only|just))\b")
# Phrases that mean the model declined or hedged: not a claim about the image either way.
_HEDGES = re.compile(
    r"\b(maybe|perhaps|possibly|unclear|uncertain|not sure|unsure|can ?not (?:be )?(?:tell|determine|see|say)|"
    r"can't (?:tell|determine|see|say)|unable to|impossible to (?:tell|determine|say)|hard to (?:tell|say)|"
    r"difficult to (?:tell|say|determine)|it depends|i don't know|i do not know)\b"
)
_NEGATIONS = re.compile(r"\b(no|not|never|none|neither|nor|without|isn't|aren't|doesn't|don't|n't)\b")
_NUMBER_TOKEN = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words to digits (VQA-style)."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s'.-]", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points only
    words = []
    for word in text.split():
        word = word.strip("'-")
        if not word or word in _ARTICLES:
            continue
        words.append(str(_NUMBER_WORDS[word]) if word in _NUMBER_WORDS else word)
    return " ".join(words)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def parse_number(text: str) -> float | None:
    """The number a whole ground-truth string states (`3`, `3.0`, `three`, `1,000`), else None."""
    stripped = text.strip().lower().rstrip(".")
    if stripped in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[stripped])
    if re.fullmatch(r"-?\d+(?:,\d{3})*(?:\.\d+)?", stripped):
        return float(stripped.replace(",", ""))
    return None


def numbers_in(text: str) -> list[float]:
    """Every number an answer states, as digits or number words, in order."""
    found: list[tuple[int, float]] = [
        (match.start(), float(match.group().replace(",", ""))) for match in _NUMBER_TOKEN.finditer(text)
    ]
    for match in re.finditer(r"[a-z]+", text.lower()):
        if match.group() in _NUMBER_WORDS:
            found.append((match.start(), float(_NUMBER_WORDS[match.group()])))
    return [value for _, value in sorted(found)]


def yes_no(text: str) -> str | None:
    """`yes`/`no` if the text is a bare polarity word, else None."""
    word = normalize(text)
    if word in _YES:
        return "yes"
    if word in _NO:
        return "no"
    return None


_CHOICE_GT = re.compile(r"^\(?([A-Ha-h])\)?[.):]?$")
# Options written "A. red", "(B) blue", "C: green", "D) yellow" in the question.
_OPTION = re.compile(r"(?:^|[\s\n(])\(?([A-H])[.):]\s*(.+?)(?=\s*(?:[\s\n(]\(?[A-H][.):]\s)|$)", re.DOTALL)


def question_options(question: str) -> dict[str, str]:
    """Letter -> option text for multiple-choice questions (at least two lettered options), else {}."""
    options = {letter: text.strip() for letter, text in _OPTION.findall(question)}
    letters = sorted(options)
    # Only consecutive letters from A count as options; "Vitamin C." in a sentence does not.
    if len(letters) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return {}
    return options


def _alternatives(question: str) -> list[str]:
    """The offered alternatives of an "X or Y?" question, normalized, else []."""
    match = re.search(r"([\w' -]+?)\s+or\s+([\w' -]+?)\s*\?\s*$", question.strip().lower())
    if not match:
        return []
    left = match.group(1).split(",")[-1]
    # "Is the statue on water or a platform" -> "water", "platform": the left side's last words,
    # as many as the right side has, so the verb and subject are not part of the alternative.
    right = normalize(match.group(2))
    left_words = normalize(left).split()
    size = max(1, len(right.split()))
    alternatives = [" ".join(left_words[-size:]), right]
    return alternatives if all(alternatives) and alternatives[0] != alternatives[1] else []


# Basic colour terms: a closed class, so a short answer naming another one is a real disagreement.
_COLOURS = {
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "silver", "gold", "beige",
}  # fmt: skip


def _colours(normalized: str) -> set[str]:
    return {"gray" if word == "grey" else word for word in normalized.split() if word in _COLOURS}


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


def infer_answer_type(question: str, ground_truth: str) -> str:
    """yesno, number, choice, short or open, from the ground truth (and the question's options)."""
    truth = ground_truth.strip()
    if not truth:
        return "open"
    if yes_no(truth):
        return "yesno"
    if _CHOICE_GT.match(truth) and question_options(question):
        return "choice"
    if parse_number(truth) is not None:
        return "number"
    if len(normalize(truth).split()) <= SHORT_MAX_WORDS and not re.match(
        r"\s*(describe|explain|why|what is happening|tell me)", question.lower()
    ):
        return "short"
    return "open"


# ----- the rules ------------------------------------------------------------------------------
def _rule_yesno(truth: str, answer: str) -> tuple[int | None, str]:
    expected = yes_no(truth)
    words = _words(answer)
    first = words[0] if words else ""
    polarity = "yes" if first in _YES else "no" if first in _NO else None
    if polarity is None:
        return None, f"answer does not start with yes or no: {answer[:80]!r}"
    if _IDIOMS.match(answer.lower()):
        return None, f"answer opens with an idiom, not a polarity: {answer[:80]!r}"
    opposite = _NO if polarity == "yes" else _YES
    if any(word in opposite for word in words[1:3]) or re.match(r"\W*(yes|no)\W+(or|and)\W", answer.lower()):
        return None, f"answer gives both polarities: {answer[:80]!r}"
    if polarity == expected:
        return 0, f"answer says {polarity}, ground truth {expected}"
    return 1, f"answer says {polarity}, ground truth {expected}"


def _rule_number(truth: str, answer: str) -> tuple[int | None, str]:
    expected = parse_number(truth)
    assert expected is not None
    values = sorted(set(numbers_in(answer)))
    if not values:
        if normalize(answer) in {"none", "no", "0"}:
            values = [0.0]
        else:
            return None, f"answer states no number: {answer[:80]!r}"
    if len(values) > 1:
        shown = ", ".join(f"{value:g}" for value in values)
        return None, f"answer states several numbers ({shown})"
    stated = values[0]
    verdict = 0 if math.isclose(stated, expected) else 1
    return verdict, f"answer says {stated:g}, ground truth {expected:g}"


def _answer_letter(answer: str, options: dict[str, str]) -> str | None:
    text = answer.strip()
    patterns = (
        r"^\(?([A-H])\)?[.):,]?$",  # "B", "(B)", "B."
        r"^\(([A-H])\)",  # "(B) blue"
        r"^([A-H])[.):]\s",  # "B. blue", "B) blue"
        r"\b(?:answer|option|choice) (?:is )?\(?([A-H])\)?(?![\w])",  # "The answer is B"
    )
    # Several parenthesized letters ("(A) and (B)") name several options: no single choice.
    letters = set(re.findall(r"\(([A-H])\)", text))
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            letters.add(match.group(1))
    if not letters:
        normalized = normalize(text)
        letters = {letter for letter, option in options.items() if normalize(option) == normalized}
    return letters.pop() if len(letters) == 1 else None


def _rule_choice(question: str, truth: str, answer: str) -> tuple[int | None, str]:
    match = _CHOICE_GT.match(truth.strip())
    assert match is not None
    expected = match.group(1).upper()
    chosen = _answer_letter(answer, question_options(question))
    if chosen is None:
        return None, f"no single option letter or option text in the answer: {answer[:80]!r}"
    verdict = 0 if chosen == expected else 1
    return verdict, f"answer chooses {chosen}, ground truth {expected}"


def _rule_short(question: str, truth: str, answer: str) -> tuple[int | None, str]:
    expected = normalize(truth)
    said = normalize(answer)
    if said == expected:
        return 0, f"normalized answer equals ground truth {expected!r}"
    alternatives = _alternatives(question)
    others = [alt for alt in alternatives if alt != expected and _contains(said, alt)]
    if _contains(said, expected):
        if _NEGATIONS.search(said):
            return None, f"answer contains {expected!r} but also a negation: {answer[:80]!r}"
        if others:
            return None, f"answer names both {expected!r} and {others[0]!r}"
        extra_colours = _colours(said) - _colours(expected)
        if _colours(expected) and extra_colours:
            return None, f"answer names {expected!r} and other colours too ({', '.join(sorted(extra_colours))})"
        return 0, f"answer contains ground truth {expected!r}"
    if _NEGATIONS.search(said):
        return None, f"answer {said[:60]!r} does not contain {expected!r} and has a negation"
    if expected in alternatives and len(others) == 1:
        return 1, f"question offers {' or '.join(alternatives)}; answer picks {others[0]!r}, ground truth {expected!r}"
    expected_colours, said_colours = _colours(expected), _colours(said)
    if len(expected.split()) == 1 and len(expected_colours) == 1 and len(said_colours) == 1:
        colour = said_colours.pop()
        if {colour} == expected_colours:  # grey/gray
            return 0, f"answer names the colour {colour!r}, ground truth {expected!r}"
        return 1, f"answer names the colour {colour!r}, ground truth {expected!r}"
    return None, f"answer {said[:60]!r} does not contain {expected!r}; it may be a paraphrase"


def label_answer(question: str, ground_truth: str, answer: str) -> Label:
    """The rule-based label of one answer; unknown (label None) with a reason whenever unsure."""
    answer_type = infer_answer_type(question, ground_truth)
    if not ground_truth.strip():
        return Label(None, "none", "no ground truth", answer_type)
    if not answer.strip():
        return Label(None, "none", "empty answer (was the run extracted with --no-generate?)", answer_type)
    if answer_type == "open":
        return Label(None, "none", "open-ended answer: no rule applies (use --judge or manual labels)", answer_type)
    if _HEDGES.search(answer.lower()):
        return Label(None, f"rule:{answer_type}", f"answer hedges or declines: {answer[:80]!r}", answer_type)
    if answer_type == "yesno":
        verdict, reason = _rule_yesno(ground_truth, answer)
    elif answer_type == "number":
        verdict, reason = _rule_number(ground_truth, answer)
    elif answer_type == "choice":
        verdict, reason = _rule_choice(question, ground_truth, answer)
    else:
        verdict, reason = _rule_short(question, ground_truth, answer)
    return Label(verdict, f"rule:{answer_type}", reason, answer_type)


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
    from halp.data import read_frame

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
    reviews: Any = None  # halp.review.decisions.ReviewSummary when manual decisions were merged

    @property
    def labelled(self) -> int:
        return sum(n for (_, label), n in self.counts.items() if label is not None)

    @property
    def positives(self) -> int:
        return sum(n for (_, label), n in self.counts.items() if label == 1)


def _run_rows(run_dir: Path) -> dict[str, list[str]]:
    from halp.layout import features_file

    with open_run_file(features_file(run_dir)) as handle:  # a damaged file is named, with what to do
        return {name: read_strings(handle[name]) for name in ("question_id", "question", "ground_truth", "answer")}


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
    from halp.review import decisions, label_studio

    decisions.check_resolve(resolve)
    run_dir = Path(run_dir)
    rows = _run_rows(run_dir)
    ids = rows["question_id"]
    results: list[Label] = []
    used_column = None
    unmatched = 0
    studio = labels is not None and label_studio.is_export(labels)
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
        from halp.sources.labels import source_rules

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
    results, reviews = decisions.apply_reviews(run_dir, ids, results, resolve, labels if studio else None)
    path = run_dir / LABELS_FILE
    write_labels(path, ids, results)
    counts = Counter((item.answer_type, item.label) for item in results)
    methods = Counter(item.method.split(":")[0] if item.method.startswith("judge") else item.method for item in results)
    return LabelSummary(path, len(results), counts, methods, used_column, unmatched, reviews)
