"""fit_scalers against scikit-learn's StandardScaler fitted on each row subset."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from halp.scaling import MAX_PARTS, fit_scalers


def _features() -> tuple[np.ndarray, np.ndarray]:
    """float32 features with the columns that break naive statistics: constant, 0 but on rows 0-39, a large offset
    over a small spread, and a heavy tail."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    y = (rng.random(300) < 0.3).astype(int)
    X[:, 1] = 2.5
    X[:, 2] = 0.0
    X[:40, 2] = rng.standard_normal(40)
    X[:, 3] = 1e4 + 1e-2 * rng.standard_normal(300)
    X[:, 4] = rng.standard_cauchy(300) * 100
    return X, y


def _assert_equal_to_standard_scaler(fitted: StandardScaler, rows: np.ndarray, X: np.ndarray) -> None:
    reference = StandardScaler().fit(X[rows])
    assert fitted.n_samples_seen_ == reference.n_samples_seen_ and fitted.n_features_in_ == reference.n_features_in_
    # Both accumulate in float64; they differ by the order of the additions (tolerances stated, relative).
    np.testing.assert_allclose(fitted.mean_, reference.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fitted.var_, reference.var_, rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(fitted.scale_, reference.scale_, rtol=1e-9, atol=0)
    np.testing.assert_array_equal(fitted.scale_ == 1.0, reference.scale_ == 1.0)  # the same near-constant columns
    np.testing.assert_allclose(fitted.transform(X), reference.transform(X), rtol=1e-6, atol=1e-6)


def test_a_studys_fits_get_standard_scalers_statistics_from_one_read():
    """5 training folds, the control's (the same rows), and all rows: each equals StandardScaler on its rows, a
    column constant within one training fold (0 off its test fold) included: scale 1, as StandardScaler sets it."""
    X, y = _features()
    splits = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    folds = [train for train, _ in splits]
    X[:, 2] = 0.0
    X[splits[0][1], 2] = np.random.default_rng(2).standard_normal(len(splits[0][1]))
    sets = [*folds, *folds, np.arange(len(y))]
    fitted = fit_scalers(X, sets)
    assert len(fitted) == len(sets)
    for scaler, rows in zip(fitted, sets, strict=True):
        _assert_equal_to_standard_scaler(scaler, rows, X)
    constant_somewhere = [scaler.scale_[2] == 1.0 for scaler in fitted]
    assert any(constant_somewhere) and not all(constant_somewhere)  # the within-fold constant column is exercised


@pytest.mark.parametrize(
    "make_sets",
    [
        lambda rng: [np.array([0, 1, 1, 2, 5, 5, 5])],  # repeated rows: weighted as StandardScaler weighs them
        lambda rng: [rng.choice(300, 50, replace=False) for _ in range(MAX_PARTS + 6)],  # many distinct parts
        lambda rng: [np.arange(100, 300), np.arange(0, 150)],  # overlapping sets, rows in neither
    ],
    ids=["repeated-rows", "many-parts", "overlapping"],
)
def test_any_row_sets_equal_standard_scaler(make_sets):
    X, _ = _features()
    sets = make_sets(np.random.default_rng(1))
    for scaler, rows in zip(fit_scalers(X, sets), sets, strict=True):
        _assert_equal_to_standard_scaler(scaler, rows, X)
