"""`halp.findings`: "what this says", its sentences chosen by the intervals (synthetic numbers for each branch), and the
numbers it states checked against scikit-learn on synthetic out-of-fold scores."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from halp.findings import (
    Finding,
    Paired,
    Score,
    Within,
    describe_chance,
    describe_finding,
    describe_paired,
    describe_within,
    paired_difference,
    state_finding,
)

QUERY, VISION = "query_token/layer_3 (logreg)", "vision_only (logreg)"


def paired(difference: float, low: float, high: float) -> Paired:
    return Paired(QUERY, VISION, 1500, 0.6 + difference, 0.6, difference, low, high)


def test_paired_sentence_when_the_best_feature_is_better() -> None:
    sentence = describe_paired(paired(0.168, 0.135, 0.202))
    assert sentence.startswith(f"{QUERY} predicts hallucinations better than {VISION}")
    assert "AUROC 0.768 against 0.600 on the same 1500 rows" in sentence
    assert "+0.168 (95% interval +0.135 to +0.202)" in sentence


def test_paired_sentence_when_the_interval_says_the_other_way() -> None:
    sentence = describe_paired(paired(-0.05, -0.08, -0.02))
    # Said from the better one's side, with the interval flipped to match.
    assert sentence.startswith(f"{VISION} predicts hallucinations better than {QUERY}")
    assert "AUROC 0.600 against 0.550" in sentence and "+0.050 (95% interval +0.020 to +0.080)" in sentence


def test_paired_sentence_when_the_interval_includes_zero() -> None:
    sentence = describe_paired(paired(0.02, -0.01, 0.05))
    assert sentence.startswith(f"{QUERY} and {VISION} cannot be told apart on the same 1500 rows")
    assert "95% interval -0.010 to +0.050 includes 0" in sentence
    assert "better" not in sentence


def test_paired_sentence_without_an_interval() -> None:
    sentence = describe_paired(paired(0.1, float("nan"), float("nan")))
    assert "no bootstrap interval" in sentence and "better" not in sentence


def within(name: str, pooled: tuple[float, float, float], groups: dict[str, tuple[float, float, float]]) -> Within:
    return Within(
        name,
        "difficulty",
        Score(*pooled, 1500, 550),
        {value: Score(*numbers, 500, 180) for value, numbers in groups.items()},
    )


def test_within_sentence_when_the_pooled_signal_is_the_group_itself() -> None:
    item = within(
        VISION,
        (0.608, 0.562, 0.619),
        {"easy": (0.550, 0.488, 0.609), "hard": (0.510, 0.456, 0.560), "medium": (0.516, 0.464, 0.572)},
    )
    sentence = describe_within(item, {"easy": 0.278, "hard": 0.468, "medium": 0.354})
    assert sentence.startswith(f"{VISION} is at chance within every difficulty (AUROC 0.510-0.550")
    assert "every 95% interval includes 0.5" in sentence
    assert "although it reaches 0.608 pooled (95% interval 0.562 to 0.619, above every group's AUROC)" in sentence
    assert "its pooled signal is the difficulty itself (wrong answers: easy 28%, hard 47%, medium 35%)" in sentence


def test_within_sentence_when_the_groups_are_too_small_to_tell() -> None:
    """Not above chance in any group by its interval, yet one group's AUROC reaches the pooled interval: no claim
    that the signal is gone within the groups, only that they cannot tell."""
    item = within(
        QUERY,
        (0.736, 0.677, 0.785),
        {"colour": (0.295, 0.149, 0.459), "spatial": (0.700, 0.430, 0.880), "counting": (0.590, 0.462, 0.764)},
    )
    sentence = describe_within(item, {"colour": 0.08, "spatial": 0.2, "counting": 0.52})
    assert sentence.startswith(f"{QUERY} is at or below chance within every difficulty (AUROC 0.295-0.700")
    assert "no 95% interval above 0.5" in sentence
    assert sentence.endswith(
        "although it reaches 0.736 pooled (95% interval 0.677 to 0.785); the groups are too small to tell whether "
        "that signal holds within them (up to 0.700)."
    )
    assert "signal is the" not in sentence


def test_within_sentence_when_chance_pooled_too() -> None:
    item = within(VISION, (0.52, 0.48, 0.56), {"easy": (0.51, 0.45, 0.57), "hard": (0.53, 0.47, 0.59)})
    sentence = describe_within(item)
    assert "at chance within every difficulty" in sentence
    assert sentence.endswith("and on all rows pooled too (AUROC 0.520, 95% interval 0.480 to 0.560).")
    assert "signal" not in sentence


def test_within_sentence_when_above_chance_in_every_group() -> None:
    item = within(
        QUERY,
        (0.76, 0.73, 0.78),
        {"easy": (0.811, 0.768, 0.852), "hard": (0.652, 0.607, 0.701), "medium": (0.755, 0.709, 0.800)},
    )
    sentence = describe_within(item)
    assert sentence == (
        f"{QUERY} stays above chance within every difficulty (AUROC 0.652-0.811, every 95% interval above 0.5)."
    )


def test_within_sentence_when_only_some_groups_hold_it() -> None:
    item = within(
        QUERY,
        (0.7, 0.66, 0.74),
        {"easy": (0.8, 0.75, 0.85), "hard": (0.53, 0.47, 0.6), "medium": (0.7, 0.64, 0.76), "x": (0.4, 0.3, 0.45)},
    )
    sentence = describe_within(item)
    assert sentence.startswith(f"{QUERY} is above chance within 2 of 4 difficulty values (easy 0.800, medium 0.700)")
    assert sentence.endswith("and not within hard, x.")


def test_within_sentence_names_groups_without_an_auroc() -> None:
    item = within(QUERY, (0.7, 0.66, 0.74), {"easy": (0.8, 0.75, 0.85), "tiny": (float("nan"),) * 3})
    sentence = describe_within(item)
    assert "above chance within every difficulty (AUROC 0.800" in sentence
    assert "(difficulty tiny: one class only, no AUROC)" in sentence


def test_chance_sentence_only_when_the_best_is_not_above_chance() -> None:
    assert describe_chance(QUERY, Score(0.7, 0.65, 0.75, 100, 30)) is None
    sentence = describe_chance(QUERY, Score(0.53, 0.47, 0.59, 100, 30))
    assert sentence is not None and "not distinguishable from chance" in sentence
    finding = Finding(QUERY, paired(0.01, -0.03, 0.05), Score(0.53, 0.47, 0.59, 100, 30))
    assert describe_finding(finding) == [describe_paired(finding.paired), sentence]


def synthetic_run(seed: int = 0, n_per_level: int = 400) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Three difficulty levels with error rates 20/40/60%; vision_only's score is the level alone (plus noise that
    ignores the label), the query token's score follows the label within every level."""
    rng = np.random.default_rng(seed)
    levels = np.repeat(["easy", "medium", "hard"], n_per_level)
    rate = pd.Series(levels).map({"easy": 0.2, "medium": 0.4, "hard": 0.6}).to_numpy()
    y = (rng.random(len(levels)) < rate).astype(int)
    ids = [f"q{i:05d}" for i in range(len(levels))]
    vision = rate + rng.normal(0, 0.05, len(levels))
    query = y * 1.0 + rng.normal(0, 0.8, len(levels))
    rows = []
    for feature, scores in (("vision_only", vision), ("query_token/layer_3", query)):
        rows.append(pd.DataFrame({"question_id": ids, "feature": feature, "probe": "logreg", "fold": 0, "label": y,
                                  "score": scores}))  # fmt: skip
    predictions = pd.concat(rows, ignore_index=True)
    results = pd.DataFrame(
        {
            "feature": ["vision_only", "query_token/layer_3"],
            "probe": ["logreg", "logreg"],
            "auroc_mean": [roc_auc_score(y, vision), roc_auc_score(y, query)],
        }
    )
    return results, predictions, pd.DataFrame({"question_id": ids, "difficulty": levels})


def test_state_finding_on_scores_whose_truth_is_known() -> None:
    results, predictions, groups = synthetic_run()
    finding = state_finding(results, predictions, groups, ["difficulty"], resamples=200, seed=1)
    assert finding is not None
    first, query_sentence, vision_sentence = finding.sentences
    assert first.startswith("query_token/layer_3 (logreg) predicts hallucinations better than vision_only")
    assert query_sentence.startswith("query_token/layer_3 (logreg) stays above chance within every difficulty")
    assert vision_sentence.startswith("vision_only (logreg) is at chance within every difficulty")
    assert "its pooled signal is the difficulty itself" in vision_sentence
    # The stated numbers are scikit-learn's AUROCs of the same scores.
    y = predictions[predictions["feature"] == "vision_only"]["label"].to_numpy()
    query = predictions[predictions["feature"] == "query_token/layer_3"]["score"].to_numpy()
    vision = predictions[predictions["feature"] == "vision_only"]["score"].to_numpy()
    expected = roc_auc_score(y, query) - roc_auc_score(y, vision)
    assert finding.paired is not None
    assert finding.paired.difference == pytest.approx(expected, abs=1e-12)
    assert f"{finding.paired.difference:+.3f}" in first
    assert f"AUROC {roc_auc_score(y, query):.3f} against {roc_auc_score(y, vision):.3f}" in first
    levels = groups["difficulty"].to_numpy()
    for item in finding.within:
        scores = query if item.name.startswith("query") else vision
        for level, stated in item.groups.items():
            mask = levels == level
            assert stated.auroc == pytest.approx(roc_auc_score(y[mask], scores[mask]), abs=1e-12)
            assert stated.n == mask.sum() and stated.wrong == y[mask].sum()
    assert finding.error_rates["difficulty"]["hard"] == pytest.approx(y[levels == "hard"].mean(), abs=1e-12)
    assert re.search(r"wrong answers: easy \d+%, hard \d+%, medium \d+%", vision_sentence)


def test_paired_interval_brackets_the_difference_and_is_reproducible() -> None:
    _, predictions, _ = synthetic_run(seed=3, n_per_level=200)
    first = paired_difference(predictions, ("query_token/layer_3", "logreg"), ("vision_only", "logreg"), 300, 7)
    again = paired_difference(predictions, ("query_token/layer_3", "logreg"), ("vision_only", "logreg"), 300, 7)
    assert first == again
    assert first.low <= first.difference <= first.high
    assert first.n == 600


def test_no_finding_without_predictions() -> None:
    results, _, _ = synthetic_run(n_per_level=20)
    assert state_finding(results, None) is None
