"""Label rules that know the sources' answer forms (used by `halp label` when the run has a `dataset` column).

A converted table (halp.sources) carries `dataset`, `answer_format`, `references` and `extra` columns; extraction
stores them in features.h5 (meta). For each row:

- yes/no sources (POPE, MME, HallusionBench, AMBER discriminative): the generic yes/no rule;
- MathVista multiple choice (ground truth a letter, options folded into the question): the generic choice rule;
  numbers: the stated number, rounded to the problem's `precision` decimals as MathVista's scorer rounds, against
  the ground truth; a unit after the number is allowed, another number is not;
- HaloQuest (several open references): an answer equal to a reference, or containing a short one, is correct;
  for false-premise and insufficient-context questions (every reference denies or declines), an answer that
  neither negates nor hedges accepts the premise: hallucinated. Anything else stays unknown;
- AMBER generative (describe the image): an answer naming an object AMBER annotates as absent
  (`hallucinated_objects`), in a sentence without negation, is hallucinated; otherwise unknown (absence of
  hallucination cannot be shown without AMBER's full vocabulary and synonym model).

Rows of other tables, and forms these rules do not cover, fall back to halp.label_rules' generic rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from halp.label_rules import HEDGES, NEGATIONS, Label, label_answer, normalize, numbers_in
from halp.layout import features_file
from halp.rows import read_row_texts

SourceRule = Callable[[int, str, str, str], "Label | None"]
META_COLUMNS = ("dataset", "answer_format", "references", "extra", "category")


def _json(text: str, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except json.JSONDecodeError:
        return default


def label_source_row(
    dataset: str, answer_format: str, question: str, truth: str, answer: str, references: list[str],
    extra: dict[str, Any], category: str = "",
) -> Label | None:
    """The label of one row by its source's rule, or None to use the generic rules."""
    if not answer.strip():
        return None
    if dataset == "mathvista" and answer_format == "number" and truth.strip():
        return _mathvista_number(truth, answer, extra)
    if dataset == "haloquest":
        return _haloquest(question, answer, references, category)
    if dataset == "amber" and answer_format == "objects":
        return _amber_generative(answer, references, extra.get("hallucinated_objects", []))
    return None


def _mathvista_number(truth: str, answer: str, extra: dict[str, Any]) -> Label:
    precision = extra.get("precision")
    try:
        expected = float(truth)
    except ValueError:
        return Label(None, "rule:mathvista", f"ground truth {truth!r} is not a number", "number")
    values = sorted(set(numbers_in(answer)))
    if HEDGES.search(answer.lower()):
        return Label(None, "rule:mathvista", f"answer hedges or declines: {answer[:80]!r}", "number")
    if len(values) != 1:
        what = "no number" if not values else f"several numbers ({', '.join(f'{v:g}' for v in values)})"
        return Label(None, "rule:mathvista", f"answer states {what}", "number")
    stated = values[0]
    if precision is not None:
        stated = round(stated, int(precision))
        expected = round(expected, int(precision))
    verdict = 0 if math.isclose(stated, expected, rel_tol=0, abs_tol=1e-9) else 1
    unit = f" {extra['unit']}" if extra.get("unit") else ""
    digits = f" (rounded to {precision} decimals)" if precision is not None else ""
    return Label(verdict, "rule:mathvista", f"answer says {stated:g}{unit}, ground truth {expected:g}{unit}{digits}",
                 "number")


_DECLINES = re.compile(r"\b(not visible|cannot|can't|can not|unable|impossible|no way to|unclear|not possible)\b")


def _haloquest(question: str, answer: str, references: list[str], category: str) -> Label:
    said = normalize(answer)
    refs = [normalize(ref) for ref in references if ref.strip()]
    if not refs:
        return Label(None, "rule:haloquest", "no reference answers", "open")
    for ref in refs:
        if said == ref or (len(ref.split()) <= 3 and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", said)
                           and not NEGATIONS.search(said)):
            return Label(0, "rule:haloquest", f"answer matches the reference {ref!r}", "open")
    premise_kind = category.lower() in {"false premises", "false premise", "insufficient context"}
    denying = all(NEGATIONS.search(ref) or _DECLINES.search(ref) for ref in refs)
    if premise_kind and denying:
        if not NEGATIONS.search(said) and not HEDGES.search(said) and not _DECLINES.search(said):
            return Label(1, "rule:haloquest",
                         f"every reference denies or declines ({category}); the answer asserts: {answer[:80]!r}",
                         "open")
        return Label(None, "rule:haloquest", "answer negates or declines, as the references do: check the content",
                     "open")
    return Label(None, "rule:haloquest", "open answer that matches no reference (use --judge or manual labels)",
                 "open")


def _amber_generative(answer: str, present: list[str], absent: list[str]) -> Label:
    present_words = {normalize(item) for item in present}
    for sentence in re.split(r"(?<=[.!?;])\s+", answer):
        said = normalize(sentence)
        for item in absent:
            name = normalize(item)
            if not name or name in present_words:
                continue
            if re.search(rf"(?<!\w){re.escape(name)}(?:s|es)?(?!\w)", said):
                if NEGATIONS.search(said) or HEDGES.search(said):
                    return Label(None, "rule:amber", f"names {name!r} (annotated absent) in a negated or hedged "
                                 f"sentence: {sentence[:80]!r}", "open")
                return Label(1, "rule:amber", f"names {name!r}, which AMBER annotates as absent from the image",
                             "open")
    return Label(None, "rule:amber", "names no object annotated as absent; other objects cannot be checked", "open")


def source_rules(run_dir: str | Path) -> Callable[[int, str, str, str], Label | None] | None:
    """A per-row rule for a run whose table came from halp.sources (it has a `dataset` meta column), else None.

    The returned function takes (row index, question, ground truth, answer) and returns a Label, or None where
    the generic rules apply."""
    # A damaged file is named, with what to do.
    meta = read_row_texts(features_file(Path(run_dir)), columns=(), meta=META_COLUMNS).meta
    if "dataset" not in meta:
        return None
    columns = {name: meta.get(name) for name in META_COLUMNS}

    def rule(index: int, question: str, truth: str, answer: str) -> Label | None:
        def value(name: str) -> str:
            column = columns[name]
            return column[index] if column is not None else ""

        return label_source_row(
            value("dataset"), value("answer_format"), question, truth, answer,
            _json(value("references"), []), _json(value("extra"), {}), value("category"),
        )

    return rule


def label_with_sources(dataset: str, answer_format: str, question: str, truth: str, answer: str,
                       references: list[str], extra: dict[str, Any], category: str = "") -> Label:
    """The label `halp label` gives one row: the source's rule, else the generic rules."""
    item = label_source_row(dataset, answer_format, question, truth, answer, references, extra, category)
    return item if item is not None else label_answer(question, truth, answer)
