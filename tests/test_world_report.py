"""The report's deployment curves (risk-coverage, reliability/ECE) against brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest

from halp.report import reliability, risk_coverage, threshold_table


def _brute_force(labels: np.ndarray, risk: np.ndarray) -> list[tuple[float, float, float]]:
    """(risk value, coverage, accuracy) keeping every answer with risk <= each distinct value, by direct counting."""
    points = []
    for value in np.unique(risk):
        kept = risk <= value
        points.append((float(value), kept.mean(), float((labels[kept] == 0).mean())))
    return points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_risk_coverage_equals_direct_counting_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    risk = np.round(rng.random(200) * 0.5 + 0.4 * labels, 2)  # rounded: many ties
    curve = risk_coverage(labels, risk)
    expected = _brute_force(labels, risk)
    assert len(curve.risk) == len(expected)
    points = zip(curve.risk, curve.coverage, curve.accuracy, strict=True)
    for (value, coverage, accuracy), got in zip(expected, points, strict=True):
        assert got[0] == value
        assert got[1] == pytest.approx(coverage, abs=1e-12)
        assert got[2] == pytest.approx(accuracy, abs=1e-12)
    # The area is the step integral of accuracy over coverage.
    widths = np.diff([0.0] + [c for _, c, _ in expected])
    assert curve.area == pytest.approx(sum(w * a for w, (_, _, a) in zip(widths, expected, strict=True)), abs=1e-12)
    assert curve.base == pytest.approx((labels == 0).mean(), abs=1e-12)
    assert curve.base - 1e-12 <= curve.area <= curve.oracle + 1e-12  # this ranking is better than random


def test_risk_coverage_of_perfect_and_reversed_rankings() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    perfect = risk_coverage(labels, labels * 0.9 + np.linspace(0, 0.05, 40))
    assert perfect.area == pytest.approx(perfect.oracle, abs=1e-12)
    reversed_ = risk_coverage(labels, 1 - labels - np.linspace(0, 0.05, 40))
    assert reversed_.area < perfect.base < perfect.area


def test_threshold_for_a_target_withholds_exactly_what_predict_flags() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    risk = np.clip(rng.normal(0.3 + 0.3 * labels, 0.15), 0, 1)
    curve = risk_coverage(labels, risk)
    for target in (0.6, 0.8, 0.9):
        found = curve.threshold_for(target)
        assert found is not None
        threshold, coverage, accuracy = found
        kept = risk < threshold  # halp predict flags risk >= threshold
        assert kept.mean() == pytest.approx(coverage, abs=1e-12)
        assert (labels[kept] == 0).mean() == pytest.approx(accuracy, abs=1e-12)
        assert accuracy >= target
        # No larger kept set reaches the target.
        for _value, cov, acc in _brute_force(labels, risk):
            if cov > coverage + 1e-12:
                assert acc < target
    assert curve.threshold_for(1.01) is None
    table = threshold_table(curve, (0.8, 1.01))
    assert float(table.iloc[0]["withhold risk >="]) == pytest.approx(curve.threshold_for(0.8)[0], abs=1e-3)
    assert table.iloc[1]["withhold risk >="] == "unreachable"


def test_a_threshold_copied_from_the_table_into_predict_reproduces_its_coverage() -> None:
    """Risks crowded near 1 (an over-confident probe): at three decimals every threshold would read 1.000; the
    table shows the digits each needs, and `halp predict --threshold <that text>` withholds exactly those rows."""
    from halp.predict import RiskScorer

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    risk = np.where(labels == 1, 1 - rng.uniform(0, 3e-4, 400), 1 - rng.uniform(1e-4, 1e-3, 400))
    risk[:40] = rng.uniform(0.1, 0.6, 40)  # a few confident right answers
    labels[:40] = 0
    curve = risk_coverage(labels, risk)
    targets = (0.6, 0.7, 0.8, 0.9, 0.95)
    table = threshold_table(curve, targets)
    shown = [text for text in table["withhold risk >="] if text != "unreachable"]
    assert len(shown) >= 3 and len(set(shown)) == len(shown)  # distinct thresholds read distinctly
    assert any(len(text.split(".")[1]) > 3 for text in shown)  # which three decimals could not tell apart
    for _, row in table.iterrows():
        if row["withhold risk >="] == "unreachable":
            continue
        # What the CLI does with the text (click's FLOAT is float()), then predict's own flagging rule.
        scorer = RiskScorer(extractor=None, probe=None, feature="f", probe_name="logreg",
                            threshold=float(row["withhold risk >="]))  # fmt: skip
        kept = ~scorer.flagged(risk)
        assert kept.mean() == pytest.approx(row["coverage"], abs=1e-12)
        assert (labels[kept] == 0).mean() == pytest.approx(row["accuracy"], abs=1e-12)
        assert len(row["withhold risk >="].split(".")[1]) >= 3


def test_reliability_bins_and_ece_by_hand() -> None:
    rng = np.random.default_rng(4)
    risk = rng.random(500)
    labels = (rng.random(500) < risk).astype(int)  # calibrated by construction
    result = reliability(labels, risk, bins=10)
    ece = 0.0
    total = 0
    for low in np.arange(10) / 10:
        inside = (risk >= low) & (risk < low + 0.1) if low < 0.9 else risk >= low
        if inside.any():
            ece += inside.sum() / 500 * abs(labels[inside].mean() - risk[inside].mean())
            total += inside.sum()
    assert total == 500 == result.counts.sum()
    assert result.ece == pytest.approx(ece, abs=1e-9)
    assert result.ece < 0.1  # calibrated scores: only sampling noise (about 0.03 here)
    # Scores pushed to the extremes are badly calibrated.
    assert reliability(labels, (risk > 0.5).astype(float) * 0.98 + 0.01).ece > result.ece
