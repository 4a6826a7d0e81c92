"""The numbers halp reports about a probe's scores, in one place: `halp probe`, `halp report`, "what this says"
(halp.findings) and `halp world` all compute them here.

- ranking and threshold metrics (`METRICS`: AUROC, AUPRC, accuracy and F1 at `THRESHOLD`), `ranking_metrics` (AUROC
  and average precision without scikit-learn's per-call validation) and `resampled_ranking_metrics` (the same for
  every resample of a bootstrap at once), percentile `bootstrap_intervals`;
- a feature x probe's pooled out-of-fold scores (`feature_scores`), its AUROC with an interval (`score`), the paired
  bootstrap of two AUROCs on the same rows (`paired_difference`) and AUROCs within groups (`group_aurocs`);
- deployment: the risk-coverage curve (`risk_coverage`) and calibration (`reliability`, with its ECE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from halp.errors import ReportError

#: Accuracy and F1 count a probability at or above this as "hallucinated" (the paper's 0.5).
THRESHOLD = 0.5
#: An AUROC interval wholly above this is a signal; one that includes it, chance.
CHANCE = 0.5
RELIABILITY_BINS = 10


# ----- metrics of one set of scores --------------------------------------------------------------------------------
#: The metrics' definitions, scikit-learn's; `metric_values` computes the same numbers without its per-call input
#: validation (several milliseconds a call, thousands of calls a study) and is tested equal to these.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": lambda y, score: roc_auc_score(y, score),
    "auprc": lambda y, score: average_precision_score(y, score),
    "accuracy": lambda y, score: accuracy_score(y, score >= THRESHOLD),
    "f1": lambda y, score: f1_score(y, score >= THRESHOLD, zero_division=0),
}


def metric_values(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Every metric of `METRICS` of one set of predictions; AUROC/AUPRC are NaN when only one class is present."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=float)
    auroc, average_precision = ranking_metrics(y, score)
    predicted = score >= THRESHOLD
    flagged = int(y.sum()) + int(predicted.sum())
    return {
        "auroc": auroc,
        "auprc": average_precision,
        "accuracy": float(np.mean(y == predicted)) if len(y) else math.nan,
        "f1": 2.0 * int((y & predicted).sum()) / flagged if flagged else 0.0,
    }


def ranking_metrics(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """AUROC and average precision of one set of scores as scikit-learn defines them (ties included), without its
    per-call input validation. NaN, NaN when `y` holds one class. Tested equal to roc_auc_score and
    average_precision_score."""
    y = np.asarray(y)
    auroc, average_precision = resampled_ranking_metrics(y, score, np.arange(len(y))[None, :])
    return float(auroc[0]), float(average_precision[0])


def resampled_ranking_metrics(
    y: np.ndarray, score: np.ndarray, picks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of every resample of (y, score): resample r is the rows `picks[r]` (indices,
    repeats allowed, as a bootstrap draws them). NaN for a resample that holds one class.

    A resample's rows are a multiset of the original rows, so the rows are sorted once, by descending score, and a
    resample is its count of each row: no sort per resample, and a thousand resamples cost a few array passes.
    Rows of equal score form one threshold (scikit-learn's tie handling): a negative is credited with the positives
    above its tie group and half of those inside it (the trapezoidal ROC area), every positive with the precision
    at the end of its tie group (the step-wise average precision)."""
    y, score, picks = np.asarray(y), np.asarray(score, dtype=float), np.atleast_2d(np.asarray(picks))
    resamples, rows = picks.shape[0], len(y)
    if rows == 0 or picks.shape[1] == 0:
        return np.full(resamples, math.nan), np.full(resamples, math.nan)
    order = np.argsort(-score, kind="stable")
    ranked_scores, ranked_labels = score[order], y[order].astype(bool)
    group_starts = np.r_[0, np.flatnonzero(np.diff(ranked_scores)) + 1]  # the first row of each tie group
    # counts[r, i]: how often resample r drew the i-th row in score order.
    offsets = (np.arange(resamples) * rows)[:, None]
    counts = np.bincount((picks + offsets).ravel(), minlength=resamples * rows).reshape(resamples, rows)[:, order]
    positives = np.add.reduceat(np.where(ranked_labels, counts, 0), group_starts, axis=1).astype(float)
    negatives = np.add.reduceat(np.where(ranked_labels, 0, counts), group_starts, axis=1).astype(float)
    positives_to_end, negatives_to_end = np.cumsum(positives, axis=1), np.cumsum(negatives, axis=1)
    total_positives, total_negatives = positives_to_end[:, -1], negatives_to_end[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        credit = (negatives * (positives_to_end - positives / 2.0)).sum(axis=1)
        precision = positives_to_end / (positives_to_end + negatives_to_end)
        precision_sum = (positives * np.nan_to_num(precision)).sum(axis=1)
        both = (total_positives > 0) & (total_negatives > 0)
        auroc = np.where(both, credit / (total_positives * total_negatives), math.nan)
        average_precision = np.where(both, precision_sum / total_positives, math.nan)
    return auroc, average_precision


def bootstrap_intervals(
    y: np.ndarray, score: np.ndarray, resamples: int = 1000, seed: int = 42, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each metric over `resamples` row resamplings (with replacement) of (y, score).

    AUROC and AUPRC are undefined on a resample holding a single class; such resamples are skipped for them.
    """
    if resamples <= 0:
        return {name: (float("nan"), float("nan")) for name in METRICS}
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(y), size=(resamples, len(y)))
    labels, predicted = y[rows].astype(np.int64), score[rows] >= THRESHOLD
    hits = (labels == predicted).sum(axis=1)
    true_pos = (labels & predicted).sum(axis=1)
    f1_denominator = labels.sum(axis=1) + predicted.sum(axis=1)
    values: dict[str, np.ndarray] = {
        "accuracy": hits / len(y),
        "f1": np.divide(2 * true_pos, f1_denominator, out=np.zeros(resamples), where=f1_denominator > 0),
    }
    values["auroc"], values["auprc"] = resampled_ranking_metrics(y, score, rows)
    tail = (1.0 - level) / 2.0 * 100.0
    intervals = {}
    for name in METRICS:
        finite = values[name][~np.isnan(values[name])]
        intervals[name] = (
            (float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
            if len(finite)
            else (math.nan, math.nan)
        )
    return intervals


# ----- a feature x probe's pooled out-of-fold scores -------------------------------------------------------------
def probe_label(feature: str, probe: str) -> str:
    """How a feature x probe is named in sentences and tables: "feature (probe)"."""
    return f"{feature} ({probe})"


def feature_scores(predictions: pd.DataFrame, feature: str, probe: str) -> pd.DataFrame:
    """The rows `feature` x `probe` scored in predictions.csv's frame (`halp.results.read_predictions`), labelled
    and scored: label and score, indexed by question_id."""
    rows = predictions[(predictions["feature"] == feature) & (predictions["probe"] == probe)]
    return rows.dropna(subset=["label", "score"]).set_index("question_id")[["label", "score"]]


def pooled_scores(predictions: pd.DataFrame, feature: str, probe: str) -> tuple[np.ndarray, np.ndarray]:
    """`feature_scores` as arrays: the 0/1 labels and the scores, in predictions.csv's order."""
    rows = feature_scores(predictions, feature, probe)
    return rows["label"].to_numpy(dtype=int), rows["score"].to_numpy(dtype=float)


@dataclass(frozen=True)
class Score:
    """AUROC of one feature x probe on a set of rows, with its 95% bootstrap interval (NaN when undefined)."""

    auroc: float
    low: float
    high: float
    n: int
    wrong: int

    @property
    def versus_chance(self) -> str:
        """above, below or at chance by the interval; undefined without an interval (one class, no bootstrap)."""
        if any(math.isnan(value) for value in (self.auroc, self.low, self.high)):
            return "undefined"
        if self.low > CHANCE:
            return "above"
        if self.high < CHANCE:
            return "below"
        return "at"


@dataclass(frozen=True)
class Paired:
    """AUROC(first) - AUROC(second) on the same rows, with a paired bootstrap 95% interval."""

    first: str
    second: str
    n: int
    first_auroc: float
    second_auroc: float
    difference: float
    low: float
    high: float

    def as_dict(self) -> dict[str, Any]:
        """The fields in order, the interval's ends named as in the tables (ci_low, ci_high)."""
        data = asdict(self)
        data["ci_low"], data["ci_high"] = data.pop("low"), data.pop("high")
        return data


def score(y: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> Score:
    """AUROC with its percentile bootstrap interval (`bootstrap_intervals`, as `halp probe` reports)."""
    y = np.asarray(y, dtype=np.int64)
    scores = np.asarray(scores, dtype=float)
    auroc = metric_values(y, scores)["auroc"]
    low, high = bootstrap_intervals(y, scores, resamples, seed)["auroc"] if len(set(y.tolist())) == 2 else (
        math.nan, math.nan)  # fmt: skip
    return Score(float(auroc), float(low), float(high), len(y), int(y.sum()))


def paired_difference(
    predictions: pd.DataFrame, first: tuple[str, str], second: tuple[str, str], resamples: int, seed: int
) -> Paired:
    """AUROC(first) - AUROC(second) on the rows both scored, with a paired bootstrap 95% interval."""
    joined = feature_scores(predictions, *first).merge(
        feature_scores(predictions, *second), left_index=True, right_index=True, suffixes=("_a", "_b")
    )
    y = joined["label_a"].to_numpy(dtype=np.int64)
    score_a, score_b = joined["score_a"].to_numpy(dtype=float), joined["score_b"].to_numpy(dtype=float)
    auroc_a, auroc_b = ranking_metrics(y, score_a)[0], ranking_metrics(y, score_b)[0]
    rng = np.random.default_rng(seed)
    # One draw per resample, as the resamples were always drawn (the same seed gives the same interval).
    picks = np.array([rng.integers(0, len(y), len(y)) for _ in range(resamples)]).reshape(resamples, len(y))
    deltas = resampled_ranking_metrics(y, score_a, picks)[0] - resampled_ranking_metrics(y, score_b, picks)[0]
    deltas = deltas[~np.isnan(deltas)]  # a resample holding one class has no AUROC
    low, high = np.percentile(deltas, [2.5, 97.5]) if len(deltas) else (math.nan, math.nan)
    return Paired(
        probe_label(*first), probe_label(*second), len(y), float(auroc_a), float(auroc_b), float(auroc_a - auroc_b),
        float(low), float(high),
    )  # fmt: skip


def group_scores(rows: pd.DataFrame, column: str, resamples: int, seed: int) -> dict[str, Score]:
    """`score` within each value of `rows[column]` (rows: label, score and the column), by the value as text."""
    y, scores = rows["label"].to_numpy(dtype=np.int64), rows["score"].to_numpy(dtype=float)
    values = rows[column].astype(str).to_numpy()
    return {
        str(value): score(y[values == value], scores[values == value], resamples, seed)
        for value in sorted(set(values.tolist()))
    }


def group_aurocs(
    predictions: pd.DataFrame, groups: pd.DataFrame, columns: Sequence[str], resamples: int, seed: int
) -> pd.DataFrame:
    """AUROC with a bootstrap interval of every feature x probe within each value of each column of `groups`."""
    indexed = groups.set_index("question_id")[list(columns)]
    out = []
    for feature, probe in predictions[["feature", "probe"]].drop_duplicates().itertuples(index=False):
        rows = feature_scores(predictions, feature, probe).join(indexed, how="inner")
        for column in columns:
            for value, item in group_scores(rows, column, resamples, seed).items():
                out.append(
                    {
                        "feature": feature, "probe": probe, "by": column, "group": value, "n": item.n,
                        "n_positive": item.wrong, "auroc": item.auroc, "ci_low": item.low, "ci_high": item.high,
                    }
                )  # fmt: skip
    return pd.DataFrame(out)


# ----- deployment: what withholding risky answers buys, and whether the risk is calibrated ------------------------
@dataclass
class RiskCoverage:
    """Answers are kept in order of increasing risk; one point per distinct risk value (ties kept together).

    `coverage[i]`: fraction of answers kept when every answer with risk <= `risk[i]` is kept; `accuracy[i]`:
    fraction of the kept answers that are right (label 0). `area`: the area under this step curve, i.e. the
    mean accuracy over coverage; `base` (everything kept, also the expected area of a random ranking) and
    `oracle` (all right answers first) bracket it.
    """

    risk: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray
    area: float
    base: float
    oracle: float

    def last_reaching(self, target: float) -> int | None:
        """Index of the largest coverage whose kept accuracy reaches `target` (None when none does)."""
        reaching = np.flatnonzero(self.accuracy >= target)
        return int(reaching[-1]) if len(reaching) else None

    def threshold_for(self, target: float) -> tuple[float, float, float] | None:
        """(threshold, coverage, accuracy) of the largest coverage whose kept accuracy reaches `target`.

        Withholding every answer with risk >= threshold (what `halp predict --threshold` flags) keeps exactly
        that set. None when no coverage reaches the target.
        """
        index = self.last_reaching(target)
        if index is None:
            return None
        return self._kept_up_to(index)

    def threshold_at_coverage(self, target: float) -> tuple[float, float, float] | None:
        """(threshold, coverage, accuracy) of the largest coverage at most `target` (a fraction in (0, 1]).

        Withholding every answer with risk >= threshold keeps exactly that set; `accuracy` is the fraction of it that
        is right. None when even the lowest-risk tie group is more than `target`.
        """
        # Coverages are counts over n; the tolerance keeps a target typed as a decimal (0.7 of 10) reachable.
        reaching = np.flatnonzero(self.coverage <= target + 1e-9)
        if len(reaching) == 0:
            return None
        return self._kept_up_to(int(reaching[-1]))

    def _kept_up_to(self, index: int) -> tuple[float, float, float]:
        """(threshold, coverage, accuracy) of keeping the answers up to curve point `index`."""
        # The first withheld risk: flagging risk >= it withholds exactly the answers past this point.
        threshold = float(self.risk[index + 1]) if index + 1 < len(self.risk) else float("inf")
        return threshold, float(self.coverage[index]), float(self.accuracy[index])


def risk_coverage(labels: np.ndarray, risk: np.ndarray) -> RiskCoverage:
    """The risk-coverage curve of scores `risk` (P(hallucinated)) for 0/1 `labels` (1: the answer is wrong)."""
    labels, risk = np.asarray(labels, dtype=np.int64), np.asarray(risk, dtype=float)
    if len(labels) == 0:
        raise ReportError("no scored answers to draw a risk-coverage curve from")
    order = np.argsort(risk, kind="mergesort")
    ranked_risk, ranked_right = risk[order], 1 - labels[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked_risk)), len(ranked_risk) - 1]  # last row of each tie
    kept = ends + 1
    accuracy = np.cumsum(ranked_right)[ends] / kept
    coverage = kept / len(labels)
    widths = np.diff(np.r_[0.0, coverage])
    right = int(ranked_right.sum())
    oracle_accuracy = np.minimum(np.arange(1, len(labels) + 1), right) / np.arange(1, len(labels) + 1)
    return RiskCoverage(
        ranked_risk[ends], coverage, accuracy, float(np.sum(widths * accuracy)), right / len(labels),
        float(oracle_accuracy.mean()),
    )  # fmt: skip


@dataclass
class Reliability:
    """Equal-width bins of predicted P(hallucinated): mean prediction, observed rate and count per non-empty bin."""

    predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    ece: float  # expected calibration error: sum over bins of count / n * |observed - predicted|


def reliability(labels: np.ndarray, risk: np.ndarray, bins: int = RELIABILITY_BINS) -> Reliability:
    from sklearn.calibration import calibration_curve

    labels, risk = np.asarray(labels, dtype=np.int64), np.asarray(risk, dtype=float)
    observed, predicted = calibration_curve(labels, risk, n_bins=bins, strategy="uniform")
    # The bin of each score exactly as calibration_curve assigns it, for the counts.
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], risk), minlength=bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(labels) * np.abs(observed - predicted)))
    return Reliability(predicted, observed, counts, ece)
