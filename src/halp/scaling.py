"""The standardization of many row subsets of one feature matrix (a study's fits), as scikit-learn fits each.

A study standardizes each fit's training rows (5 folds, 5 control folds, the final fit). `StandardScaler().fit`
on each copies and reads those rows again: 11 reads of the matrix, 2.5 s of a 10 s logistic-regression cell at the
study's size (10,000 x 3,584). `fit_scalers` reads the matrix once: the rows split into parts of the same
membership (for cross-validation folds, the test folds), each part's statistics come from its own rows, and each
fit's from its parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.preprocessing import StandardScaler

#: Past this many parts of distinct membership (arbitrary row subsets) a pass per part costs more than a copy per set.
MAX_PARTS = 64


def fit_scalers(X: np.ndarray, row_sets: Sequence[np.ndarray]) -> list[StandardScaler]:
    """`StandardScaler().fit(X[rows])` for each of `row_sets`, reading X once.

    Each part (rows in the same sets) gets its mean and sum of squared deviations in float64 from two passes over
    its rows, as StandardScaler's float64 accumulators; a set's statistics merge its parts' with the pairwise
    update of Chan, Golub and LeVeque (the one StandardScaler's `partial_fit` merges batches with), so a column
    constant in a set has variance 0 exactly. `scale_` follows StandardScaler's rule for near-constant columns
    (variance within the float64 error bound of the two-pass algorithm: scale 1). tests/test_scaling.py compares
    every attribute with StandardScaler's. Sets with repeated rows, or more than MAX_PARTS parts, are fitted by
    StandardScaler itself.
    """
    X = np.asarray(X)
    n, dim = X.shape
    sets = [np.asarray(rows) for rows in row_sets]
    member = np.zeros((len(sets), n), dtype=bool)
    for k, rows in enumerate(sets):
        member[k, rows] = True
    unique = [int(member[k].sum()) == len(rows) for k, rows in enumerate(sets)]
    patterns, part_of_row = np.unique(np.packbits(member, axis=0).T, axis=0, return_inverse=True)
    part_of_row = part_of_row.ravel()
    if len(patterns) > MAX_PARTS:
        return [StandardScaler().fit(X[rows]) for rows in sets]
    in_set = np.unpackbits(patterns, axis=1, count=len(sets)).astype(bool)  # (parts, sets)
    order = np.argsort(part_of_row, kind="stable")
    bounds = np.cumsum(np.bincount(part_of_row, minlength=len(patterns)))[:-1]
    parts = {  # count, mean, sum of squared deviations; not of rows that no set holds
        part: _statistics(X[rows]) for part, rows in enumerate(np.split(order, bounds)) if in_set[part].any()
    }
    scalers = []
    for k, rows in enumerate(sets):
        if not unique[k] or len(rows) == 0:
            scalers.append(StandardScaler().fit(X[rows]))
            continue
        count, mean, square = 0, np.zeros(dim), np.zeros(dim)
        for part in np.flatnonzero(in_set[:, k]):
            part_count, part_mean, part_square = parts[int(part)]
            total = count + part_count
            delta = part_mean - mean
            mean = mean + delta * (part_count / total)
            square = square + part_square + delta**2 * (count * part_count / total)
            count = total
        scalers.append(_fitted_scaler(mean, square / count, count))
    return scalers


def _statistics(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of `rows`, by two passes in float64."""
    block = rows.astype(np.float64)
    mean = block.mean(axis=0)
    block -= mean
    return len(block), mean, np.einsum("ij,ij->j", block, block)


def _fitted_scaler(mean: np.ndarray, variance: np.ndarray, count: int) -> StandardScaler:
    """A StandardScaler holding these statistics, with its scale for them."""
    scaler = StandardScaler()
    scaler.n_features_in_ = len(mean)
    scaler.n_samples_seen_ = np.int64(count)
    scaler.mean_ = mean
    scaler.var_ = variance
    # StandardScaler's near-constant rule (sklearn.preprocessing._data._is_constant_feature): the variance is within
    # the two-pass algorithm's float64 error bound, and such a column is scaled by 1, not by its ~0 deviation.
    eps = np.finfo(np.float64).eps
    constant = variance <= count * eps * variance + (count * mean * eps) ** 2
    scaler.scale_ = np.where(constant, 1.0, np.sqrt(variance))
    return scaler
