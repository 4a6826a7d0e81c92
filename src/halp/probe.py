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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
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
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from halp.errors import MissingInputError, ParameterError, ProbeError
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
from halp.metrics import (  # noqa: F401
    METRICS,
    THRESHOLD,
    bootstrap_intervals,
    metric_values,
    ranking_metrics,
)
from halp.store import feature_datasets, read_strings
from halp.store import meta_columns as stored_meta_columns

log = logging.getLogger(__name__)

PROBE_TYPES = ("logreg", "mlp")
#: Inverse regularization strengths the logistic probe chooses from (on z-scored features).
# Largest first: LogisticRegressionCV keeps the first of equally scored Cs, and on separable data (every C
# at AUROC 1) the weakest regularization gives usable probabilities instead of all of them near the prior.
LOGREG_CS = tuple(float(c) for c in np.logspace(1, -5, 7))
PROBE_FORMAT = "halp-probe/1"


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
                raise ProbeError("choosing C by inner CV needs at least 2 examples of each class; pass C=")
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
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": PROBE_FORMAT, "probe_type": kind})
    write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps(_json_safe(config), indent=2, sort_keys=True))


def load_probe(path_stem: str | Path, device: str = "cpu") -> tuple[LogRegProbe | MLPProbe, dict[str, Any]]:
    """The probe saved by `save_probe`, ready to predict, and its meta dictionary."""
    from safetensors.torch import load_file

    stem = Path(path_stem)
    config = json.loads(stem.with_name(stem.name + ".json").read_text())
    if config.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{stem}.json is not a halp probe (format {config.get('format')!r})")
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
        raise ProbeError(f"{stem}.json: unknown probe type {config['probe_type']!r}")
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
    #: Processes evaluating features at once (a process pool). Every (feature, probe) result is the same for any value:
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

    @property
    def tested(self) -> np.ndarray:
        return np.concatenate([test for _, test in self.splits])

    def matrix(self, feature: str) -> np.ndarray:
        with h5py.File(self.features_path, "r") as handle:
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
    with h5py.File(features_path, "r") as handle:
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
    scores, fold_of, per_fold = cross_validate(lambda t=template: clone(t), X, y, data.splits)
    _, _, control_folds = cross_validate(lambda t=template: clone(t), X, data.y_control, data.control_splits)
    final = clone(template).fit(X, y)
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


def _evaluate_in_worker(
    data: ProbeData, settings: ProbeSettings, feature: str, kinds: list[str]
) -> list[FeatureResult]:
    """One feature's probes in a worker process: its matrix is read there (not sent), its BLAS kept to `threads`."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=settings.threads or 1):
        X = data.matrix(feature)
        return [evaluate_feature(data, settings, feature, kind, X) for kind in kinds]


def evaluate_features(data: ProbeData, settings: ProbeSettings) -> Iterator[FeatureResult]:
    """`evaluate_feature` for every feature x probe type, in the order of `data.features` then `settings.kinds`;
    with `settings.jobs` > 1, that many processes evaluate features at once (the results still arrive in order)."""
    kinds = settings.kinds
    if settings.jobs < 1:
        raise ParameterError("jobs", f"must be at least 1, not {settings.jobs}")
    if settings.jobs == 1 or len(data.features) < 2:
        for feature in data.features:
            X = data.matrix(feature)
            for kind in kinds:
                yield evaluate_feature(data, settings, feature, kind, X)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # One torch/BLAS thread per worker unless asked otherwise: jobs x threads should not exceed the cores.
    worker_settings = replace(settings, threads=settings.threads or 1)
    # forkserver: workers never fork from this process's threads (OpenMP, torch) that may hold locks.
    context = multiprocessing.get_context("forkserver")
    workers = min(settings.jobs, len(data.features))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        calls = [pool.submit(_evaluate_in_worker, data, worker_settings, f, kinds) for f in data.features]
        for call in calls:
            results = call.result()
            yield from results


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
) -> pd.DataFrame:
    """Evaluate and save one probe per feature x probe type; write RUN_DIR/probes/results.{csv,json}.

    `labels`: a table with question_id and a 0/1 column (default: RUN_DIR/labels.csv); rows whose label
    is empty or missing are left out. `label_column=None` takes `label`, else `is_hallucinating_manual`.
    `device`, `threads`: where the MLP trains and its torch intra-op threads (None: torch's setting).
    `probe_params`: extra constructor arguments per probe type, e.g. {"mlp": {"epochs": 5}}.
    `jobs`: processes evaluating features at once (the results do not depend on it).
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
    for result in evaluate_features(data, settings):
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
