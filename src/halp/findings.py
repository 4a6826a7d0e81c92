"""What a probe run found, said in words computed from its own numbers ("what this says").

From the probes' pooled out-of-fold scores (`probes/predictions.csv`): the best feature against the vision-only
state on the same rows (a paired bootstrap of the AUROC difference), and how each of the two does within every
value of a grouping column (difficulty, question type, a metadata column given to `halp probe --group-by`). The
sentences are chosen by the intervals, never fixed: when an interval says otherwise, the sentence says otherwise.

`halp world` and `halp report` both use `state_finding`; the CLI and the HTML page only render its sentences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from halp.features import split_feature

# The numbers are computed in halp.metrics; its names used here stay importable from here, as before.
from halp.metrics import (  # noqa: F401
    CHANCE,
    Paired,
    Score,
    feature_scores,
    group_aurocs,
    group_scores,
    paired_difference,
    score,
)
from halp.metrics import probe_label as label
from halp.results import best_result

#: The pre-fusion state the best feature is compared with (the HALP study's baseline).
BASELINE = "vision_only"
#: Groups named in a sentence before the rest are counted ("and 3 more").
LISTED_GROUPS = 5


# ----- the numbers -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Within:
    """One feature x probe pooled and within every value of one grouping column."""

    name: str  # "feature (probe)"
    column: str
    pooled: Score
    groups: dict[str, Score]


@dataclass
class Finding:
    """The numbers behind "what this says", and the sentences they give (`describe_finding`)."""

    best: str  # "feature (probe)"
    paired: Paired | None
    #: The best feature's AUROC on all its scored rows.
    pooled: Score
    within: list[Within] = field(default_factory=list)
    #: column -> group value -> share of wrong answers (label 1) among the scored rows.
    error_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    sentences: list[str] = field(default_factory=list)


def within_groups(
    predictions: pd.DataFrame, groups: pd.DataFrame, column: str, key: tuple[str, str], resamples: int, seed: int
) -> Within:
    """`key`'s AUROC pooled and within each value of `groups[column]` (groups: question_id and the column)."""
    rows = feature_scores(predictions, *key).join(groups.set_index("question_id")[[column]], how="inner")
    pooled = score(rows["label"].to_numpy(), rows["score"].to_numpy(), resamples, seed)
    return Within(label(*key), column, pooled, group_scores(rows, column, resamples, seed))


def _opponent(results: pd.DataFrame, best: tuple[str, str]) -> tuple[str, str] | None:
    """vision_only with the best's probe; when the best is vision_only, the best other representation's state."""
    same_probe = results[(results["probe"] == best[1])].dropna(subset=["auroc_mean"])
    if best[0] != BASELINE:
        return (BASELINE, best[1]) if BASELINE in set(same_probe["feature"]) else None
    others = same_probe[[split_feature(f)[0] != BASELINE for f in same_probe["feature"]]]
    if others.empty:
        return None
    return str(others.loc[others["auroc_mean"].idxmax(), "feature"]), best[1]


def state_finding(
    results: pd.DataFrame,
    predictions: pd.DataFrame | None,
    groups: pd.DataFrame | None = None,
    columns: Sequence[str] = (),
    resamples: int = 1000,
    seed: int = 42,
) -> Finding | None:
    """The finding of a probe run: best feature (by mean AUROC over folds) vs vision_only on the same rows, and
    both within every value of each of `columns` (read from `groups`: question_id and those columns).

    None when there is nothing to state (no AUROC, no out-of-fold predictions).
    """
    best_row = best_result(results)
    if best_row is None or predictions is None or predictions.empty:
        return None
    best = str(best_row["feature"]), str(best_row["probe"])
    opponent = _opponent(results, best)
    paired = paired_difference(predictions, best, opponent, resamples, seed) if opponent is not None else None
    within: list[Within] = []
    rates: dict[str, dict[str, float]] = {}
    if groups is not None:
        for column in columns:
            if column not in groups.columns:
                continue
            for key in [best, *([opponent] if opponent is not None else [])]:
                within.append(within_groups(predictions, groups, column, key, resamples, seed))
            first = within[-1]
            rates[column] = {value: item.wrong / item.n for value, item in first.groups.items() if item.n}
    best_rows = feature_scores(predictions, *best)
    pooled = score(best_rows["label"].to_numpy(), best_rows["score"].to_numpy(), resamples, seed)
    finding = Finding(label(*best), paired, pooled, within, rates)
    finding.sentences = describe_finding(finding)
    return finding


# ----- the words ---------------------------------------------------------------------------------------------------
def _f(value: float) -> str:
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{round(value, 3) + 0.0:+.3f}"  # + 0.0: a rounded -0.0 shows as +0.000


def _interval(low: float, high: float, signed: bool = False) -> str:
    if math.isnan(low) or math.isnan(high):
        return "no bootstrap interval"
    return f"95% interval {_signed(low)} to {_signed(high)}" if signed else f"95% interval {low:.3f} to {high:.3f}"


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:LISTED_GROUPS])
    return shown + (f" and {len(items) - LISTED_GROUPS} more" if len(items) > LISTED_GROUPS else "")


def _range(scores: Sequence[Score]) -> str:
    values = [item.auroc for item in scores]
    low, high = min(values), max(values)
    return f"AUROC {_f(low)}" if _f(low) == _f(high) else f"AUROC {_f(low)}-{_f(high)}"


def describe_paired(paired: Paired) -> str:
    """One sentence: which of the two predicts hallucinations better, as the paired interval says."""
    a, b = paired.first, paired.second
    on = f"on the same {paired.n} rows"
    if math.isnan(paired.low) or math.isnan(paired.high):
        return (
            f"{a} scores AUROC {_f(paired.first_auroc)} and {b} {_f(paired.second_auroc)} {on}, a difference of "
            f"{_signed(paired.difference)} with no bootstrap interval to say whether it is more than chance."
        )
    if paired.low > 0:
        return (
            f"{a} predicts hallucinations better than {b}: pooled out-of-fold AUROC "
            f"{_f(paired.first_auroc)} against {_f(paired.second_auroc)} {on}, a paired difference of "
            f"{_signed(paired.difference)} "
            f"({_interval(paired.low, paired.high, signed=True)})."
        )
    if paired.high < 0:
        return (
            f"{b} predicts hallucinations better than {a}: pooled out-of-fold AUROC "
            f"{_f(paired.second_auroc)} against {_f(paired.first_auroc)} {on}, a paired difference of "
            f"{_signed(-paired.difference)} "
            f"({_interval(-paired.high, -paired.low, signed=True)})."
        )
    return (
        f"{a} and {b} cannot be told apart {on}: pooled out-of-fold AUROC {_f(paired.first_auroc)} against "
        f"{_f(paired.second_auroc)}, "
        f"a paired difference of {_signed(paired.difference)} whose {_interval(paired.low, paired.high, signed=True)} "
        "includes 0."
    )


def describe_chance(name: str, pooled: Score) -> str | None:
    """A sentence only when the best feature itself is not above chance on the pooled rows."""
    verdict = pooled.versus_chance
    if verdict == "above":
        return None
    if verdict == "undefined":
        return f"{name} has no AUROC interval on the pooled rows (AUROC {_f(pooled.auroc)})."
    where = "below" if verdict == "below" else "not distinguishable from"
    return (
        f"{name} is {where} chance on the pooled rows (AUROC {_f(pooled.auroc)}, "
        f"{_interval(pooled.low, pooled.high)}): these features do not predict hallucinations here."
    )


def describe_within(within: Within, error_rates: dict[str, float] | None = None) -> str:
    """One sentence: where `within.name` is above chance among the values of its grouping column."""
    name, column = within.name, within.column
    defined = {value: item for value, item in within.groups.items() if item.versus_chance != "undefined"}
    undefined = [value for value in within.groups if value not in defined]
    tail = f" ({column} {_listed(undefined)}: one class only, no AUROC)" if undefined else ""
    if not defined:
        return f"{name} has no AUROC within any {column}: every group holds one class only."
    above = [value for value, item in defined.items() if item.versus_chance == "above"]
    not_above = [value for value in defined if value not in above]
    if not not_above:
        return (
            f"{name} stays above chance within every {column} ({_range(list(defined.values()))}, every 95% interval "
            f"above {CHANCE}){tail}."
        )
    if not above:
        all_at = all(item.versus_chance == "at" for item in defined.values())
        state = "at chance" if all_at else "at or below chance"
        intervals = "every 95% interval includes 0.5" if all_at else "no 95% interval above 0.5"
        sentence = f"{name} is {state} within every {column} ({_range(list(defined.values()))}, {intervals}){tail}"
        pooled = within.pooled
        if pooled.versus_chance != "above":
            interval = _interval(pooled.low, pooled.high)
            return f"{sentence}, and on all rows pooled too (AUROC {_f(pooled.auroc)}, {interval})."
        highest = max(item.auroc for item in defined.values())
        if highest >= pooled.low:
            # A group's own AUROC reaches the pooled interval: its rows are too few to say the signal is gone there.
            return (
                f"{sentence}, although it reaches {_f(pooled.auroc)} pooled ({_interval(pooled.low, pooled.high)}); "
                f"the groups are too small to tell whether that signal holds within them (up to {_f(highest)})."
            )
        rates = ""
        if error_rates:
            shares = ", ".join(f"{value} {share:.0%}" for value, share in error_rates.items())
            rates = f" (wrong answers: {shares})"
        return (
            f"{sentence}, although it reaches {_f(pooled.auroc)} pooled ({_interval(pooled.low, pooled.high)}, above "
            f"every group's AUROC): its pooled signal is the {column} itself{rates}."
        )
    shown = [f"{value} {_f(defined[value].auroc)}" for value in above]
    return (
        f"{name} is above chance within {len(above)} of {len(defined)} {column} values ({_listed(shown)}) and not "
        f"within {_listed(not_above)}{tail}."
    )


def describe_finding(finding: Finding) -> list[str]:
    """The sentences of "what this says", each chosen by the finding's intervals."""
    sentences = []
    if finding.paired is not None:
        sentences.append(describe_paired(finding.paired))
    chance = describe_chance(finding.best, finding.pooled)
    if chance is not None:
        sentences.append(chance)
    for item in finding.within:
        sentences.append(describe_within(item, finding.error_rates.get(item.column)))
    return sentences
