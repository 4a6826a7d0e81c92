"""Probes: does a stored representation predict, before generation, that the answer will be hallucinated?

One probe per feature (vision_only, vision_token/layer_k, ...) and probe type:

* `LogRegProbe`: z-scored features, L2 logistic regression, C chosen by an inner stratified CV on AUROC;
* `MLPProbe`: the HALP paper's probe, Linear(d,512)-ReLU-BatchNorm-Dropout(0.3)-...-Linear(128,1),
  BCE, Adam lr 1e-3, batch 32, 50 epochs, seed 42 (z-scored inputs, which the paper did not do).

`train_probes` evaluates them by stratified k-fold CV (grouped by image when an image has several
rows) or by the paper's single stratified split, reports AUROC/AUPRC/accuracy/F1 with fold mean, std
and a bootstrap interval over the pooled out-of-fold predictions, runs a control probe on shuffled
labels beside every result, and saves one final probe per feature and type (safetensors + JSON).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from halp.errors import MissingInputError, ParameterError, ProbeError, RunDamagedError
from halp.label import LabelTable, read_labels
from halp.layout import (
    GROUPS_FILE,
    PREDICTIONS_FILE,
    PROBE_MODELS_DIR,
    RESULTS_FILE,
    RESULTS_JSON_FILE,
    atomic_path,
    atomic_write,
    labels_file,
    probes_dir,
    write_text_atomic,
)

# The metrics moved to halp.metrics; they stay importable from here (`halp.probe.bootstrap_intervals`, ...).
from halp.metrics import (
    METRICS,
    THRESHOLD,
    bootstrap_intervals,
    metric_values,
    ranking_metrics,
)
from halp.rows import open_run_file
from halp.scaling import fit_scalers
from halp.store import feature_datasets, read_strings
from halp.store import meta_columns as stored_meta_columns

log = logging.getLogger(__name__)

PROBE_TYPES = ("logreg", "mlp")
#: Inverse regularization strengths the logistic probe chooses from (on z-scored features).
# Largest first: LogisticRegressionCV keeps the first of equally scored Cs, and on separable data (every C
# at AUROC 1) the weakest regularization gives usable probabilities instead of all of them near the prior.
LOGREG_CS = tuple(float(c) for c in np.logspace(1, -5, 7))
PROBE_FORMAT = "halp-probe/1"
#: Rows per MLP step and fit, and the epochs without a better held-out loss after which a fit stops.
MLP_BATCH_SIZE = 128
MLP_PATIENCE = 3


# ----- shared helpers ----------------------------------------------------------------------------
def _check_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ProbeError(f"labels must be 0/1, got values {sorted(values)}")
    if len(values) < 2:
        raise ProbeError("labels contain a single class; a probe needs hallucinated and correct examples")
    return y.astype(np.int64)


def _as_features(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ProbeError(f"features must be 2-D (n_samples, dim), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ProbeError(f"features hold {int((~np.isfinite(X)).sum())} NaN or infinite value(s)")
    return X


def _proba_columns(positive: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - positive, positive])


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Use `threads` intra-op threads inside the block only; the process setting is restored after."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----- the probes --------------------------------------------------------------------------------
class LogRegProbe(ClassifierMixin, BaseEstimator):
    """Standardized L2 logistic regression; `C=None` picks C from LOGREG_CS by inner CV on AUROC.

    The inner CV is `LogisticRegressionCV`'s (stratified `cv` folds of the training rows, AUROC summed over folds,
    the largest C among equal sums, then a refit on every row). `fit_batch` solves every problem of its fits at once
    (the whole path of C values, warm started, then the refits): up to LOGREG_NEWTON_MAX_DIM features by Newton's
    method (`newton_logistic`, scikit-learn's optimum to ~1e-10), past that by L-BFGS on the shared feature matrix
    (`lbfgs_logistic_path`, scikit-learn's lbfgs tolerance). Fitted: `C_`, `coef_`, `intercept_` (standardized
    space), `n_iter_` (inner fold x C, LOGREG_CS order) and `refit_n_iter_`, the solver's iterations.
    """

    def __init__(self, C: float | None = None, cv: int = 5, max_iter: int = 1000, random_state: int = 42) -> None:
        self.C = C
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: Any, y: Any, groups: Any = None) -> LogRegProbe:
        """Fit on every row (`groups` is accepted for the API MLPProbe shares; the inner CV is not grouped)."""
        X, y = _as_features(X), _check_binary(y)
        [fitted] = self.fit_batch(X, [Fit(np.arange(len(y)), y)])
        for name, value in vars(fitted).items():
            if name.endswith("_"):
                setattr(self, name, value)
        return self

    def fit_batch(self, X: Any, fits: Sequence[Fit], groups: Any = None) -> list[LogRegProbe]:
        """One fitted copy of this probe per fit (`fit.rows` of X, labels `fit.y`), solved together where it pays."""
        X = _as_features(X)
        probes = []
        for fit, scaler in zip(fits, fit_scalers(X, [fit.rows for fit in fits]), strict=True):
            probe = clone(self)
            y = _check_binary(np.asarray(fit.y)[fit.rows])
            probe.classes_ = np.array([0, 1])
            probe.n_features_in_ = X.shape[1]
            probe.scaler_ = scaler
            if self.C is None and int(min(np.bincount(y))) < 2:
                raise ProbeError("choosing C by inner CV needs at least 2 examples of each class; pass C=")
            probes.append(probe)
        _fit_logregs(self, X, fits, probes)
        return probes

    def _inner_cv(self, y: np.ndarray) -> StratifiedKFold:
        return StratifiedKFold(min(self.cv, int(min(np.bincount(y)))), shuffle=True, random_state=self.random_state)

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.scaler_.transform(_as_features(X)) @ self.coef_ + self.intercept_

    def predict_proba(self, X: Any) -> np.ndarray:
        return _proba_columns(expit(self.decision_function(X)))

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= THRESHOLD).astype(np.int64)


@dataclass
class _Problem:
    """One L2 logistic regression: rows of a standardized design, their labels, and C."""

    design: np.ndarray  # (rows, dim) float64, standardized
    y: np.ndarray
    C: float = 1.0
    start: np.ndarray | None = None


def _fit_logregs(template: LogRegProbe, X: np.ndarray, fits: Sequence[Fit], probes: list[LogRegProbe]) -> None:
    """Every fit's inner CV over LOGREG_CS (or its fixed C) and its refit, solved as batches of problems.

    LogisticRegressionCV's procedure: per fit, stratified inner folds of its rows; every inner problem along the
    path of C values (here from the strongest regularization up, each C warm started from the last solution);
    AUROC of each on its held-out inner fold; the C with the largest sum over folds (the largest C among equal
    sums); the refit on all the fit's rows from the mean of the folds' solutions at that C. The solver: batched
    Newton up to LOGREG_NEWTON_MAX_DIM features, batched L-BFGS on the shared feature matrix past that.
    """
    labels = [np.asarray(fit.y)[fit.rows].astype(np.float64) for fit in fits]
    newton = X.shape[1] <= LOGREG_NEWTON_MAX_DIM
    solver = _NewtonProblems(X, fits, probes, labels) if newton else _SharedProblems(X, fits, probes, labels)
    if template.C is not None:
        chosen = [float(template.C)] * len(fits)
        starts: list[np.ndarray | None] = [None] * len(fits)
        for probe in probes:
            probe.n_iter_ = np.zeros((0, len(LOGREG_CS)), dtype=np.int64)
    else:
        inner = [list(template._inner_cv(y.astype(np.int64)).split(np.zeros((len(y), 1)), y)) for y in labels]
        parts = [(fit, train) for fit, folds in enumerate(inner) for train, _ in folds]
        ascending = sorted(LOGREG_CS)
        path, iterations = solver.solve(parts, np.asarray(ascending)[:, None].repeat(len(parts), 1), None, template)
        descending = [ascending.index(C) for C in LOGREG_CS]
        chosen, starts = [], []
        problem = 0
        for fit, (probe, y, folds) in enumerate(zip(probes, labels, inner, strict=True)):
            # scores[fold, C] and n_iter_[fold, C] in LOGREG_CS order, as LogisticRegressionCV's scores_ and n_iter_
            scores = np.empty((len(folds), len(LOGREG_CS)))
            for fold, (_, held) in enumerate(folds):
                decisions = solver.decisions(fit, held, path[descending, problem + fold])  # (held rows, C)
                held_labels = y[held].astype(np.int64)
                for column in range(len(LOGREG_CS)):
                    scores[fold, column] = ranking_metrics(held_labels, decisions[:, column])[0]
            probe.n_iter_ = iterations[descending, problem : problem + len(folds)].T.copy()
            best = first_best(scores.sum(axis=0))  # the first of equal sums: the largest C
            chosen.append(LOGREG_CS[best])
            starts.append(path[ascending.index(LOGREG_CS[best]), problem : problem + len(folds)].mean(axis=0))
            problem += len(folds)
    everything = [(fit, np.arange(len(y))) for fit, y in enumerate(labels)]
    [solutions], [refit_iterations] = solver.solve(everything, np.array([chosen]), starts, template)
    for probe, C, beta, count in zip(probes, chosen, solutions, refit_iterations, strict=True):
        probe.refit_n_iter_ = int(count)
        probe.C_ = float(C)
        probe.coef_ = beta[:-1].copy()
        probe.intercept_ = float(beta[-1])


#: Sums of fold AUROCs closer than this are equal: an AUROC is a fraction with denominator positives x negatives, so
#: two that differ do so by far more, and sums of the same AUROCs in another order can differ in the last bits.
SCORE_TIE = 1e-9


def first_best(sums: np.ndarray) -> int:
    """Index of the first largest of `sums`, counting sums within SCORE_TIE of the largest as equal to it: a tie
    goes to the first (LOGREG_CS: the largest C), whatever the rounding of the sums (`np.argmax` alone let the last
    bits of two equal sums choose)."""
    sums = np.asarray(sums, dtype=np.float64)
    return int(np.flatnonzero(sums >= sums.max() - SCORE_TIE)[0])


class _NewtonProblems:
    """The fits' problems as standardized float64 designs (rows x dim each) for the batched Newton solver."""

    def __init__(self, X: np.ndarray, fits: Sequence[Fit], probes: list[LogRegProbe], labels: list[np.ndarray]):
        self.designs = [
            probe.scaler_.transform(X[fit.rows]).astype(np.float64) for probe, fit in zip(probes, fits, strict=True)
        ]
        self.labels = labels

    def solve(
        self,
        parts: list[tuple[int, np.ndarray]],
        Cs: np.ndarray,
        starts: Sequence[np.ndarray | None] | None,
        template: LogRegProbe,
    ) -> tuple[np.ndarray, np.ndarray]:
        starts = starts or [None] * len(parts)
        problems = [
            _Problem(self.designs[fit][rows], self.labels[fit][rows], start=start)
            for (fit, rows), start in zip(parts, starts, strict=True)
        ]
        return _solve_newton(problems, Cs, template.max_iter)

    def decisions(self, fit: int, rows: np.ndarray, solutions: np.ndarray) -> np.ndarray:
        """(rows, solutions) decision values of fit `fit`'s `rows` under each solution (coefficients, intercept)."""
        return self.designs[fit][rows] @ solutions[:, :-1].T + solutions[:, -1]


class _SharedProblems:
    """The fits' problems as rows of the one feature matrix, with each fit's standardization, for batched L-BFGS."""

    def __init__(self, X: np.ndarray, fits: Sequence[Fit], probes: list[LogRegProbe], labels: list[np.ndarray]):
        self.X, self.fits, self.labels = X, fits, labels
        self.means = np.stack([probe.scaler_.mean_ for probe in probes])
        self.scales = np.stack([probe.scaler_.scale_ for probe in probes])

    def solve(
        self,
        parts: list[tuple[int, np.ndarray]],
        Cs: np.ndarray,
        starts: Sequence[np.ndarray | None] | None,
        template: LogRegProbe,
    ) -> tuple[np.ndarray, np.ndarray]:
        fits = [fit for fit, _ in parts]
        return lbfgs_logistic_path(
            self.X,
            [np.asarray(self.fits[fit].rows)[rows] for fit, rows in parts],
            [self.labels[fit][rows] for fit, rows in parts],
            self.means[fits],
            self.scales[fits],
            Cs,
            starts,
            max_iter=template.max_iter,
        )

    def decisions(self, fit: int, rows: np.ndarray, solutions: np.ndarray) -> np.ndarray:
        """(rows, solutions) decision values of fit `fit`'s `rows` under each solution (standardized coefficients,
        intercept), from the raw features: x.(b / scale) + c - mean.(b / scale), one gather and one matmul for all
        the solutions, not a standardized copy of the fit's rows per solution."""
        raw = solutions[:, :-1] / self.scales[fit]
        features = self.X[np.asarray(self.fits[fit].rows)[rows]].astype(np.float64)
        return features @ raw.T + (solutions[:, -1] - raw @ self.means[fit])


#: Past this many features the batched Newton solver's Hessians (rows x dim^2 each) cost more than lbfgs.
LOGREG_NEWTON_MAX_DIM = 256
_NEWTON_CHUNK_BYTES = 256 * 2**20


def newton_logistic(problems: list[_Problem], max_iter: int = 1000) -> np.ndarray:
    """Solutions (problems, dim + 1: coefficients, intercept) of  min  C * sum log-loss + |coef|^2 / 2.

    scikit-learn's L2 objective (intercept not penalized), solved for many problems at once by Newton's method
    with a Cholesky solve and a backtracking line search on the objective, in float64 (the Hessian's matmul in
    float32, refreshed only while steps are large), until every step is below 1e-7 of the solution's size, ~1e-9
    from the optimum (tests/test_probe.py compares it with scikit-learn's LogisticRegression).
    """
    return _solve_newton(problems, np.array([[problem.C for problem in problems]], dtype=np.float64), max_iter)[0][0]


def _solve_newton(problems: list[_Problem], Cs: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Solutions (steps, problems, dim + 1) at Cs (steps, problems), each step warm started from the last, and the
    Newton steps each problem took at each (steps, problems).

    Problems are padded to the longest of their chunk (padding weighs nothing); chunks group problems of similar
    row counts (longest first) and bound the memory.
    """
    if not problems:
        return np.zeros((len(Cs), 0, 0)), np.zeros((len(Cs), 0), dtype=np.int64)
    dim = problems[0].design.shape[1] + 1
    order = sorted(range(len(problems)), key=lambda k: -len(problems[k].y))
    solutions = np.empty((len(Cs), len(problems), dim))
    iterations = np.zeros((len(Cs), len(problems)), dtype=np.int64)
    chunk: list[int] = []
    for k in [*order, None]:
        longest = len(problems[chunk[0]].y) if chunk else 0
        full = (len(chunk) + 1) * longest * dim * 24 > _NEWTON_CHUNK_BYTES  # two float64 + two float32 copies
        if chunk and (k is None or len(problems[k].y) < 0.9 * longest or full):
            solved = _newton_chunk([problems[i] for i in chunk], longest, Cs[:, chunk], max_iter)
            solutions[:, chunk], iterations[:, chunk] = solved
            chunk = []
        if k is not None:
            chunk.append(k)
    return solutions, iterations


def _newton_chunk(problems: list[_Problem], rows: int, Cs: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    count, dim = len(problems), problems[0].design.shape[1] + 1
    design = torch.zeros((count, rows, dim), dtype=torch.float64)
    targets = torch.zeros((count, rows), dtype=torch.float64)
    weights = torch.zeros((count, rows), dtype=torch.float64)
    beta = torch.zeros((count, dim), dtype=torch.float64)
    for k, problem in enumerate(problems):
        length = len(problem.y)
        design[k, :length, :-1] = torch.from_numpy(problem.design)
        design[k, :length, -1] = 1.0
        targets[k, :length] = torch.from_numpy(np.asarray(problem.y, dtype=np.float64))
        weights[k, :length] = 1.0
        if problem.start is not None:
            beta[k] = torch.from_numpy(problem.start)
        else:  # the intercept alone: the solution under the strongest regularization, nearly
            rate = float(np.clip(np.mean(problem.y), 1e-6, 1 - 1e-6))
            beta[k, -1] = math.log(rate / (1 - rate))
    # The matrix-vector products take the layout MKL is fastest for on one core (measured, 50 problems x 962 rows
    # x 129: 2.4 ms for the logits' X b as b^T (X^T), 4.3 ms for the gradient's X^T r as r^T X, against 6.2 and
    # 8.1 ms as bmm(X, b) and bmm(X^T, r)): both layouts are kept, in float64.
    columns = design.transpose(1, 2).contiguous()  # (problems, dim, rows)

    def times_design(vectors: torch.Tensor) -> torch.Tensor:
        """(problems, rows): each problem's design times its vector (problems, dim)."""
        return torch.bmm(vectors[:, None, :], columns)[:, 0, :]

    design32 = design.float()
    weighted32 = torch.empty_like(design32)  # reused: a fresh tensor of this size per step costs page faults
    penalized = torch.ones(dim, dtype=torch.float64)
    penalized[-1] = 0.0  # the intercept
    solutions, steps = [], []
    data_hessian: torch.Tensor | None = None  # sum of w p (1 - p) x x^T, from the last fresh Newton step
    factor: torch.Tensor | None = None  # Cholesky factor of C x data_hessian + the penalty
    far = True
    for step_Cs in Cs:
        C = torch.from_numpy(step_Cs)[:, None]

        def objective(logits: torch.Tensor, candidate: torch.Tensor, C: torch.Tensor = C) -> torch.Tensor:
            loss = (weights * (nn.functional.softplus(logits) - targets * logits)).sum(1)
            return C[:, 0] * loss + 0.5 * (penalized * candidate**2).sum(1)

        done = torch.zeros(count, dtype=torch.bool)
        taken = torch.zeros(count, dtype=torch.long)
        logits = times_design(beta)
        for iteration in range(max_iter):
            taken += ~done
            probability = torch.sigmoid(logits)
            gradient = C * torch.bmm((weights * (probability - targets))[:, None, :], design)[:, 0, :]
            gradient += penalized * beta
            # The Hessian's matmul is the cost, so it is made in float32 (half of float64's) and only while the steps
            # are large: a new C's first step takes the last C's curvature, and once steps are below 1e-2 of the
            # solution the factor is kept (a chord step: linear convergence, fast that close). The gradient, the
            # objective and the stopping rule stay float64, so the steps still converge to float64's optimum.
            if data_hessian is None or (iteration > 0 and far):
                curvature = (weights * probability * (1 - probability)).float()[:, :, None]
                torch.mul(design32, curvature, out=weighted32)
                data_hessian = torch.bmm(design32.transpose(1, 2), weighted32).double()
                factor = None
            if factor is None or iteration == 0:
                factor, info = torch.linalg.cholesky_ex(C[:, :, None] * data_hessian + torch.diag(penalized))
                if bool((info != 0).any()):
                    raise ProbeError("logistic regression: a Hessian is not positive definite (non-finite features?)")
            step = -torch.cholesky_solve(gradient[:, :, None], factor)[:, :, 0]
            step[done] = 0.0
            # Backtracking (Armijo) on the objective, per problem; a step of 1 is accepted near the optimum. The
            # logits move along the step's direction, so trying a step size costs no matmul.
            direction = times_design(step)
            before, slope = objective(logits, beta), (gradient * step).sum(1)
            size = torch.ones(count, dtype=torch.float64)
            for _ in range(60):
                after = objective(logits + size[:, None] * direction, beta + size[:, None] * step)
                accepted = after <= before + 1e-4 * size * slope + 1e-13 * before.abs()
                if bool(accepted.all()):
                    break
                size = torch.where(accepted, size, size / 2)
            beta += size[:, None] * step
            logits += size[:, None] * direction  # in float64, a few steps per solve: no drift to speak of
            relative = (size[:, None] * step).abs().amax(1) / (1 + beta.abs().amax(1))
            far = bool((relative[~done] > 1e-2).any() or (size[~done] < 1).any())
            done |= relative <= 1e-7
            if bool(done.all()):
                break
        else:
            raise ProbeError(f"logistic regression did not converge in {max_iter} Newton steps (non-finite features?)")
        solutions.append(beta.numpy().copy())
        steps.append(taken.numpy().copy())
    return np.stack(solutions), np.stack(steps)


#: The L-BFGS solver's tolerance: scikit-learn's default (1e-4 on the gradient of the mean loss; scaled to ours).
LBFGS_TOL = 1e-4


def lbfgs_logistic_path(
    X: np.ndarray,
    rows: list[np.ndarray],
    labels: list[np.ndarray],
    means: np.ndarray,
    scales: np.ndarray,
    Cs: np.ndarray,
    starts: Sequence[np.ndarray | None] | None = None,
    max_iter: int = 1000,
    tol: float = LBFGS_TOL,
    memory: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Solutions (steps, problems, dim + 1) at Cs (steps, problems) and the iterations each took, by batched L-BFGS.

    Problem k is scikit-learn's L2 logistic regression (C * sum log-loss + |coef|^2 / 2, intercept not penalized)
    on rows[k] of X standardized with means[k], scales[k]; coefficients are in that standardized space. All
    problems share X: each iteration is two float32 matmuls of X with the active problems' columns (logits, and
    the gradient) and elementwise work; the line search (backtracking, Armijo) moves the logits along a direction
    computed once. A problem stops when its largest gradient entry is below `tol` x C x its rows (scikit-learn's
    lbfgs criterion on its mean loss), and leaves the matmuls. Each step of Cs is warm started from the last.
    """
    n, dim = X.shape
    count = len(rows)
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    weight = torch.zeros((n, count), dtype=torch.float64)
    target = torch.zeros((n, count), dtype=torch.float64)
    beta = torch.zeros((count, dim + 1), dtype=torch.float64)
    for k, (part, y) in enumerate(zip(rows, labels, strict=True)):
        weight[part, k] = 1.0
        target[part, k] = torch.from_numpy(np.asarray(y, dtype=np.float64))
        start = None if starts is None else starts[k]
        if start is not None:
            beta[k] = torch.from_numpy(np.asarray(start, dtype=np.float64))
        else:  # the intercept alone: the solution under the strongest regularization, nearly
            rate = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
            beta[k, -1] = math.log(rate / (1 - rate))
    mean = torch.from_numpy(np.asarray(means, dtype=np.float64))
    scale = torch.from_numpy(np.asarray(scales, dtype=np.float64))
    sizes = weight.sum(0)
    solutions, taken = [], []
    for step_Cs in np.asarray(Cs, dtype=np.float64):
        C = torch.from_numpy(step_Cs)
        iterations = _lbfgs(features, weight, target, mean, scale, C, tol * C * sizes, beta, max_iter, memory)
        solutions.append(beta.numpy().copy())
        taken.append(iterations.numpy().copy())
    return np.stack(solutions), np.stack(taken)


def _lbfgs(
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    C: torch.Tensor,
    gtol: torch.Tensor,
    beta: torch.Tensor,
    max_iter: int,
    memory: int,
) -> torch.Tensor:
    """Minimize every problem from `beta` (updated in place); returns the iterations each took."""
    count, size = beta.shape
    iterations = torch.zeros(count, dtype=torch.long)
    active = torch.arange(count)
    # The active problems' columns and constants, contiguous; cut down when problems converge.
    weights, targets, Cs, means, scales = weight, target, C, mean, scale

    def logits_of(direction: torch.Tensor) -> torch.Tensor:
        """(rows, active) logits of standardized coefficients + intercepts `direction`: X v + c (affine)."""
        raw = direction[:, :-1] / scales
        offset = direction[:, -1] - (means * raw).sum(1)
        return (features @ raw.T.float()).double() + offset

    def objective(logits: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        loss = (weights * (nn.functional.softplus(logits) - targets * logits)).sum(0)
        return Cs * loss + 0.5 * (coefficients[:, :-1] ** 2).sum(1)

    def gradient_of(logits: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        residual = Cs * weights * (torch.sigmoid(logits) - targets)  # (rows, active)
        narrow = residual.float()
        # X^T r in the layout that is fast for this many columns: MKL's sgemm takes 5-25x longer for X^T r than for
        # (r^T X)^T with 2 to 11 columns (100-570 ms against 13-22 ms at 10,000 x 3,584 on 2 cores), and ~1.3x less
        # from 12 up (measured). The same products either way.
        raw = (narrow.T @ features if narrow.shape[1] < 12 else (features.T @ narrow).T).double()  # (active, dim)
        total = residual.sum(0)
        coefficient = (raw - means * total[:, None]) / scales + coefficients[:, :-1]
        return torch.cat([coefficient, total[:, None]], 1)

    current = beta.clone()
    logits = logits_of(current)
    value, gradient = objective(logits, current), gradient_of(logits, current)
    steps = torch.zeros((memory, count, size), dtype=torch.float64)
    changes = torch.zeros((memory, count, size), dtype=torch.float64)
    inverse_curvature = torch.zeros((memory, count), dtype=torch.float64)  # 1 / (s . y); 0: no pair stored
    scaling = 1.0 / gradient.norm(dim=1).clamp_min(1.0)  # the first direction: the gradient, of length <= 1
    for iteration in range(max_iter):
        converged = gradient.abs().amax(1) <= gtol[active]
        if bool(converged.any()):
            beta[active[converged]] = current[converged]
            stay = ~converged
            active, current, logits, value, gradient, scaling = (
                active[stay], current[stay], logits[:, stay], value[stay], gradient[stay], scaling[stay]
            )  # fmt: skip
            steps, changes, inverse_curvature = steps[:, stay], changes[:, stay], inverse_curvature[:, stay]
            weights, targets = weight[:, active].contiguous(), target[:, active].contiguous()
            Cs, means, scales = C[active], mean[active], scale[active]
        if len(active) == 0:
            return iterations
        iterations[active] += 1
        # Two-loop recursion over the stored pairs, newest first.
        direction = -gradient
        alphas = []
        for slot in [(iteration - 1 - back) % memory for back in range(memory)]:
            alpha = inverse_curvature[slot] * (steps[slot] * direction).sum(1)
            direction = direction - alpha[:, None] * changes[slot]
            alphas.append((slot, alpha))
        direction = direction * scaling[:, None]
        for slot, alpha in reversed(alphas):
            correction = inverse_curvature[slot] * (changes[slot] * direction).sum(1)
            direction = direction + (alpha - correction)[:, None] * steps[slot]
        slope = (gradient * direction).sum(1)
        uphill = slope >= 0  # a stale curvature pair: restart that problem from the gradient
        if bool(uphill.any()):
            direction[uphill] = -gradient[uphill] / gradient[uphill].norm(dim=1, keepdim=True).clamp_min(1.0)
            slope = (gradient * direction).sum(1)
            inverse_curvature[:, uphill] = 0.0
        moved = logits_of(direction)  # affine in the coefficients: the logits' change along the direction
        size_ = torch.ones(len(active), dtype=torch.float64)
        for _ in range(40):
            trial = objective(logits + size_ * moved, current + size_[:, None] * direction)
            accepted = trial <= value + 1e-4 * size_ * slope
            if bool(accepted.all()):
                break
            size_ = torch.where(accepted, size_, size_ / 2)
        else:  # 40 halvings: a step of ~1e-12, taken as it is
            trial = objective(logits + size_ * moved, current + size_[:, None] * direction)
        step = size_[:, None] * direction
        current = current + step
        # The logits move in float64 along float32 matmuls: recomputed every 25 iterations so no error builds up.
        logits = logits_of(current) if (iteration + 1) % 25 == 0 else logits + size_ * moved
        new_value, new_gradient = trial, gradient_of(logits, current)  # trial: the accepted steps' values
        change = new_gradient - gradient
        curvature = (step * change).sum(1)
        slot = iteration % memory
        valid = curvature > 1e-10 * step.norm(dim=1) * change.norm(dim=1)
        steps[slot], changes[slot] = step, change
        inverse_curvature[slot] = torch.where(valid, 1.0 / curvature.clamp_min(1e-300), torch.zeros_like(curvature))
        scaling = torch.where(valid, curvature / (change * change).sum(1).clamp_min(1e-300), scaling)
        value, gradient = new_value, new_gradient
    warnings.warn(  # as scikit-learn does: the last iterate, with a warning that names the limit
        f"logistic regression: {len(active)} problem(s) did not reach the tolerance in {max_iter} L-BFGS iterations",
        ConvergenceWarning,
        stacklevel=3,
    )
    beta[active] = current
    return iterations


def build_mlp(input_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """The paper's probe body: [Linear-ReLU-BatchNorm-Dropout] per hidden size, then Linear(.,1) to a logit."""
    layers: list[nn.Module] = []
    previous = input_dim
    for size in hidden:
        layers += [nn.Linear(previous, size), nn.ReLU(), nn.BatchNorm1d(size), nn.Dropout(dropout)]
        previous = size
    layers.append(nn.Linear(previous, 1))
    return nn.Sequential(*layers)


class MLPProbe(ClassifierMixin, BaseEstimator):
    """The HALP paper's MLP probe on z-scored inputs; BCE on logits (the paper's Sigmoid+BCELoss, stabler).

    Trained by `train_mlps` (the batched trainer every fit of a study shares): Adam, `batch_size` rows per step,
    at most `epochs` epochs, and early stopping on a held-out part of the training rows (`validation_fraction`,
    stratified and grouped by image when `fit` gets `groups`) after `patience` epochs without a better held-out
    loss, keeping the best epoch's weights. `validation_fraction=None` trains every epoch on all rows.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (512, 256, 128),
        dropout: float = 0.3,
        lr: float = 1e-3,
        batch_size: int = MLP_BATCH_SIZE,
        epochs: int = 50,
        random_state: int = 42,
        device: str = "cpu",
        threads: int | None = None,
        validation_fraction: float | None = 0.1,
        patience: int | None = MLP_PATIENCE,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.random_state = random_state
        self.device = device
        self.threads = threads
        self.validation_fraction = validation_fraction
        self.patience = patience

    def fit(self, X: Any, y: Any, groups: Any = None) -> MLPProbe:
        """Train on every row; `groups` (e.g. image ids) keeps each group on one side of the early-stopping split."""
        X, y = _as_features(X), _check_binary(y)
        [trained] = train_mlps(X, [Fit(np.arange(len(y)), y)], self, None if groups is None else np.asarray(groups))
        return self._take(trained)

    def fit_batch(self, X: Any, fits: Sequence[Fit], groups: Any = None) -> list[MLPProbe]:
        """One fitted copy of this probe per fit (`fit.rows` of X, labels `fit.y`), trained together."""
        X = _as_features(X)
        for fit in fits:
            _check_binary(np.asarray(fit.y)[fit.rows])
        trained = train_mlps(X, fits, self, None if groups is None else np.asarray(groups))
        return [clone(self)._take(one) for one in trained]

    def _take(self, trained: TrainedMLP) -> MLPProbe:
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = trained.net[0].in_features
        self.scaler_ = trained.scaler
        self.net_ = trained.net.to(_resolve_device(self.device)).eval()
        self.loss_history_ = trained.loss_history
        self.validation_loss_history_ = trained.validation_loss_history
        self.best_epoch_ = trained.best_epoch
        self.held_out_ = trained.held_out
        self.rows_per_epoch_ = trained.rows_per_epoch
        return self

    @torch.inference_mode()
    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "net_")
        standardized = self.scaler_.transform(_as_features(X)).astype(np.float32)
        device = next(self.net_.parameters()).device
        self.net_.eval()
        with _torch_threads(self.threads):
            chunks = [
                self.net_(torch.from_numpy(standardized[start : start + 4096]).to(device)).squeeze(1).cpu()
                for start in range(0, len(standardized), 4096)
            ]
        return torch.cat(chunks).double().numpy() if chunks else np.zeros(0)

    def predict_proba(self, X: Any) -> np.ndarray:
        return _proba_columns(expit(self.decision_function(X)))

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= THRESHOLD).astype(np.int64)


@dataclass(frozen=True)
class Fit:
    """One fit of a study: train on `rows` of the feature matrix with the labels `y[rows]` (`y` holds every row's).

    `held_out`: the rows of `rows` the MLP's early stopping watches, if the caller chooses them; None (as a study
    leaves it): the trainer draws them with `early_stopping_split`.
    """

    rows: np.ndarray
    y: np.ndarray
    held_out: np.ndarray | None = None


def early_stopping_split(
    rows: np.ndarray, y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(trained, held out): the rows of a training fold the optimizer sees, and the part early stopping watches.

    A seeded split (`train_test_split`) of the fold's own rows, so it never reaches into a test fold, holding out
    ceil(fraction x rows) of them, at least one. With `groups` it splits the images instead (ceil(fraction x
    images), at least one), so no image is on both sides. It is stratified (by label; with groups by what each
    image's labels are: all 0, all 1, mixed, a stratum of a single image joining the largest) wherever the fold
    allows it: every stratum with two members and as many held-out as strata. A fold too small for that (a few
    dozen rows) gets an unstratified seeded split: the held-out loss needs no particular class. (Not
    `StratifiedGroupKFold`: its greedy assignment costs ~0.5 s per split of a thousand images.)
    """
    rows, y = np.asarray(rows), np.asarray(y)
    if groups is None:
        items, strata = rows, y[rows].astype(np.int64)
    else:
        images, image_of_row = np.unique(np.asarray(groups)[rows], return_inverse=True)
        positives = np.bincount(image_of_row, weights=y[rows], minlength=len(images))
        counts = np.bincount(image_of_row, minlength=len(images))
        strata = np.where(positives == 0, 0, np.where(positives == counts, 2, 1))
        sizes = np.bincount(strata, minlength=3)
        strata[sizes[strata] < 2] = int(np.argmax(sizes))
        items = np.arange(len(images))
    held_count = max(1, math.ceil(fraction * len(items)))  # what train_test_split takes from a fraction
    if held_count >= len(items):
        raise ProbeError(
            f"early stopping holds out {fraction:g} of each training fold and cannot: a fold has {len(items)} "
            f"{'rows' if groups is None else 'images'}; pass validation_fraction=None to train every epoch on all rows"
        )
    kinds, members = np.unique(strata, return_counts=True)
    stratifiable = members.min() >= 2 and len(kinds) <= held_count <= len(items) - len(kinds)
    trained_items, held_items = train_test_split(
        items, test_size=held_count, stratify=strata if stratifiable else None, random_state=seed
    )
    if groups is None:
        return np.sort(trained_items), np.sort(held_items)
    held = np.isin(image_of_row, held_items)
    return rows[~held], rows[held]


@dataclass
class TrainedMLP:
    """One fit's result from `train_mlps`: `build_mlp`'s network, its standardization, its history."""

    net: nn.Sequential
    scaler: StandardScaler
    loss_history: list[float]
    validation_loss_history: list[float]
    best_epoch: int
    held_out: np.ndarray
    #: Rows the optimizer took per epoch (whole batches of the trained rows).
    rows_per_epoch: int


class _FirstLayer(torch.autograd.Function):
    """The stacked networks' first Linear layer in a training step, bias (K, out, 1) + weight (K, out, dim) @ inputs
    (K, dim, rows), whose backward writes the weight's gradient into `weight_gradient`, a buffer the stack keeps
    (autograd gets None for the weight; `_StackedMLPs.gradients` hands the buffer to the optimizer).

    Why: autograd allocates a fresh gradient per step, and on a CPU a fresh tensor of tens of MB (the study's:
    11 x 512 x 3,584 floats, 80 MB) is a fresh mapping whose page faults cost more than the matmul that fills it
    (78 ms against 31 ms per step, measured). The arithmetic is autograd's: the same bmm, into a buffer.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, bias: torch.Tensor, weight: torch.Tensor, inputs: torch.Tensor, weight_gradient: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, inputs)
        ctx.weight_gradient = weight_gradient
        return torch.baddbmm(bias, weight, inputs)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, inputs = ctx.saved_tensors
        torch.bmm(gradient, inputs.transpose(1, 2), out=ctx.weight_gradient)
        inputs_gradient = torch.bmm(weight.transpose(1, 2), gradient) if ctx.needs_input_grad[2] else None
        return gradient.sum(2, keepdim=True), None, inputs_gradient, None


class _StackedMLPs:
    """K networks of `build_mlp`'s shape as stacked tensors, trained as one program.

    Activations are kept feature-major, (K, width, rows): each Linear layer is one batched matmul of the stacked
    (K, out, in) weights, and each BatchNorm is one `batch_norm` call over K x width channels, so every network
    is normalized over its own batch and keeps its own running statistics (PyTorch's rule, in PyTorch's kernel);
    dropout multiplies by a 0/1 mask scaled by 1/(1-p). Network k computes what `build_mlp`'s network holding its
    tensors computes (`network` builds that one; tests/test_probe.py compares the two).
    """

    def __init__(self, net: nn.Sequential, copies: int, device: torch.device) -> None:
        linears = [layer for layer in net if isinstance(layer, nn.Linear)]
        norms = [layer for layer in net if isinstance(layer, nn.BatchNorm1d)]
        self.dim = linears[0].in_features
        self.hidden = tuple(layer.out_features for layer in linears[:-1])
        self.dropout = next((layer.p for layer in net if isinstance(layer, nn.Dropout)), 0.0)
        self.momentum = norms[0].momentum if norms else 0.1
        self.eps = norms[0].eps if norms else 1e-5

        def stacked(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(device, torch.float32).expand(copies, *tensor.shape).contiguous()

        self.weights = [stacked(layer.weight) for layer in linears]  # (K, out, in)
        self.biases = [stacked(layer.bias[:, None]) for layer in linears]  # (K, out, 1)
        self.gammas = [stacked(layer.weight) for layer in norms]  # (K, width)
        self.betas = [stacked(layer.bias) for layer in norms]
        self.running_means = [stacked(layer.running_mean) for layer in norms]
        self.running_vars = [stacked(layer.running_var) for layer in norms]
        for tensor in self.parameters():
            tensor.requires_grad_(True)
        # The first layer's weight gradient, written by `_FirstLayer` in place each training step (see there).
        self.first_gradient = torch.empty_like(self.weights[0])

    def parameters(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases, *self.gammas, *self.betas]

    def gradients(self) -> list[torch.Tensor]:
        """The parameters' gradients after a training step's backward, in `parameters` order."""
        return [self.first_gradient, *(tensor.grad for tensor in self.parameters()[1:])]

    def clear_gradients(self) -> None:
        for tensor in self.parameters():
            tensor.grad = None

    def tensors(self) -> list[torch.Tensor]:
        return [*self.parameters(), *self.running_means, *self.running_vars]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the networks at `index` (the others stopped)."""
        for group in (self.weights, self.biases, self.gammas, self.betas):
            group[:] = [tensor.detach()[index].requires_grad_(True) for tensor in group]
        for group in (self.running_means, self.running_vars):
            group[:] = [tensor[index] for tensor in group]
        self.first_gradient = torch.empty_like(self.weights[0])

    def forward(
        self, inputs: torch.Tensor, masks: list[torch.Tensor | None] | None = None, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (K, rows) of inputs (K, dim, rows). `masks` (dropout per hidden layer, (width, rows) or None) means
        a training step: batch statistics, running statistics updated. `select`: only those networks (evaluation)."""

        def chosen(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if select is None else tensor[select]

        hidden = inputs
        for layer in range(len(self.hidden)):
            if layer == 0 and masks is not None and select is None:
                hidden = _FirstLayer.apply(self.biases[0], self.weights[0].detach(), hidden, self.first_gradient)
            else:
                hidden = torch.baddbmm(chosen(self.biases[layer]), chosen(self.weights[layer]), hidden)
            hidden = hidden.relu()
            count, width, rows = hidden.shape
            hidden = nn.functional.batch_norm(
                hidden.reshape(1, count * width, rows),
                chosen(self.running_means[layer]).reshape(-1),
                chosen(self.running_vars[layer]).reshape(-1),
                chosen(self.gammas[layer]).reshape(-1),
                chosen(self.betas[layer]).reshape(-1),
                training=masks is not None,
                momentum=self.momentum,
                eps=self.eps,
            ).reshape(count, width, rows)
            if masks is not None and masks[layer] is not None:
                hidden = hidden * masks[layer]
        return torch.baddbmm(chosen(self.biases[-1]), chosen(self.weights[-1]), hidden)[:, 0, :]

    def snapshot(self, position: int) -> list[torch.Tensor]:
        return [tensor[position].detach().clone() for tensor in self.tensors()]

    def network(self, snapshot: list[torch.Tensor], steps: int) -> nn.Sequential:
        """`build_mlp`'s network holding one snapshot (weights, BatchNorm statistics, the steps it took)."""
        net = build_mlp(self.dim, self.hidden, self.dropout)
        linears, norms = len(self.hidden) + 1, len(self.hidden)
        weights, biases = snapshot[:linears], snapshot[linears : 2 * linears]
        rest = snapshot[2 * linears :]
        gammas, betas, means, variances = (rest[i * norms : (i + 1) * norms] for i in range(4))
        state: dict[str, torch.Tensor] = {}
        for layer in range(linears):
            state[f"{4 * layer}.weight"], state[f"{4 * layer}.bias"] = weights[layer], biases[layer][:, 0]
        for layer in range(norms):
            prefix = f"{4 * layer + 2}."
            state[prefix + "weight"], state[prefix + "bias"] = gammas[layer], betas[layer]
            state[prefix + "running_mean"], state[prefix + "running_var"] = means[layer], variances[layer]
            state[prefix + "num_batches_tracked"] = torch.tensor(steps, dtype=torch.long)
        net.load_state_dict({name: tensor.detach().cpu() for name, tensor in state.items()})
        return net.eval()


def train_mlps(
    X: np.ndarray, fits: Sequence[Fit], probe: MLPProbe, groups: np.ndarray | None = None
) -> list[TrainedMLP]:
    """One `build_mlp` network per fit, all trained in one batched program with `probe`'s settings.

    Each fit gets what it would get alone (`train_mlps(X, [fit], probe)`): the same initial weights, row order and
    dropout masks, from generators seeded with `random_state`; the fits only share the matmuls. A step takes
    `batch_size` rows of every fit (a seeded permutation of its trained rows per epoch; rows that do not fill a last
    batch wait for the next epoch). With early stopping (`validation_fraction` and `patience`), each fit holds out
    `early_stopping_split` of its own rows, computes its loss there after each of its epochs, stops `patience`
    epochs after its best, and keeps the best epoch's weights; a stopped fit leaves the program.
    """
    X = _as_features(X)
    device = _resolve_device(probe.device)
    early = probe.validation_fraction is not None and probe.patience is not None
    parts = [
        (np.asarray(fit.rows), np.zeros(0, dtype=np.int64))
        if not early
        else (np.setdiff1d(fit.rows, fit.held_out), np.asarray(fit.held_out))
        if fit.held_out is not None
        else early_stopping_split(fit.rows, fit.y, groups, probe.validation_fraction, probe.random_state)
        for fit in fits
    ]
    if early and any(len(held) == 0 or len(trained) < 2 for trained, held in parts):
        raise ProbeError(
            f"early stopping holds out {probe.validation_fraction:g} of each fit's rows, and a fit of "
            f"{min(len(fit.rows) for fit in fits)} rows has too few for that; pass validation_fraction=None"
        )
    batch = min(probe.batch_size, *(len(trained) for trained, _ in parts))
    if batch < 2:
        raise ProbeError(f"the MLP probe trains on batches of at least 2 rows (BatchNorm); a fit has {batch}")
    scalers = fit_scalers(X, [fit.rows for fit in fits])
    with _torch_threads(probe.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(probe.random_state)  # the initial weights: build_mlp's default initialization, seeded
        initial = build_mlp(X.shape[1], tuple(probe.hidden), probe.dropout)
        stack = _StackedMLPs(initial, len(fits), device)
        return _train_stacked(stack, X, fits, parts, scalers, probe, batch, early)


def _train_stacked(
    stack: _StackedMLPs,
    X: np.ndarray,
    fits: Sequence[Fit],
    parts: list[tuple[np.ndarray, np.ndarray]],
    scalers: list[StandardScaler],
    probe: MLPProbe,
    batch: int,
    early: bool,
) -> list[TrainedMLP]:
    device = stack.weights[0].device
    inputs = torch.from_numpy(X).to(device)
    labels = torch.from_numpy(np.stack([np.asarray(fit.y, dtype=np.float32) for fit in fits])).to(device)
    means = torch.from_numpy(np.stack([s.mean_ for s in scalers]).astype(np.float32)[:, None, :]).to(device)
    scales = torch.from_numpy(np.stack([s.scale_ for s in scalers]).astype(np.float32)[:, None, :]).to(device)
    steps_per_epoch = [len(trained) // batch for trained, _ in parts]
    # Each fit's row order for all its epochs, drawn up front from its own generator, as a lone fit draws it.
    orders = []
    for (trained, _), steps in zip(parts, steps_per_epoch, strict=True):
        generator = torch.Generator().manual_seed(probe.random_state)
        epochs = [torch.randperm(len(trained), generator=generator)[: steps * batch] for _ in range(probe.epochs)]
        orders.append(torch.from_numpy(trained)[torch.cat(epochs)])
    longest = max(len(order) for order in orders)
    order_table = torch.zeros((len(orders), longest), dtype=torch.long)
    for fit, order in enumerate(orders):
        order_table[fit, : len(order)] = order
    order_table = order_table.to(device)
    dropout = torch.Generator(device=device).manual_seed(probe.random_state)
    keep_probability = 1.0 - stack.dropout
    watch = _HeldOut([part for _, part in parts], inputs, labels, means, scales) if early else None

    optimizer = _StackedAdam(stack.parameters(), probe.lr)
    batch_buffer = torch.empty((len(fits), batch, inputs.shape[1]), device=device)
    active = list(range(len(fits)))  # the fit of each network in the stack, in stack order
    loss_sums = torch.zeros(len(fits), device=device)
    losses: list[list[float]] = [[] for _ in fits]
    validation: list[list[float]] = [[] for _ in fits]
    best: list[tuple[float, int, list[torch.Tensor], int] | None] = [None] * len(fits)
    finished: dict[int, tuple[list[torch.Tensor], int]] = {}
    step = 0
    while active:
        index = torch.tensor(active, device=device)
        rows = order_table[index, step * batch : (step + 1) * batch]
        # The standardized batch, (K, dim, rows) as a view of the reused (K, rows, dim) buffer: a fresh one per step
        # costs page faults (see _FirstLayer); the first layer's backward has used the last step's by now.
        standardized = batch_buffer[: len(active)]
        torch.index_select(inputs, 0, rows.reshape(-1), out=standardized.view(-1, inputs.shape[1]))
        features = standardized.sub_(means[index]).div_(scales[index]).transpose(1, 2)
        masks = [
            (torch.rand((width, batch), generator=dropout, device=device) < keep_probability).float() / keep_probability
            if stack.dropout > 0
            else None
            for width in stack.hidden
        ]
        per_fit = nn.functional.binary_cross_entropy_with_logits(
            stack.forward(features, masks), torch.gather(labels[index], 1, rows), reduction="none"
        ).mean(1)
        per_fit.sum().backward()  # the sum's gradient for each network is that of its own mean loss
        optimizer.step(stack.parameters(), stack.gradients())
        stack.clear_gradients()
        loss_sums[index] += per_fit.detach()
        step += 1

        due = [position for position, fit in enumerate(active) if step % steps_per_epoch[fit] == 0]
        if not due:
            continue
        due_fits = [active[position] for position in due]
        epoch_losses = (
            loss_sums[due_fits] / torch.tensor([steps_per_epoch[f] for f in due_fits], device=device)
        ).tolist()
        loss_sums[due_fits] = 0.0
        held_out_losses = watch.losses(stack, due, due_fits) if watch is not None else None
        stopped = []
        for slot, (position, fit) in enumerate(zip(due, due_fits, strict=True)):
            losses[fit].append(epoch_losses[slot])
            epoch = len(losses[fit])
            if held_out_losses is not None:
                validation[fit].append(held_out_losses[slot])
                if best[fit] is None or held_out_losses[slot] < best[fit][0]:
                    best[fit] = (held_out_losses[slot], epoch, stack.snapshot(position), step)
                if epoch - best[fit][1] >= probe.patience:
                    stopped.append(position)
                    continue
            if epoch == probe.epochs:
                stopped.append(position)
        if stopped:
            for position in stopped:
                fit = active[position]
                # With early stopping the best epoch's weights, else the last epoch's.
                finished[fit] = best[fit][2:] if best[fit] is not None else (stack.snapshot(position), step)
            staying = [position for position in range(len(active)) if position not in stopped]
            active = [active[position] for position in staying]
            if active:
                stack.keep(torch.tensor(staying, device=device))
                optimizer.keep(torch.tensor(staying, device=device))
    return [
        TrainedMLP(
            net=stack.network(*finished[fit]),
            scaler=scalers[fit],
            loss_history=losses[fit],
            validation_loss_history=validation[fit],
            best_epoch=best[fit][1] if best[fit] is not None else len(losses[fit]),
            held_out=parts[fit][1],
            rows_per_epoch=steps_per_epoch[fit] * batch,
        )
        for fit in range(len(fits))
    ]


class _HeldOut:
    """The early-stopping rows of every fit, standardized and padded to one (fits, rows, dim) block."""

    def __init__(
        self,
        parts: list[np.ndarray],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        means: torch.Tensor,
        scales: torch.Tensor,
    ) -> None:
        longest = max(len(part) for part in parts)
        device = inputs.device
        rows = torch.zeros((len(parts), longest), dtype=torch.long, device=device)
        self.weights = torch.zeros((len(parts), longest), device=device)
        for fit, part in enumerate(parts):
            rows[fit, : len(part)] = torch.from_numpy(part).to(device)
            self.weights[fit, : len(part)] = 1.0 / len(part)
        self.features = ((inputs[rows] - means) / scales).transpose(1, 2).contiguous()  # (K, dim, rows)
        self.targets = torch.gather(labels, 1, rows)

    @torch.no_grad()
    def losses(self, stack: _StackedMLPs, positions: list[int], fits: list[int]) -> list[float]:
        """Mean BCE on each fit's held-out rows, of the stack's networks at `positions` (evaluation mode)."""
        logits = stack.forward(self.features[fits], select=torch.tensor(positions, device=self.features.device))
        per_row = nn.functional.binary_cross_entropy_with_logits(logits, self.targets[fits], reduction="none")
        return (per_row * self.weights[fits]).sum(1).tolist()


class _StackedAdam:
    """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no weight decay) for stacked networks, one row each.

    The update is element-wise, so on stacked tensors it is every network's own Adam; `keep` drops the moments of
    stopped networks with them (tests/test_probe.py compares it with torch.optim.Adam). Not torch.optim.Adam itself:
    its first use imports torch._dynamo, seconds per worker process on a small machine. The step is the kernel
    torch.optim.Adam(fused=True) runs (`torch._fused_adam_`, one pass over the tensors, several times faster than
    the element-wise operations on CPU), or those operations where this torch has no such kernel for the device.
    """

    def __init__(self, parameters: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.lr, self.betas, self.eps = lr, betas, 1e-8
        self.first = [torch.zeros_like(tensor) for tensor in parameters]
        self.second = [torch.zeros_like(tensor) for tensor in parameters]
        self.steps = 0
        self.fused = hasattr(torch, "_fused_adam_")

    @torch.no_grad()
    def step(self, parameters: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
        self.steps += 1
        if self.fused:
            try:
                self._fused(parameters, gradients)
            except (RuntimeError, TypeError, NotImplementedError):  # no fused kernel for this device or dtype
                self.fused = False
        if not self.fused:
            self._element_wise(parameters, gradients)

    def _fused(self, parameters: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
        steps = [torch.tensor(float(self.steps), device=tensor.device) for tensor in parameters]
        beta1, beta2 = self.betas
        torch._fused_adam_(  # type: ignore[attr-defined]
            parameters, gradients, self.first, self.second, [], steps,
            lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
        )  # fmt: skip

    def _element_wise(self, parameters: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.steps)
        correction2 = math.sqrt(1 - beta2**self.steps)
        for tensor, gradient, first, second in zip(parameters, gradients, self.first, self.second, strict=True):
            first.lerp_(gradient, 1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            tensor.addcdiv_(first, (second.sqrt() / correction2).add_(self.eps), value=-step_size)

    def keep(self, index: torch.Tensor) -> None:
        self.first = [moment[index] for moment in self.first]
        self.second = [moment[index] for moment in self.second]


def make_probe(kind: str, seed: int = 42, **params: Any) -> LogRegProbe | MLPProbe:
    if kind == "logreg":
        return LogRegProbe(random_state=seed, **params)
    if kind == "mlp":
        return MLPProbe(random_state=seed, **params)
    raise ParameterError("probe", f"unknown probe type {kind!r}; choose logreg, mlp or both")


# ----- saving and loading (safetensors + JSON, no pickle) ---------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) or math.isinf(float(value)) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def save_probe(probe: LogRegProbe | MLPProbe, path_stem: str | Path, meta: dict[str, Any]) -> None:
    """Write `<stem>.safetensors` (standardization and weights) and `<stem>.json` (config and meta)."""
    from safetensors.torch import save_file

    check_is_fitted(probe, "scaler_")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "standardize.mean": torch.from_numpy(np.asarray(probe.scaler_.mean_, dtype=np.float64)),
        "standardize.scale": torch.from_numpy(np.asarray(probe.scaler_.scale_, dtype=np.float64)),
    }
    if isinstance(probe, LogRegProbe):
        kind = "logreg"
        tensors["logreg.coef"] = torch.from_numpy(probe.coef_.copy())
        tensors["logreg.intercept"] = torch.tensor([probe.intercept_], dtype=torch.float64)
        fitted: dict[str, Any] = {"C_": probe.C_}
    elif isinstance(probe, MLPProbe):
        kind = "mlp"
        for name, tensor in probe.net_.state_dict().items():
            tensors[f"mlp.{name}"] = tensor.detach().cpu().contiguous()
        fitted = {
            "loss_history_": probe.loss_history_,
            "validation_loss_history_": probe.validation_loss_history_,
            "best_epoch_": probe.best_epoch_,
        }
    else:
        raise TypeError(f"cannot save a {type(probe).__name__}; expected LogRegProbe or MLPProbe")
    threshold = float(meta.get("threshold", THRESHOLD))
    config = {
        "format": PROBE_FORMAT,
        "probe_type": kind,
        "params": probe.get_params(),
        "input_dim": int(probe.n_features_in_),
        "standardization": "z = (x - standardize.mean) / standardize.scale, fitted on the training rows",
        "threshold": threshold,
        "fitted": fitted,
        "meta": {**meta, "threshold": threshold},
    }
    weights = stem.with_name(stem.name + ".safetensors")
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": PROBE_FORMAT, "probe_type": kind})
    write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps(_json_safe(config), indent=2, sort_keys=True))


def load_probe(path_stem: str | Path, device: str = "cpu") -> tuple[LogRegProbe | MLPProbe, dict[str, Any]]:
    """The probe saved by `save_probe`, ready to predict, and its meta dictionary."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(path_stem)
    config_path, weights_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    retrain = "rerun `halp probe` on the run to train and save it again"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDamagedError(f"{config_path} is damaged (not JSON: {err}); {retrain}") from err
    if not isinstance(config, dict) or config.get("format") != PROBE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ProbeError(f"{config_path} is not a halp probe (format {found!r})")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as err:
        raise RunDamagedError(f"{weights_path} is damaged ({err}); {retrain}") from err
    try:
        return _probe_from(config, tensors, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a field or tensor missing, of another shape
        raise RunDamagedError(
            f"{config_path} and {weights_path.name} do not make a whole probe ({type(err).__name__}: {err}); {retrain}"
        ) from err


def _probe_from(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], device: str
) -> tuple[LogRegProbe | MLPProbe, dict[str, Any]]:
    """A probe from its saved configuration and tensors (`load_probe` reads and checks the files)."""
    params = dict(config["params"])
    scaler = StandardScaler()
    scaler.mean_ = tensors["standardize.mean"].numpy()
    scaler.scale_ = tensors["standardize.scale"].numpy()
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = config["input_dim"]
    probe: LogRegProbe | MLPProbe
    if config["probe_type"] == "logreg":
        probe = LogRegProbe(**params)
        probe.coef_ = tensors["logreg.coef"].numpy()
        probe.intercept_ = float(tensors["logreg.intercept"][0])
        probe.C_ = float(config["fitted"]["C_"])
    elif config["probe_type"] == "mlp":
        params["hidden"] = tuple(params["hidden"])
        params["device"] = device
        probe = MLPProbe(**params)
        net = build_mlp(config["input_dim"], params["hidden"], params["dropout"])
        state = {name.removeprefix("mlp."): tensor for name, tensor in tensors.items() if name.startswith("mlp.")}
        net.load_state_dict(state)
        probe.net_ = net.to(_resolve_device(device)).eval()
        probe.loss_history_ = list(config["fitted"].get("loss_history_", []))
        # Probes saved before early stopping have no held-out history; their best epoch is their last.
        probe.validation_loss_history_ = list(config["fitted"].get("validation_loss_history_", []))
        probe.best_epoch_ = int(config["fitted"].get("best_epoch_", len(probe.loss_history_)))
    else:
        raise ProbeError(f"unknown probe type {config['probe_type']!r} in a halp probe's .json")
    probe.scaler_ = scaler
    probe.classes_ = np.array([0, 1])
    probe.n_features_in_ = config["input_dim"]
    return probe, config["meta"]


def probe_stem(run_dir: str | Path, feature: str, kind: str) -> Path:
    """Where the final probe of `feature` x `kind` lives: probes/models/<feature with / -> __>__<kind>."""
    return probes_dir(run_dir) / PROBE_MODELS_DIR / f"{feature.replace('/', '__')}__{kind}"


# ----- evaluation --------------------------------------------------------------------------------
Split = tuple[np.ndarray, np.ndarray]


def make_splits(
    y: np.ndarray, groups: np.ndarray | None, folds: int = 5, split: float | None = None, seed: int = 42
) -> list[Split]:
    """(train, test) index pairs: stratified k-fold, or one stratified split of `split` test fraction.

    With `groups`, no group (image) is on both sides of any split.
    """
    indices = np.arange(len(y))
    minority = int(min(np.bincount(y, minlength=2)))
    if split is not None:
        if not 0.0 < split < 1.0:
            raise ParameterError("split", f"{split}: expected a test fraction between 0 and 1, e.g. 0.2")
        if minority < 2:
            raise ProbeError(f"a stratified split needs at least 2 examples of each class; the minority has {minority}")
        if groups is None:
            train, test = train_test_split(indices, test_size=split, stratify=y, random_state=seed)
            return [(np.sort(train), np.sort(test))]
        # The grouped analogue of one stratified split: the first fold of a stratified group k-fold.
        n_splits = max(2, round(1.0 / split))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [next(iter(splitter.split(indices, y, groups)))]
    if folds < 2:
        raise ParameterError("folds", f"{folds}: need at least 2 folds (or split= for one train/test split)")
    if minority < folds:
        raise ProbeError(
            f"{folds}-fold stratified CV needs at least {folds} examples of each class; the minority class has "
            f"{minority}. Use a smaller folds= or label more data."
        )
    if groups is None:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(indices, y))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(indices, y, groups))


def out_of_fold(
    probes: Sequence[LogRegProbe | MLPProbe], X: np.ndarray, y: np.ndarray, splits: Sequence[Split]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Out-of-fold P(hallucinated) (NaN for rows in no test set), each row's fold, and per-fold metrics, of the
    probes fitted on each split's training rows (in the order of `splits`)."""
    scores = np.full(len(y), np.nan)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    per_fold = []
    for fold, (probe, (_, test)) in enumerate(zip(probes, splits, strict=True)):
        scores[test] = probe.predict_proba(X[test])[:, 1]
        fold_of[test] = fold
        per_fold.append(metric_values(y[test], scores[test]))
    return scores, fold_of, per_fold


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


# ----- a run -------------------------------------------------------------------------------------
def _run_paths(run_dir: str | Path) -> tuple[Path, Path]:
    from halp.layout import features_file

    path = features_file(run_dir)
    return path.parent, path


def _load_labels(run_dir: Path, labels: str | Path | pd.DataFrame | None, label_column: str | None) -> LabelTable:
    """The label table of a probe run: `labels`, else RUN_DIR/labels.csv (read by halp.label.read_labels)."""
    if labels is None:
        path = labels_file(run_dir)
        if not path.is_file():
            raise MissingInputError(
                f"the run has no labels ({path} does not exist): label it first with `halp label {run_dir}` (rules, or "
                "--labels TABLE to import your own), or pass a label table as labels="
            )
        labels = path
    elif not isinstance(labels, pd.DataFrame) and not Path(labels).is_file():
        raise MissingInputError(f"labels={labels}: no such file")
    return read_labels(labels, label_column)


@dataclass(frozen=True)
class ProbeSettings:
    """How `train_probes` evaluates: probe types, validation scheme, seed, intervals, where the MLP trains."""

    probe: str = "logreg"
    folds: int = 5
    split: float | None = None
    group_by: str | None = None
    group_by_image: bool = True
    seed: int = 42
    bootstrap: int = 1000
    device: str = "cpu"
    threads: int | None = None
    #: Processes evaluating feature x probe cells at once (a process pool). Every result is the same for any value:
    #: each one's seeds are its own, and a worker runs with `threads` (1 when None and jobs > 1).
    jobs: int = 1
    #: Extra constructor arguments per probe type, e.g. {"mlp": {"epochs": 5}}.
    probe_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        kinds = list(PROBE_TYPES) if self.probe == "both" else [self.probe]
        if any(kind not in PROBE_TYPES for kind in kinds):
            raise ParameterError("probe", f"{self.probe!r}: choose logreg, mlp or both")
        return kinds

    def template(self, kind: str) -> Any:
        params = self.probe_params.get(kind, {})
        if kind == "mlp":
            params = {"device": self.device, "threads": self.threads, **params}
        return make_probe(kind, self.seed, **params)


@dataclass
class ProbeData:
    """The labelled rows of a run, what they are labelled with, and the splits every feature is evaluated on."""

    run_dir: Path
    features_path: Path
    features: list[str]
    attrs: dict[str, Any]
    n_rows: int
    #: Row indices in features.h5 of the labelled rows, their question_ids and labels.
    rows: np.ndarray
    kept_ids: list[str]
    y: np.ndarray
    labels: LabelTable
    grouped: bool
    splits: list[tuple[np.ndarray, np.ndarray]]
    #: The control: the same pipeline on labels shuffled once (seeded); its splits follow the shuffled labels.
    y_control: np.ndarray
    control_splits: list[tuple[np.ndarray, np.ndarray]]
    scheme: str
    group_values: np.ndarray | None
    #: Each labelled row's image when the splits are grouped by image (early stopping's held-out part is, too).
    groups: np.ndarray | None = None

    @property
    def tested(self) -> np.ndarray:
        return np.concatenate([test for _, test in self.splits])

    def fits(self) -> list[Fit]:
        """Every fit of a feature: the CV folds, the control's folds, and the final probe on every labelled row."""
        fits = [Fit(train, self.y) for train, _ in self.splits]
        fits += [Fit(train, self.y_control) for train, _ in self.control_splits]
        return [*fits, Fit(np.arange(len(self.y)), self.y)]

    def matrix(self, feature: str) -> np.ndarray:
        with open_run_file(self.features_path) as handle:
            return handle[feature][()][self.rows].astype(np.float32, copy=False)


def load_probe_data(
    run_dir: str | Path,
    settings: ProbeSettings,
    labels: str | Path | pd.DataFrame | None = None,
    label_column: str | None = "label",
    features: Sequence[str] | None = None,
) -> ProbeData:
    """Read the run's ids and the label table, keep the labelled rows, and make the (control) splits."""
    run_dir, features_path = _run_paths(run_dir)
    label_table = _load_labels(run_dir, labels, label_column)
    with open_run_file(features_path) as handle:
        question_ids = read_strings(handle["question_id"])
        image_ids = read_strings(handle["image_id"])
        meta_columns = {name: read_strings(dataset) for name, dataset in stored_meta_columns(handle).items()}
        available = feature_datasets(handle)
        attrs = {key: handle.attrs[key] for key in handle.attrs}
    chosen = list(features) if features else available
    missing = [name for name in chosen if name not in available]
    if missing:
        raise ParameterError(
            "features", f"{', '.join(missing)} not in {features_path}; available: {', '.join(available)}"
        )

    row_labels = [label_table.labels.get(qid) for qid in question_ids]
    rows = np.array([i for i, value in enumerate(row_labels) if value is not None], dtype=np.int64)
    if len(rows) == 0:
        raise ProbeError(f"no question_id of {features_path} has a 0/1 label in {label_table.source}")
    y = np.array([row_labels[i] for i in rows], dtype=np.int64)
    _check_binary(y)
    kept_ids = [question_ids[i] for i in rows]
    images = np.array([image_ids[i] for i in rows])
    grouped = bool(settings.group_by_image and len(np.unique(images)) < len(images))
    groups = images if grouped else None
    folds, split, seed = settings.folds, settings.split, settings.seed
    y_control = np.random.default_rng(seed).permutation(y)
    scheme = (
        f"one stratified split, test fraction {split}" if split is not None else f"{folds}-fold stratified CV"
    ) + (", grouped by image" if grouped else "")
    group_values = (
        _group_values(settings.group_by, kept_ids, rows, meta_columns, label_table.frame) if settings.group_by else None
    )
    return ProbeData(
        run_dir=run_dir,
        features_path=features_path,
        features=chosen,
        attrs=attrs,
        n_rows=len(question_ids),
        rows=rows,
        kept_ids=kept_ids,
        y=y,
        labels=label_table,
        grouped=grouped,
        splits=make_splits(y, groups, folds, split, seed),
        y_control=y_control,
        control_splits=make_splits(y_control, groups, folds, split, seed),
        scheme=scheme,
        group_values=group_values,
        groups=groups,
    )


@dataclass
class FeatureResult:
    row: dict[str, Any]
    predictions: pd.DataFrame
    group_rows: list[dict[str, Any]]


def evaluate_feature(data: ProbeData, settings: ProbeSettings, feature: str, kind: str, X: np.ndarray) -> FeatureResult:
    """Cross-validate one probe type on one feature (and on the shuffled control), fit it on every labelled row,
    save it, and return its results row, out-of-fold predictions and per-group metrics."""
    y, tested = data.y, data.tested
    template = settings.template(kind)
    started = time.perf_counter()
    # Every fit of the feature at once: the CV folds, the control's folds, and the final probe on every row.
    probes = template.fit_batch(X, data.fits(), data.groups)
    folds = len(data.splits)
    scores, fold_of, per_fold = out_of_fold(probes[:folds], X, y, data.splits)
    _, _, control_folds = out_of_fold(probes[folds:-1], X, data.y_control, data.control_splits)
    final = probes[-1]
    seconds = time.perf_counter() - started
    pooled = metric_values(y[tested], scores[tested])
    intervals = bootstrap_intervals(y[tested], scores[tested], settings.bootstrap, settings.seed)
    row: dict[str, Any] = {
        "feature": feature,
        "probe": kind,
        "n": len(y),
        "n_positive": int(y.sum()),
        "dim": X.shape[1],
        "folds": len(data.splits),
        "grouped_by_image": data.grouped,
    }
    for name in METRICS:
        mean, std = _mean_std([fold[name] for fold in per_fold])
        row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        row[f"{name}_pooled"] = pooled[name]
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = intervals[name]
    row["control_auroc_mean"], row["control_auroc_std"] = _mean_std([f["auroc"] for f in control_folds])
    row["fit_seconds"] = seconds
    stem = probe_stem(data.run_dir, feature, kind)
    row["model"] = str(stem.relative_to(data.run_dir))
    if kind == "logreg":
        row["C"] = final.C_
    meta = _probe_meta(row, data.attrs, data.labels.source, data.labels.column, data.scheme, settings.seed)
    save_probe(final, stem, meta)
    predictions = pd.DataFrame(
        {
            "question_id": [data.kept_ids[i] for i in tested],
            "feature": feature,
            "probe": kind,
            "fold": fold_of[tested],
            "label": y[tested],
            "score": scores[tested],
        }
    )
    group_rows = []
    if data.group_values is not None:
        group_rows = _group_metrics(feature, kind, data.group_values[tested], y[tested], scores[tested])
    return FeatureResult(row, predictions, group_rows)


def _evaluate_in_worker(data: ProbeData, settings: ProbeSettings, feature: str, kind: str) -> FeatureResult:
    """One feature x probe type in a worker process: the matrix is read there (not sent), BLAS kept to `threads`.

    Ctrl-C interrupts the cell (its KeyboardInterrupt goes back as its result; an idle worker ignores it), and a
    process that took one runs no further cell: the one the pool had already queued to it (which cancelling cannot
    reach) ends at once instead of running to its end after the main process has stopped waiting for results.
    """
    global _took_ctrl_c
    from threadpoolctl import threadpool_limits

    if _took_ctrl_c:
        raise KeyboardInterrupt
    if _cells_take_ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with threadpool_limits(limits=settings.threads or 1):
            return evaluate_feature(data, settings, feature, kind, data.matrix(feature))
    except KeyboardInterrupt:
        _took_ctrl_c = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


#: In a probe process: whether a cell stops on Ctrl-C (the main process takes it; not where it ignores SIGINT), and
#: whether a cell of this process has.
_cells_take_ctrl_c = False
_took_ctrl_c = False


def _worker_started(take_ctrl_c: bool) -> None:
    """A probe process's first step. Ctrl-C is the main process's to handle: an idle process ignores it (no
    traceback from a process waiting for cells); SIGINT, blocked while the process started, is unblocked."""
    global _cells_take_ctrl_c
    _cells_take_ctrl_c = take_ctrl_c
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class ProbeWorkers:
    """`jobs` processes for probe cells (`evaluate_features`), starting in the background from when this is made.

    A probe process imports torch and scikit-learn as it starts, 2-3 s on a small machine: a caller with other work
    first (halp world's study set and extraction) makes this before it, so that happens meanwhile. The processes
    fork from a server that imports halp.probe once (forkserver: never forked from this process's threads, OpenMP
    or torch, that may hold locks); a thread of this process starts them, with SIGINT blocked, so the server and the
    processes inherit that while they import, and a Ctrl-C meanwhile is only the main process's (one line, exit
    130). `ready` waits for the start; `close` cancels the cells not started and waits for the running ones (a
    Ctrl-C has interrupted those).
    """

    def __init__(self, jobs: int) -> None:
        import multiprocessing

        if jobs < 1:
            raise ParameterError("jobs", f"must be at least 1, not {jobs}")
        self.jobs = jobs
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["halp.probe"])  # no effect where this process's fork server already runs
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=_worker_started,
            initargs=(signal.getsignal(signal.SIGINT) is not signal.SIG_IGN,),
        )
        # Waited for with an Event, not Thread.join: a join interrupted by Ctrl-C marks the thread stopped while it
        # runs (CPython 3.11's bpo-45274 handling), and the pool would be shut down under the starting thread.
        self._started = threading.Event()
        threading.Thread(target=self._start, name="halp probe workers", daemon=True).start()

    def _start(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # this thread's mask: the main thread keeps Ctrl-C
        try:
            for _ in range(self.jobs):  # the pool starts a process per call while none is idle: all start now
                self._pool.submit(os.getpid)
        finally:
            self._started.set()

    def ready(self) -> ProcessPoolExecutor:
        self._started.wait()
        return self._pool

    def close(self) -> None:
        self._started.wait()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProbeWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def probe_workers(jobs: int) -> Iterator[ProbeWorkers | None]:
    """`ProbeWorkers(jobs)`, closed on leaving (it refuses jobs < 1); None for one job (the cells run in the calling
    process)."""
    if jobs == 1:
        yield None
        return
    with ProbeWorkers(jobs) as workers:
        yield workers


def evaluate_features(
    data: ProbeData, settings: ProbeSettings, workers: ProbeWorkers | None = None
) -> Iterator[FeatureResult]:
    """`evaluate_feature` for every feature x probe type, in the order of `data.features` then `settings.kinds`;
    with `settings.jobs` > 1, that many processes (`workers` if given, from `probe_workers`) evaluate one feature x
    probe type each at a time (the results still arrive in order)."""
    kinds = settings.kinds
    if settings.jobs < 1:
        raise ParameterError("jobs", f"must be at least 1, not {settings.jobs}")
    cells = [(feature, kind) for feature in data.features for kind in kinds]
    if settings.jobs == 1 or len(cells) < 2:
        for feature in data.features:
            X = data.matrix(feature)
            for kind in kinds:
                yield evaluate_feature(data, settings, feature, kind, X)
        return
    # One torch/BLAS thread per worker unless asked otherwise: jobs x threads should not exceed the cores.
    worker_settings = replace(settings, threads=settings.threads or 1)
    # One task per feature x probe type, the MLPs submitted first: they cost the most (a few times a logistic
    # probe's at any width), so the processes end on short tasks and finish close together.
    submit_order = sorted(cells, key=lambda cell: cell[1] != "mlp")
    with contextlib.ExitStack() as stack:
        pool = (workers or stack.enter_context(ProbeWorkers(min(settings.jobs, len(cells))))).ready()
        calls = {cell: pool.submit(_evaluate_in_worker, data, worker_settings, *cell) for cell in submit_order}
        try:
            for cell in cells:
                yield calls[cell].result()
        finally:
            for call in calls.values():
                call.cancel()  # a failed cell (or a consumer that stopped) leaves the others unstarted


def write_probe_outputs(data: ProbeData, settings: ProbeSettings, evaluated: list[FeatureResult]) -> pd.DataFrame:
    """RUN_DIR/probes/: results.csv, predictions.csv, groups.csv (with group_by) and results.json."""
    out_dir = probes_dir(data.run_dir)
    results = [item.row for item in evaluated]
    frame = pd.DataFrame(results)
    with atomic_write(out_dir / RESULTS_FILE, newline="") as handle:
        frame.to_csv(handle, index=False)
    with atomic_write(out_dir / PREDICTIONS_FILE, newline="") as handle:
        pd.concat([item.predictions for item in evaluated], ignore_index=True).to_csv(handle, index=False)
    if data.group_values is not None:
        group_rows = [row for item in evaluated for row in item.group_rows]
        with atomic_write(out_dir / GROUPS_FILE, newline="") as handle:
            pd.DataFrame(group_rows, columns=["feature", "probe", "group", "n", "n_positive", "auroc"]).to_csv(
                handle, index=False
            )
    summary = {
        "run_dir": str(data.run_dir),
        "labels": data.labels.source,
        "label_column": data.labels.column,
        "n_rows": data.n_rows,
        "n": len(data.y),
        "n_positive": int(data.y.sum()),
        "validation": data.scheme,
        "folds": settings.folds if settings.split is None else None,
        "split": settings.split,
        "grouped_by_image": data.grouped,
        "group_by": settings.group_by,
        "seed": settings.seed,
        "bootstrap": settings.bootstrap,
        "bootstrap_over": "out-of-fold predictions pooled across folds",
        "threshold": THRESHOLD,
        "results": results,
    }
    write_text_atomic(out_dir / RESULTS_JSON_FILE, json.dumps(_json_safe(summary), indent=2))
    return frame


def train_probes(
    run_dir: str | Path,
    labels: str | Path | pd.DataFrame | None = None,
    label_column: str | None = "label",
    features: Sequence[str] | None = None,
    probe: str = "logreg",
    folds: int = 5,
    split: float | None = None,
    group_by: str | None = None,
    group_by_image: bool = True,
    seed: int = 42,
    bootstrap: int = 1000,
    device: str = "cpu",
    threads: int | None = None,
    probe_params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    jobs: int = 1,
    workers: ProbeWorkers | None = None,
) -> pd.DataFrame:
    """Evaluate and save one probe per feature x probe type; write RUN_DIR/probes/results.{csv,json}.

    `labels`: a table with question_id and a 0/1 column (default: RUN_DIR/labels.csv); rows whose label
    is empty or missing are left out. `label_column=None` takes `label`, else `is_hallucinating_manual`.
    `device`, `threads`: where the MLP trains and its torch intra-op threads (None: torch's setting).
    `probe_params`: extra constructor arguments per probe type, e.g. {"mlp": {"epochs": 5}}.
    `jobs`: processes evaluating feature x probe cells at once (the results do not depend on it); `workers`: those
    processes, started earlier by `probe_workers(jobs)` (else they start here).
    The steps: `load_probe_data` -> `evaluate_features` (`evaluate_feature` per feature x probe) ->
    `write_probe_outputs`.
    """
    settings = ProbeSettings(
        probe=probe,
        folds=folds,
        split=split,
        group_by=group_by,
        group_by_image=group_by_image,
        seed=seed,
        bootstrap=bootstrap,
        device=device,
        threads=threads,
        jobs=jobs,
        probe_params=probe_params or {},
    )
    settings.kinds  # noqa: B018 -- an unknown probe type fails here, before any data is read
    say = progress or log.info
    data = load_probe_data(run_dir, settings, labels, label_column, features)
    say(f"{len(data.y)} labelled rows ({int(data.y.sum())} hallucinated) of {data.n_rows}; {data.scheme}")
    probes_dir(data.run_dir).mkdir(parents=True, exist_ok=True)
    evaluated = []
    for result in evaluate_features(data, settings, workers):
        evaluated.append(result)
        row = result.row
        say(
            f"{row['feature']} {row['probe']}: AUROC {row['auroc_mean']:.3f} ± {_fmt(row['auroc_std'])} "
            f"[{row['auroc_ci_low']:.3f}, {row['auroc_ci_high']:.3f}], control {row['control_auroc_mean']:.3f}"
            f" ({row['fit_seconds']:.1f}s)"
        )
    return write_probe_outputs(data, settings, evaluated)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _group_values(
    column: str, kept_ids: list[str], rows: np.ndarray, meta: dict[str, list[str]], label_frame: pd.DataFrame | None
) -> np.ndarray:
    """Each labelled row's value of `column`: a carried metadata column of the run, else of the label table."""
    if column in meta:
        return np.array([meta[column][i] for i in rows])
    if label_frame is not None and column in label_frame.columns:
        lookup = dict(zip(label_frame["question_id"], label_frame[column].astype(str), strict=True))
        return np.array([lookup[qid] for qid in kept_ids])
    known = sorted(meta) + ([c for c in label_frame.columns if c != "question_id"] if label_frame is not None else [])
    raise ParameterError("group_by", f"{column!r}: no such metadata or label column; available: {', '.join(known)}")


def _group_metrics(
    feature: str, kind: str, values: np.ndarray, y: np.ndarray, scores: np.ndarray
) -> list[dict[str, Any]]:
    out = []
    for value in sorted(set(values.tolist())):
        mask = values == value
        out.append(
            {
                "feature": feature,
                "probe": kind,
                "group": value,
                "n": int(mask.sum()),
                "n_positive": int(y[mask].sum()),
                "auroc": metric_values(y[mask], scores[mask])["auroc"],
            }
        )
    return out


def _probe_meta(
    row: dict[str, Any], attrs: dict[str, Any], label_source: str, column: str, scheme: str, seed: int
) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, np.ndarray) else value

    return {
        "feature": row["feature"],
        "probe": row["probe"],
        "threshold": THRESHOLD,
        "model_id": plain(attrs.get("model_id")),
        "model_type": plain(attrs.get("model_type")),
        "layers": plain(attrs.get("layers")),
        "dtype": plain(attrs.get("dtype")),
        "labels": label_source,
        "label_column": column,
        "n_train": row["n"],
        "n_positive": row["n_positive"],
        "seed": seed,
        "trained_on": "all labelled rows",
        "evaluation": {"validation": scheme, **{k: v for k, v in row.items() if k not in ("feature", "probe")}},
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "sklearn": _sklearn_version()},
    }


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__
