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
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from halp.store import feature_datasets, read_strings
from halp.store import meta_columns as stored_meta_columns

log = logging.getLogger(__name__)

PROBES_DIR = "probes"
PROBE_TYPES = ("logreg", "mlp")
#: Inverse regularization strengths the logistic probe chooses from (on z-scored features).
# Largest first: LogisticRegressionCV keeps the first of equally scored Cs, and on separable data (every C
# at AUROC 1) the weakest regularization gives usable probabilities instead of all of them near the prior.
LOGREG_CS = tuple(float(c) for c in np.logspace(1, -5, 7))
#: Accuracy and F1 count a probability at or above this as "hallucinated" (the paper's 0.5).
THRESHOLD = 0.5
PROBE_FORMAT = "halp-probe/1"


# ----- shared helpers ----------------------------------------------------------------------------
def _check_binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got values {sorted(values)}")
    if len(values) < 2:
        raise ValueError("labels contain a single class; a probe needs hallucinated and correct examples")
    return y.astype(np.int64)


def _as_features(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (n_samples, dim), got shape {X.shape}")
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
    """Standardized L2 logistic regression; `C=None` picks C from LOGREG_CS by inner CV on AUROC."""

    def __init__(self, C: float | None = None, cv: int = 5, max_iter: int = 1000, random_state: int = 42) -> None:
        self.C = C
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LogRegProbe:
        X, y = _as_features(X), _check_binary(y)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.scaler_ = StandardScaler().fit(X)
        standardized = self.scaler_.transform(X)
        if self.C is None:
            minority = int(min(np.bincount(y)))
            if minority < 2:
                raise ValueError("choosing C by inner CV needs at least 2 examples of each class; pass C=")
            inner = StratifiedKFold(min(self.cv, minority), shuffle=True, random_state=self.random_state)
            model: Any = LogisticRegressionCV(
                Cs=list(LOGREG_CS), cv=inner, scoring="roc_auc", max_iter=self.max_iter, **_logreg_cv_kwargs()
            )
        else:
            model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        model.fit(standardized, y)
        self.C_ = float(np.ravel(model.C_)[0]) if self.C is None else float(self.C)
        self.coef_ = model.coef_.ravel().astype(np.float64)
        self.intercept_ = float(np.ravel(model.intercept_)[0])
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return self.scaler_.transform(_as_features(X)) @ self.coef_ + self.intercept_

    def predict_proba(self, X: Any) -> np.ndarray:
        return _proba_columns(expit(self.decision_function(X)))

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= THRESHOLD).astype(np.int64)


def _logreg_cv_kwargs() -> dict[str, Any]:
    """Keyword arguments that select a plain L2 path on scikit-learn >= 1.8 without deprecation noise."""
    parameters = inspect.signature(LogisticRegressionCV).parameters
    if "use_legacy_attributes" in parameters:
        return {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    return {}


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
    """The HALP paper's MLP probe on z-scored inputs; BCE on logits (the paper's Sigmoid+BCELoss, stabler)."""

    def __init__(
        self,
        hidden: Sequence[int] = (512, 256, 128),
        dropout: float = 0.3,
        lr: float = 1e-3,
        batch_size: int = 32,
        epochs: int = 50,
        random_state: int = 42,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.random_state = random_state
        self.device = device
        self.threads = threads

    def fit(self, X: Any, y: Any) -> MLPProbe:
        X, y = _as_features(X), _check_binary(y)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.scaler_ = StandardScaler().fit(X)
        device = _resolve_device(self.device)
        inputs = torch.from_numpy(self.scaler_.transform(X).astype(np.float32)).to(device)
        targets = torch.from_numpy(y.astype(np.float32)).to(device)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        # A private RNG stream: the seed makes the probe reproducible without touching the caller's RNG.
        with torch.random.fork_rng(devices=rng_devices), _torch_threads(self.threads):
            torch.manual_seed(self.random_state)
            net = build_mlp(X.shape[1], self.hidden, self.dropout).to(device)
            optimizer = _adam(net, self.lr)
            loss_fn = nn.BCEWithLogitsLoss()
            order_rng = torch.Generator().manual_seed(self.random_state)
            self.loss_history_: list[float] = []
            net.train()
            for _ in range(self.epochs):
                order = torch.randperm(len(targets), generator=order_rng).to(device)
                total, seen = 0.0, 0
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    if len(batch) < 2:  # BatchNorm cannot normalize a batch of one; skip that remainder
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(net(inputs[batch]).squeeze(1), targets[batch])
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                    seen += len(batch)
                self.loss_history_.append(total / max(seen, 1))
        self.net_ = net.eval()
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


def _adam(net: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with the fused update where this torch has it: on CPU it is ~3x faster than the default loop."""
    try:
        return torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(net.parameters(), lr=lr, foreach=True)


def make_probe(kind: str, seed: int = 42, **params: Any) -> LogRegProbe | MLPProbe:
    if kind == "logreg":
        return LogRegProbe(random_state=seed, **params)
    if kind == "mlp":
        return MLPProbe(random_state=seed, **params)
    raise ValueError(f"unknown probe type {kind!r}; choose logreg, mlp or both")


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
        fitted = {"loss_history_": probe.loss_history_}
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
    tmp = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": PROBE_FORMAT, "probe_type": kind})
    os.replace(tmp, weights)
    config_path = stem.with_name(stem.name + ".json")
    tmp = config_path.with_name(f".{config_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(config), indent=2, sort_keys=True))
    os.replace(tmp, config_path)


def load_probe(path_stem: str | Path, device: str = "cpu") -> tuple[LogRegProbe | MLPProbe, dict[str, Any]]:
    """The probe saved by `save_probe`, ready to predict, and its meta dictionary."""
    from safetensors.torch import load_file

    stem = Path(path_stem)
    config = json.loads(stem.with_name(stem.name + ".json").read_text())
    if config.get("format") != PROBE_FORMAT:
        raise ValueError(f"{stem}.json is not a halp probe (format {config.get('format')!r})")
    tensors = load_file(str(stem.with_name(stem.name + ".safetensors")))
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
    else:
        raise ValueError(f"{stem}.json: unknown probe type {config['probe_type']!r}")
    probe.scaler_ = scaler
    probe.classes_ = np.array([0, 1])
    probe.n_features_in_ = config["input_dim"]
    return probe, config["meta"]


def probe_stem(run_dir: str | Path, feature: str, kind: str) -> Path:
    """Where the final probe of `feature` x `kind` lives: probes/models/<feature with / -> __>__<kind>."""
    return Path(run_dir) / PROBES_DIR / "models" / f"{feature.replace('/', '__')}__{kind}"


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
            raise ValueError(f"--split {split}: expected a test fraction between 0 and 1, e.g. 0.2")
        if minority < 2:
            raise ValueError(f"a stratified split needs at least 2 examples of each class; the minority has {minority}")
        if groups is None:
            train, test = train_test_split(indices, test_size=split, stratify=y, random_state=seed)
            return [(np.sort(train), np.sort(test))]
        # The grouped analogue of one stratified split: the first fold of a stratified group k-fold.
        n_splits = max(2, round(1.0 / split))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [next(iter(splitter.split(indices, y, groups)))]
    if folds < 2:
        raise ValueError(f"--folds {folds}: need at least 2 folds (or --split for one train/test split)")
    if minority < folds:
        raise ValueError(
            f"{folds}-fold stratified CV needs at least {folds} examples of each class; the minority class has "
            f"{minority}. Use fewer --folds or label more data."
        )
    if groups is None:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(indices, y))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(indices, y, groups))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": lambda y, score: roc_auc_score(y, score),
    "auprc": lambda y, score: average_precision_score(y, score),
    "accuracy": lambda y, score: accuracy_score(y, score >= THRESHOLD),
    "f1": lambda y, score: f1_score(y, score >= THRESHOLD, zero_division=0),
}


def metric_values(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Every metric of one set of predictions; AUROC/AUPRC are NaN when only one class is present."""
    single_class = len(np.unique(y)) < 2
    return {
        name: float("nan") if single_class and name in ("auroc", "auprc") else float(function(y, score))
        for name, function in METRICS.items()
    }


def ranking_metrics(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """AUROC and average precision as scikit-learn defines them (ties included), without its per-call input
    validation, which dominates the cost of a thousand bootstrap resamples. Tested equal to roc_auc_score and
    average_precision_score."""
    order = np.argsort(-score, kind="mergesort")
    ranked_scores, ranked_labels = score[order], y[order]
    thresholds = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]  # last row of each tie
    true_positives = np.cumsum(ranked_labels)[thresholds]
    false_positives = thresholds + 1 - true_positives
    positives, negatives = true_positives[-1], false_positives[-1]
    if positives == 0 or negatives == 0:
        return math.nan, math.nan
    tpr = np.r_[0.0, true_positives / positives]
    fpr = np.r_[0.0, false_positives / negatives]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    precision = true_positives / (true_positives + false_positives)
    average_precision = float(np.sum(np.diff(tpr) * precision))
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
    ranking = np.array([ranking_metrics(labels[i], score[rows[i]]) for i in range(resamples)])
    values["auroc"], values["auprc"] = ranking[:, 0], ranking[:, 1]
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


def cross_validate(
    make: Callable[[], LogRegProbe | MLPProbe], X: np.ndarray, y: np.ndarray, splits: Sequence[Split]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Out-of-fold P(hallucinated) (NaN for rows in no test set), each row's fold, and per-fold metrics."""
    scores = np.full(len(y), np.nan)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    per_fold = []
    for fold, (train, test) in enumerate(splits):
        probe = make().fit(X[train], y[train])
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
    from halp.summary import features_file

    path = features_file(run_dir)
    return path.parent, path


def _load_labels(
    run_dir: Path, labels: str | Path | pd.DataFrame | None, label_column: str | None
) -> tuple[dict[str, int | None], str, str, pd.DataFrame | None]:
    """question_id -> label, a description of the source, the column used, and the table (for --group-by)."""
    from halp.data import read_frame
    from halp.label import LABELS_FILE, parse_label_value, resolve_label_column

    if isinstance(labels, pd.DataFrame):
        frame, source = labels.copy(), "DataFrame"
    else:
        path = Path(labels) if labels is not None else run_dir / LABELS_FILE
        if not path.is_file():
            hint = " (run `halp label RUN_DIR` first, or pass --labels FILE)" if labels is None else ""
            raise FileNotFoundError(f"label table {path} does not exist{hint}")
        frame, source = read_frame(path), str(path)
    frame.columns = [str(column) for column in frame.columns]
    if "question_id" not in frame.columns:
        raise ValueError(f"{source} has no question_id column; columns: {', '.join(frame.columns)}")
    column = resolve_label_column(list(frame.columns), label_column, source)
    frame["question_id"] = frame["question_id"].astype(str)
    if frame["question_id"].duplicated().any():
        raise ValueError(f"{source}: duplicate question_id values")
    mapping = {}
    for qid, value in zip(frame["question_id"], frame[column], strict=True):
        try:
            mapping[qid] = parse_label_value(value)
        except ValueError as err:
            raise ValueError(f"{source}: question_id {qid}: {err}") from err
    return mapping, source, column, frame


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
) -> pd.DataFrame:
    """Evaluate and save one probe per feature x probe type; write RUN_DIR/probes/results.{csv,json}.

    `labels`: a table with question_id and a 0/1 column (default: RUN_DIR/labels.csv); rows whose label
    is empty or missing are left out. `label_column=None` takes `label`, else `is_hallucinating_manual`.
    `device`, `threads`: where the MLP trains and its torch intra-op threads (None: torch's setting).
    `probe_params`: extra constructor arguments per probe type, e.g. {"mlp": {"epochs": 5}}.
    """
    run_dir, features_path = _run_paths(run_dir)
    kinds = list(PROBE_TYPES) if probe == "both" else [probe]
    for kind in kinds:
        if kind not in PROBE_TYPES:
            raise ValueError(f"--probe {probe!r}: choose logreg, mlp or both")
    probe_params = probe_params or {}
    say = progress or log.info

    label_map, label_source, column, label_frame = _load_labels(run_dir, labels, label_column)
    with h5py.File(features_path, "r") as handle:
        question_ids = read_strings(handle["question_id"])
        image_ids = read_strings(handle["image_id"])
        meta_columns = {name: read_strings(dataset) for name, dataset in stored_meta_columns(handle).items()}
        available = feature_datasets(handle)
        attrs = {key: handle.attrs[key] for key in handle.attrs}
    chosen = list(features) if features else available
    missing = [name for name in chosen if name not in available]
    if missing:
        raise ValueError(f"feature(s) {', '.join(missing)} not in {features_path}; available: {', '.join(available)}")

    row_labels = [label_map.get(qid) for qid in question_ids]
    rows = np.array([i for i, value in enumerate(row_labels) if value is not None], dtype=np.int64)
    if len(rows) == 0:
        raise ValueError(f"no question_id of {features_path} has a 0/1 label in {label_source}")
    y = np.array([row_labels[i] for i in rows], dtype=np.int64)
    _check_binary(y)
    kept_ids = [question_ids[i] for i in rows]
    images = np.array([image_ids[i] for i in rows])
    grouped = bool(group_by_image and len(np.unique(images)) < len(images))
    groups = images if grouped else None
    splits = make_splits(y, groups, folds, split, seed)
    # The control: the same pipeline on labels shuffled once (seeded); its splits follow the shuffled labels.
    y_control = np.random.default_rng(seed).permutation(y)
    control_splits = make_splits(y_control, groups, folds, split, seed)
    scheme = (
        f"one stratified split, test fraction {split}" if split is not None else f"{folds}-fold stratified CV"
    ) + (", grouped by image" if grouped else "")
    say(f"{len(y)} labelled rows ({int(y.sum())} hallucinated) of {len(question_ids)}; {scheme}")

    group_values = _group_values(group_by, kept_ids, rows, meta_columns, label_frame) if group_by else None
    out_dir = run_dir / PROBES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    results, prediction_frames, group_rows = [], [], []
    tested = np.concatenate([test for _, test in splits])
    for feature in chosen:
        with h5py.File(features_path, "r") as handle:
            X = handle[feature][()][rows].astype(np.float32, copy=False)
        for kind in kinds:
            params = probe_params.get(kind, {})
            if kind == "mlp":
                params = {"device": device, "threads": threads, **params}
            template = make_probe(kind, seed, **params)
            started = time.perf_counter()
            scores, fold_of, per_fold = cross_validate(lambda t=template: clone(t), X, y, splits)
            _, _, control_folds = cross_validate(lambda t=template: clone(t), X, y_control, control_splits)
            final = clone(template).fit(X, y)
            seconds = time.perf_counter() - started
            pooled = metric_values(y[tested], scores[tested])
            intervals = bootstrap_intervals(y[tested], scores[tested], bootstrap, seed)
            row: dict[str, Any] = {
                "feature": feature,
                "probe": kind,
                "n": len(y),
                "n_positive": int(y.sum()),
                "dim": X.shape[1],
                "folds": len(splits),
                "grouped_by_image": grouped,
            }
            for name in METRICS:
                mean, std = _mean_std([fold[name] for fold in per_fold])
                row[f"{name}_mean"], row[f"{name}_std"] = mean, std
                row[f"{name}_pooled"] = pooled[name]
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = intervals[name]
            row["control_auroc_mean"], row["control_auroc_std"] = _mean_std([f["auroc"] for f in control_folds])
            row["fit_seconds"] = seconds
            stem = probe_stem(run_dir, feature, kind)
            row["model"] = str(stem.relative_to(run_dir))
            if kind == "logreg":
                row["C"] = final.C_
            results.append(row)
            save_probe(final, stem, _probe_meta(row, attrs, label_source, column, scheme, seed))
            prediction_frames.append(
                pd.DataFrame(
                    {
                        "question_id": [kept_ids[i] for i in tested],
                        "feature": feature,
                        "probe": kind,
                        "fold": fold_of[tested],
                        "label": y[tested],
                        "score": scores[tested],
                    }
                )
            )
            if group_values is not None:
                group_rows += _group_metrics(feature, kind, group_values[tested], y[tested], scores[tested])
            say(
                f"{feature} {kind}: AUROC {row['auroc_mean']:.3f} ± {_fmt(row['auroc_std'])} "
                f"[{row['auroc_ci_low']:.3f}, {row['auroc_ci_high']:.3f}], control {row['control_auroc_mean']:.3f}"
                f" ({seconds:.1f}s)"
            )

    frame = pd.DataFrame(results)
    frame.to_csv(out_dir / "results.csv", index=False)
    pd.concat(prediction_frames, ignore_index=True).to_csv(out_dir / "predictions.csv", index=False)
    if group_values is not None:
        pd.DataFrame(group_rows, columns=["feature", "probe", "group", "n", "n_positive", "auroc"]).to_csv(
            out_dir / "groups.csv", index=False
        )
    summary = {
        "run_dir": str(run_dir),
        "labels": label_source,
        "label_column": column,
        "n_rows": len(question_ids),
        "n": len(y),
        "n_positive": int(y.sum()),
        "validation": scheme,
        "folds": folds if split is None else None,
        "split": split,
        "grouped_by_image": grouped,
        "group_by": group_by,
        "seed": seed,
        "bootstrap": bootstrap,
        "bootstrap_over": "out-of-fold predictions pooled across folds",
        "threshold": THRESHOLD,
        "results": results,
    }
    (out_dir / "results.json").write_text(json.dumps(_json_safe(summary), indent=2))
    return frame


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
    raise ValueError(f"--group-by {column!r}: no such metadata or label column; available: {', '.join(known)}")


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


def print_results(console: Any, results: pd.DataFrame, run_dir: str | Path) -> None:
    """AUROC (fold mean ± std, bootstrap interval), AUPRC and the shuffled-label control, per feature x probe."""
    from rich.table import Table

    table = Table("feature", "probe", "n (pos)", "AUROC", "95% CI", "AUPRC", "F1", "control AUROC", "s")
    for row in results.to_dict(orient="records"):
        table.add_row(
            row["feature"],
            row["probe"],
            f"{row['n']} ({row['n_positive']})",
            f"{_fmt(row['auroc_mean'])} ± {_fmt(row['auroc_std'])}",
            f"[{_fmt(row['auroc_ci_low'])}, {_fmt(row['auroc_ci_high'])}]",
            _fmt(row["auprc_mean"]),
            _fmt(row["f1_mean"]),
            _fmt(row["control_auroc_mean"]),
            f"{row['fit_seconds']:.1f}",
        )
    console.print(table)
    out_dir = Path(run_dir) / PROBES_DIR
    console.print(f"wrote {out_dir}: results.csv, results.json, predictions.csv, models/", markup=False)
