"""The label rules: whether one answer is a hallucination, judged from (question, ground truth, answer) alone.

Conservative rules for yes/no, number, multiple-choice and short answers (`label_answer`); any doubt gives
`unknown` (label None) with the reason, never a guess. The normalization, number reading and the vocabulary of
hedges and negations are public here because the source-aware rules (`halp.sources.labels`) share them.

Nothing here reads or writes a file: `halp.label.label_run` applies these rules to a run (with manual labels,
reviews and a judge) and writes labels.csv.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ANSWER_TYPES = ("yesno", "number", "choice", "short", "open")
#: A short answer has at most this many words after normalization; longer ones are open-ended.
SHORT_MAX_WORDS = 3


@dataclass(frozen=True)
class Label:
    """One answer's label, how it was reached and why."""

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
#: Phrases that mean the model declined or hedged: not a claim about the image either way.
HEDGES = re.compile(
    r"\b(maybe|perhaps|possibly|unclear|uncertain|not sure|unsure|can ?not (?:be )?(?:tell|determine|see|say)|"
    r"can't (?:tell|determine|see|say)|unable to|impossible to (?:tell|determine|say)|hard to (?:tell|say)|"
    r"difficult to (?:tell|say|determine)|it depends|i don't know|i do not know)\b"
)
#: Words that negate what a sentence says (a short answer naming the ground truth with one of them is in doubt).
NEGATIONS = re.compile(r"\b(no|not|never|none|neither|nor|without|isn't|aren't|doesn't|don't|n't)\b")
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
        if NEGATIONS.search(said):
            return None, f"answer contains {expected!r} but also a negation: {answer[:80]!r}"
        if others:
            return None, f"answer names both {expected!r} and {others[0]!r}"
        extra_colours = _colours(said) - _colours(expected)
        if _colours(expected) and extra_colours:
            return None, f"answer names {expected!r} and other colours too ({', '.join(sorted(extra_colours))})"
        return 0, f"answer contains ground truth {expected!r}"
    if NEGATIONS.search(said):
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
    if HEDGES.search(answer.lower()):
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
