"""Probes, CV and metrics against scikit-learn on fixed data; save/load; the control; grouping by image.

The run directories are synthetic features.h5 files in the store's layout with planted signal:
`query_token/layer_1` carries the label linearly, `vision_only` is noise, and
`vision_token/layer_1` is a per-image random vector whose label is the image's (an image memorizer's
dream: it predicts only if the test images were seen in training).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from typer.testing import CliRunner

from halp.cli import app
from halp.data import Sample
from halp.errors import ParameterError, ProbeError
from halp.probe import (
    LOGREG_CS,
    Fit,
    LogRegProbe,
    MLPProbe,
    ProbeSettings,
    ProbeWorkers,
    bootstrap_intervals,
    build_mlp,
    load_probe,
    make_splits,
    probe_stem,
    probe_workers,
    save_probe,
    train_probes,
)
from halp.store import rows_for, write_rows

SIGNAL = "query_token/layer_1"
NOISE = "vision_only"
PER_IMAGE = "vision_token/layer_1"
FAST_LOGREG = {"logreg": {"C": 0.1}}
FAST_MLP = {"mlp": {"hidden": (16, 8), "epochs": 15, "batch_size": 16}}


def write_run(
    root: Path, n_images: int = 60, per_image: int = 1, dim: int = 12, positive_rate: float = 0.3, seed: int = 0
) -> tuple[Path, pd.DataFrame]:
    """A run directory with planted features and a labels.csv (a few labels left empty)."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    image_of = np.repeat(np.arange(n_images), per_image)
    image_label = (rng.random(n_images) < positive_rate).astype(int)
    # Every image gets at least one of each class somewhere, so stratification has both classes.
    image_label[:2] = [0, 1]
    if per_image > 1:
        y = image_label[image_of]
    else:
        y = (rng.random(n) < positive_rate).astype(int)
        y[:2] = [0, 1]
    direction = rng.normal(size=dim)
    signal = rng.normal(size=(n, dim)) + 2.5 * np.outer(y, direction) / np.linalg.norm(direction)
    image_vectors = rng.normal(size=(n_images, 64))
    per_image_feature = image_vectors[image_of] + 0.05 * rng.normal(size=(n, 64))
    samples = [
        Sample(f"q{i:04d}", f"img{image_of[i]:03d}.png", "Is there a dog?", "no", {"category": f"c{i % 3}"})
        for i in range(n)
    ]
    features = {
        NOISE: rng.normal(size=(n, dim)).astype(np.float32),
        SIGNAL: signal.astype(np.float32),
        PER_IMAGE: per_image_feature.astype(np.float32),
    }
    root.mkdir(parents=True, exist_ok=True)
    write_rows(root / "features.h5", rows_for(samples, ["yes"] * n, features), {"model_id": "synthetic", "layers": [1]})
    labels = pd.DataFrame(
        {
            "question_id": [s.question_id for s in samples],
            "label": [str(v) for v in y],
            "method": "manual",
            "reason": "",
            "answer_type": "yesno",
        }
    )
    labels.loc[n - 3 :, "label"] = ""  # unknown: must be left out
    labels.to_csv(root / "labels.csv", index=False)
    return root, labels


def _labelled(labels: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    known = labels[labels["label"] != ""]
    return known["question_id"].tolist(), known["label"].astype(int).to_numpy()


def _features(run_dir: Path, name: str, ids: list[str]) -> np.ndarray:
    import h5py

    from halp.store import read_strings

    with h5py.File(run_dir / "features.h5", "r") as handle:
        index = {qid: i for i, qid in enumerate(read_strings(handle["question_id"]))}
        return handle[name][()][[index[qid] for qid in ids]]


# ----- the estimators ----------------------------------------------------------------------------
def exact_logistic_regression(C: float) -> LogisticRegression:
    """scikit-learn's L2 logistic regression solved to its optimum (Newton-Cholesky, tol 1e-8): the reference for the
    probe's Newton solver. Both reach the same optimum, so predicted probabilities agree to ~1e-7 (asserted at 1e-6);
    scikit-learn's default lbfgs stops at tol 1e-4, up to ~3e-4 away in probability on these data."""
    return LogisticRegression(C=C, solver="newton-cholesky", tol=1e-8, max_iter=1000)


def _fixed_data(n: int = 200, dim: int = 10, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    # Scales from 0.1 to 50: the probes must standardize; the signal is 0.6 sd per dimension.
    X = (rng.normal(size=(n, dim)) + 0.6 * np.outer(y, np.ones(dim))) * rng.uniform(0.1, 50, size=dim)
    return X.astype(np.float32), y


def test_logreg_equals_standardized_sklearn_logistic_regression():
    X, y = _fixed_data()
    ours = LogRegProbe(C=0.3).fit(X[:150], y[:150])
    reference = make_pipeline(StandardScaler(), exact_logistic_regression(C=0.3)).fit(X[:150], y[:150])
    np.testing.assert_allclose(ours.predict_proba(X[150:]), reference.predict_proba(X[150:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(X[150:]), reference.predict(X[150:]))


def test_logreg_chooses_C_like_logistic_regression_cv():
    X, y = _fixed_data()
    ours = LogRegProbe(cv=4, random_state=7).fit(X, y)
    standardized = StandardScaler().fit_transform(X)
    modern = "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters
    kwargs = {"l1_ratios": (0.0,), "use_legacy_attributes": False} if modern else {}
    reference = LogisticRegressionCV(
        Cs=list(LOGREG_CS),
        cv=StratifiedKFold(4, shuffle=True, random_state=7),
        scoring="roc_auc",
        max_iter=1000,
        **kwargs,
    ).fit(standardized, y)
    assert float(np.ravel(reference.C_)[0]) == pytest.approx(ours.C_)
    assert ours.C_ in LOGREG_CS


def test_mlp_is_the_papers_architecture():
    net = build_mlp(3584, (512, 256, 128), 0.3)
    kinds = [type(layer).__name__ for layer in net]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout"] * 3 + ["Linear"]
    assert [layer.out_features for layer in net if isinstance(layer, torch.nn.Linear)] == [512, 256, 128, 1]
    assert net[0].in_features == 3584
    assert all(layer.p == 0.3 for layer in net if isinstance(layer, torch.nn.Dropout))
    defaults = MLPProbe().get_params()
    assert (defaults["hidden"], defaults["dropout"], defaults["lr"], defaults["epochs"]) == (
        (512, 256, 128),
        0.3,
        1e-3,
        50,
    )
    # The training differs from the paper's (batch 32, all 50 epochs): larger batches and early stopping.
    assert (defaults["batch_size"], defaults["validation_fraction"], defaults["patience"]) == (128, 0.1, 3)
    assert defaults["random_state"] == 42


def test_mlp_learns_is_reproducible_and_leaves_global_rng_alone():
    X, y = _fixed_data(n=301)  # 241 training rows: the ones that do not fill a last batch wait for the next epoch
    state = torch.get_rng_state()
    first = MLPProbe(hidden=(32, 16), epochs=30, random_state=3, threads=1).fit(X[:241], y[:241])
    assert torch.equal(state, torch.get_rng_state())
    again = MLPProbe(hidden=(32, 16), epochs=30, random_state=3, threads=1).fit(X[:241], y[:241])
    other = MLPProbe(hidden=(32, 16), epochs=30, random_state=4, threads=1).fit(X[:241], y[:241])
    scores = first.predict_proba(X[241:])[:, 1]
    np.testing.assert_array_equal(scores, again.predict_proba(X[241:])[:, 1])
    assert not np.array_equal(scores, other.predict_proba(X[241:])[:, 1])
    assert roc_auc_score(y[241:], scores) > 0.85
    assert first.loss_history_[-1] < first.loss_history_[0]
    assert first.predict_proba(X).shape == (len(X), 2)


@pytest.mark.parametrize("probe", [LogRegProbe(), MLPProbe(hidden=(16, 8), epochs=5)], ids=["logreg", "mlp"])
def test_save_load_round_trip_without_pickle(tmp_path, probe):
    X, y = _fixed_data()
    probe.fit(X, y)
    stem = tmp_path / "probes" / "query_token__layer_3__x"
    save_probe(probe, stem, {"feature": "query_token/layer_3", "auroc": 0.8})
    assert sorted(path.name for path in stem.parent.iterdir()) == [stem.name + ".json", stem.name + ".safetensors"]
    loaded, meta = load_probe(stem)
    assert type(loaded) is type(probe)
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert meta["feature"] == "query_token/layer_3" and meta["threshold"] == 0.5 and meta["auroc"] == 0.8
    config = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert config["probe_type"] in {"logreg", "mlp"} and config["input_dim"] == X.shape[1]
    assert "standardization" in config and config["params"] == json.loads(json.dumps(probe.get_params()))
    # The weights file is plain safetensors: readable without halp and without pickle.
    from safetensors.numpy import load_file

    tensors = load_file(str(stem.with_name(stem.name + ".safetensors")))
    np.testing.assert_allclose(tensors["standardize.mean"], X.mean(axis=0), rtol=1e-5)


def test_load_refuses_a_foreign_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a halp probe"):
        load_probe(tmp_path / "x")


# ----- splits, metrics, control ------------------------------------------------------------------
def test_cv_folds_and_metrics_match_sklearn(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=90)
    results = train_probes(run_dir, features=[SIGNAL], probe_params=FAST_LOGREG, bootstrap=50)
    ids, y = _labelled(labels)
    row = results.iloc[0]
    assert (row["n"], row["n_positive"], row["folds"], bool(row["grouped_by_image"])) == (len(y), y.sum(), 5, False)

    predictions = pd.read_csv(run_dir / "probes" / "predictions.csv", dtype={"question_id": str})
    predictions = predictions.set_index("question_id").loc[ids]
    expected_folds = np.empty(len(y), dtype=int)
    for fold, (_, test) in enumerate(StratifiedKFold(5, shuffle=True, random_state=42).split(np.zeros(len(y)), y)):
        expected_folds[test] = fold
    np.testing.assert_array_equal(predictions["fold"].to_numpy(), expected_folds)
    np.testing.assert_array_equal(predictions["label"].to_numpy(), y)

    # Each fold's scores are those of a standardized logistic regression fitted on the other folds only.
    X = _features(run_dir, SIGNAL, ids)
    scores = predictions["score"].to_numpy()
    per_fold = {name: [] for name in ("auroc", "auprc", "accuracy", "f1")}
    for fold in range(5):
        test, train = expected_folds == fold, expected_folds != fold
        reference = make_pipeline(StandardScaler(), exact_logistic_regression(C=0.1)).fit(X[train], y[train])
        np.testing.assert_allclose(scores[test], reference.predict_proba(X[test])[:, 1], rtol=1e-5, atol=1e-6)
        per_fold["auroc"].append(roc_auc_score(y[test], scores[test]))
        per_fold["auprc"].append(average_precision_score(y[test], scores[test]))
        per_fold["accuracy"].append(accuracy_score(y[test], scores[test] >= 0.5))
        per_fold["f1"].append(f1_score(y[test], scores[test] >= 0.5))
    for name, values in per_fold.items():
        assert row[f"{name}_mean"] == pytest.approx(np.mean(values))
        assert row[f"{name}_std"] == pytest.approx(np.std(values, ddof=1))
    assert row["auroc_pooled"] == pytest.approx(roc_auc_score(y, scores))
    assert row["auroc_ci_low"] <= row["auroc_pooled"] <= row["auroc_ci_high"]


def test_signal_is_found_and_the_shuffled_control_sits_near_chance(tmp_path):
    run_dir, _ = write_run(tmp_path / "run", n_images=400)
    results = train_probes(
        run_dir, features=[NOISE, SIGNAL], probe="both", probe_params=FAST_MLP, bootstrap=100, threads=1
    )
    by = results.set_index(["feature", "probe"])
    for kind in ("logreg", "mlp"):
        assert by.loc[(SIGNAL, kind), "auroc_mean"] > 0.8
        assert by.loc[(SIGNAL, kind), "auroc_ci_low"] > 0.7
        assert abs(by.loc[(SIGNAL, kind), "control_auroc_mean"] - 0.5) < 0.12
        assert abs(by.loc[(NOISE, kind), "auroc_mean"] - 0.5) < 0.12
        assert by.loc[(NOISE, kind), "auroc_ci_low"] < 0.5 < by.loc[(NOISE, kind), "auroc_ci_high"]
    summary = json.loads((run_dir / "probes" / "results.json").read_text())
    assert summary["n"] == results["n"].iloc[0] and len(summary["results"]) == 4
    assert summary["bootstrap_over"] == "out-of-fold predictions pooled across folds"


def test_grouping_by_image_stops_memorization(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=80, per_image=4, positive_rate=0.4)
    leaky = train_probes(run_dir, features=[PER_IMAGE], group_by_image=False, probe_params=FAST_LOGREG, bootstrap=0)
    grouped = train_probes(run_dir, features=[PER_IMAGE], probe_params=FAST_LOGREG, bootstrap=0)
    # The same question's rows on one image share a vector and a label: seen images are easy.
    assert leaky["auroc_mean"].iloc[0] > 0.9 and not leaky["grouped_by_image"].iloc[0]
    assert grouped["grouped_by_image"].iloc[0]
    assert abs(grouped["auroc_mean"].iloc[0] - 0.5) < 0.2
    predictions = pd.read_csv(run_dir / "probes" / "predictions.csv", dtype={"question_id": str})
    image_of = dict(zip(labels["question_id"], np.repeat(np.arange(80), 4), strict=True))
    folds_per_image = predictions.groupby(predictions["question_id"].map(image_of))["fold"].nunique()
    assert (folds_per_image == 1).all()


def test_grouped_folds_are_sklearns_stratified_group_kfold():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 3)
    y = (rng.random(120) < 0.3).astype(int)
    ours = make_splits(y, groups, folds=4, seed=5)
    reference = StratifiedGroupKFold(4, shuffle=True, random_state=5).split(np.zeros(120), y, groups)
    for (train, test), (ref_train, ref_test) in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(test, ref_test)
        np.testing.assert_array_equal(train, ref_train)


def test_paper_single_split_is_a_stratified_80_20_split(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=100)
    results = train_probes(run_dir, features=[SIGNAL], split=0.2, probe_params=FAST_LOGREG, bootstrap=20)
    ids, y = _labelled(labels)
    _, expected_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=42)
    predictions = pd.read_csv(run_dir / "probes" / "predictions.csv", dtype={"question_id": str})
    assert sorted(predictions["question_id"]) == sorted(ids[i] for i in expected_test)
    row = results.iloc[0]
    assert row["folds"] == 1 and np.isnan(row["auroc_std"])
    assert row["auroc_mean"] == pytest.approx(roc_auc_score(predictions["label"], predictions["score"]))


def test_bootstrap_interval_is_seeded_and_brackets_the_pooled_value():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.2).astype(int)
    score = rng.random(400) + 0.3 * y
    first = bootstrap_intervals(y, score, 150, seed=1)
    assert first == bootstrap_intervals(y, score, 150, seed=1)
    assert first != bootstrap_intervals(y, score, 150, seed=2)
    low, high = first["auroc"]
    assert low < roc_auc_score(y, score) < high and high - low < 0.25
    small_low, small_high = bootstrap_intervals(y[:100], score[:100], 150, seed=1)["auroc"]
    assert small_high - small_low > high - low


def test_per_group_auroc_and_final_models(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=120)
    results = train_probes(
        run_dir, features=[SIGNAL, NOISE], group_by="category", probe_params=FAST_LOGREG, bootstrap=0
    )
    groups = pd.read_csv(run_dir / "probes" / "groups.csv")
    predictions = pd.read_csv(run_dir / "probes" / "predictions.csv", dtype={"question_id": str})
    category = {f"q{i:04d}": f"c{i % 3}" for i in range(120)}
    for row in groups.to_dict(orient="records"):
        subset = predictions[(predictions["feature"] == row["feature"]) & (predictions["probe"] == row["probe"])]
        subset = subset[subset["question_id"].map(category) == row["group"]]
        assert row["n"] == len(subset) and row["n_positive"] == subset["label"].sum()
        assert row["auroc"] == pytest.approx(roc_auc_score(subset["label"], subset["score"]))
    assert len(groups) == 2 * 3

    ids, y = _labelled(labels)
    for feature in (SIGNAL, NOISE):
        stem = probe_stem(run_dir, feature, "logreg")
        assert stem.name == feature.replace("/", "__") + "__logreg"
        loaded, meta = load_probe(stem)
        X = _features(run_dir, feature, ids)
        reference = make_pipeline(StandardScaler(), exact_logistic_regression(C=0.1)).fit(X, y)
        np.testing.assert_allclose(loaded.predict_proba(X), reference.predict_proba(X), rtol=1e-5, atol=1e-6)
        assert meta["feature"] == feature and meta["n_train"] == len(y) and meta["model_id"] == "synthetic"
        row = results.set_index("feature").loc[feature]
        assert meta["evaluation"]["auroc_mean"] == pytest.approx(row["auroc_mean"])


def test_halp_manual_review_csv_works_as_is(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=80)
    ids, y = _labelled(labels)
    manual = pd.DataFrame(
        {
            "question_id": [*ids, "not_in_run"],
            "model_answer": "yes",
            "is_hallucinating_manual": ["True" if v else "False" for v in y] + ["True"],
        }
    )
    manual.loc[0, "is_hallucinating_manual"] = ""  # unreviewed: unknown, not "hallucinated"
    path = tmp_path / "gemma3_manually_reviewed.csv"
    manual.to_csv(path, index=False)
    results = train_probes(
        run_dir, labels=path, label_column=None, features=[SIGNAL], probe_params=FAST_LOGREG, bootstrap=0
    )
    assert results["n"].iloc[0] == len(y) - 1
    assert json.loads((run_dir / "probes" / "results.json").read_text())["label_column"] == "is_hallucinating_manual"


def test_errors_say_what_is_wrong(tmp_path):
    run_dir, labels = write_run(tmp_path / "run", n_images=40)
    with pytest.raises(ValueError, match="not in"):
        train_probes(run_dir, features=["query_token/layer_9"])
    with pytest.raises(ValueError, match="no column 'halluc'"):
        train_probes(run_dir, label_column="halluc")
    few = labels.copy()
    few["label"] = ["1" if i < 3 else "0" for i in range(len(few))]
    with pytest.raises(ValueError, match="at least 5 examples of each class"):
        train_probes(run_dir, labels=few, features=[SIGNAL])
    with pytest.raises(ValueError, match="group_by 'nope'"):
        train_probes(run_dir, features=[SIGNAL], group_by="nope", probe_params=FAST_LOGREG)
    (run_dir / "labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="halp label"):
        train_probes(run_dir)


def test_cli_probe_writes_results(tmp_path):
    run_dir, _ = write_run(tmp_path / "run", n_images=80)
    result = CliRunner().invoke(
        app, ["probe", str(run_dir), "--features", f"{SIGNAL},{NOISE}", "--folds", "3", "--bootstrap", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "control" in result.output and "results.csv" in result.output
    frame = pd.read_csv(run_dir / "probes" / "results.csv")
    assert set(frame["feature"]) == {SIGNAL, NOISE} and set(frame["folds"]) == {3}
    for column in ("auroc_mean", "auroc_std", "auroc_ci_low", "auroc_ci_high", "auprc_mean", "accuracy_mean"):
        assert column in frame.columns
    assert {"f1_mean", "control_auroc_mean", "n", "n_positive"} <= set(frame.columns)
    bad = CliRunner().invoke(app, ["probe", str(run_dir), "--probe", "svm"])
    assert bad.exit_code == 2 and "choose logreg, mlp or both" in bad.output


def test_ranking_metrics_equal_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from halp.probe import ranking_metrics

    rng = np.random.default_rng(7)
    for trial in range(30):
        n = int(rng.integers(5, 300))
        y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.int64)
        if y.min() == y.max():
            continue
        score = np.round(rng.random(n), int(rng.integers(1, 4)))  # coarse rounding makes many ties
        auroc, average_precision = ranking_metrics(y, score)
        assert auroc == pytest.approx(roc_auc_score(y, score), abs=1e-12), trial
        assert average_precision == pytest.approx(average_precision_score(y, score), abs=1e-12), trial
    assert all(np.isnan(ranking_metrics(np.ones(4, dtype=np.int64), rng.random(4))))


def test_resampled_ranking_metrics_equal_scikit_learn_on_each_resample():
    """The whole-bootstrap form (rows sorted once, a resample as its counts of each row): every resample equals
    scikit-learn on that resample's rows, ties and repeats included; a resample holding one class is NaN."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from halp.metrics import resampled_ranking_metrics

    rng = np.random.default_rng(11)
    y = (rng.random(40) < 0.3).astype(np.int64)
    score = np.round(rng.random(40), 1)  # many ties
    picks = rng.integers(0, 40, size=(30, 40))
    picks[3] = np.flatnonzero(y == 0)[0]  # a resample of one row, drawn 40 times: one class
    auroc, average_precision = resampled_ranking_metrics(y, score, picks)
    for row, pick in enumerate(picks):
        if y[pick].min() == y[pick].max():
            assert np.isnan(auroc[row]) and np.isnan(average_precision[row]), row
            continue
        assert auroc[row] == pytest.approx(roc_auc_score(y[pick], score[pick]), abs=1e-12), row
        assert average_precision[row] == pytest.approx(average_precision_score(y[pick], score[pick]), abs=1e-12)
    assert np.isnan(auroc[3])


def test_equal_inner_cv_sums_choose_the_largest_C_whatever_their_rounding():
    """Found on a 48-row run: the fold AUROCs of C=1e-3 and C=1e-5 summed to the same fraction, 3.013888..., as
    ...884 and ...893 in floating point, and argmax took 1e-5 (nearly constant risks) where the rule, and
    LogisticRegressionCV, take the largest C."""
    from halp.probe import first_best

    sums = np.array([2.7083333333333335, 2.625, 2.625, 2.763888888888889, 3.0138888888888884, 2.9722222222222223,
                     3.0138888888888893])  # fmt: skip
    assert int(np.argmax(sums)) == 6 and first_best(sums) == 4
    assert first_best(np.array([0.5, 0.75, 0.7])) == 1 and first_best(np.array([1.0, 1.0])) == 0


def test_metric_values_equal_scikit_learn():
    from halp.metrics import METRICS, metric_values

    rng = np.random.default_rng(4)
    for trial in range(20):
        n = int(rng.integers(2, 200))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.int64)
        score = np.round(rng.random(n), int(rng.integers(1, 3)))  # ties, and scores exactly at the threshold
        values = metric_values(y, score)
        for name, definition in METRICS.items():
            if name in ("auroc", "auprc") and y.min() == y.max():
                assert np.isnan(values[name]), (trial, name)
            else:
                assert values[name] == pytest.approx(definition(y, score), abs=1e-12), (trial, name)


def test_bootstrap_intervals_equal_a_scikit_learn_loop():
    from halp.metrics import METRICS

    def metric_values(y, score):  # scikit-learn's own functions, resample by resample
        one_class = y.min() == y.max()
        return {
            name: np.nan if one_class and name in ("auroc", "auprc") else f(y, score) for name, f in METRICS.items()
        }

    rng = np.random.default_rng(3)
    y = (rng.random(120) < 0.3).astype(np.int64)
    score = np.clip(0.3 * y + rng.normal(0.35, 0.2, 120), 0, 1)
    fast = bootstrap_intervals(y, score, 80, seed=5)
    rows = np.random.default_rng(5).integers(0, len(y), size=(80, len(y)))
    slow = {name: [] for name in fast}
    for resample in rows:
        for name, value in metric_values(y[resample], score[resample]).items():
            if not np.isnan(value):
                slow[name].append(value)
    for name, (low, high) in fast.items():
        assert low == pytest.approx(np.percentile(slow[name], 2.5), abs=1e-12), name
        assert high == pytest.approx(np.percentile(slow[name], 97.5), abs=1e-12), name


def test_parallel_features_give_the_serial_results(tmp_path):
    """`jobs=2` evaluates features in two processes, started by the call or before it (`probe_workers`, as halp world
    starts them before extracting): every row, prediction and saved probe is the serial one's.

    Every run uses one torch thread per fit, so the same operations run in the same order; the stated tolerance
    (1e-9 on scores and metrics) only allows for a different BLAS dispatch between processes.
    """
    run_dir, _ = write_run(tmp_path / "run", n_images=120)
    features = [NOISE, SIGNAL, PER_IMAGE]

    def run(jobs: int, workers: Any = None) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
        results = train_probes(
            run_dir,
            features=features,
            probe="both",
            probe_params={**FAST_LOGREG, **FAST_MLP},
            bootstrap=20,
            threads=1,
            jobs=jobs,
            workers=workers,
        )
        predictions = pd.read_csv(run_dir / "probes" / "predictions.csv", dtype={"question_id": str})
        probe, _ = load_probe(probe_stem(run_dir, SIGNAL, "mlp"), device="cpu")
        return results, predictions, probe

    serial = run(1)
    with probe_workers(1) as none:
        assert none is None  # one job: the cells run in the calling process
    with probe_workers(2) as workers:
        started = run(2, workers)
    for parallel in (run(2), started):
        assert list(parallel[0]["feature"]) == [f for f in features for _ in ("logreg", "mlp")]
        numeric = [c for c in serial[0].columns if serial[0][c].dtype.kind == "f" and c != "fit_seconds"]
        np.testing.assert_allclose(parallel[0][numeric].to_numpy(), serial[0][numeric].to_numpy(), rtol=0, atol=1e-9)
        pd.testing.assert_frame_equal(
            parallel[1].drop(columns="score"), serial[1].drop(columns="score"), check_exact=True
        )
        np.testing.assert_allclose(parallel[1]["score"], serial[1]["score"], rtol=0, atol=1e-9)
        X = np.random.default_rng(0).normal(size=(16, serial[2].n_features_in_))
        np.testing.assert_allclose(parallel[2].predict_proba(X), serial[2].predict_proba(X), rtol=0, atol=1e-9)
    with pytest.raises(ParameterError, match="jobs"):
        train_probes(run_dir, features=features, jobs=0)
    with pytest.raises(ParameterError, match="jobs"), probe_workers(0):
        pass
    with pytest.raises(ParameterError, match="jobs"):
        train_probes(run_dir, features=features, jobs=0)


# ----- the batched fits ----------------------------------------------------------------------------
def _problems(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Standardized designs of four sizes (one nearly separable) and their labels, as the Newton solver gets them."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(260, 8))
    y = (X @ rng.normal(size=8) + 0.8 * rng.normal(size=260) > 0.4).astype(np.int64)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("C", [1e-5, 1e-2, 1.0, 10.0])
def test_newton_solver_reaches_scikit_learns_optimum(C):
    """All problems at once, padded to the longest: each one's solution is scikit-learn's (exact_logistic_regression)
    to 1e-5 in coefficients and 1e-6 in probability, and padding changes nothing (1e-9)."""
    from halp.probe import _Problem, newton_logistic

    design, y = _problems()
    sizes = (260, 200, 130, 60)
    together = newton_logistic([_Problem(design[:n], y[:n].astype(float), C) for n in sizes])
    for n, solution in zip(sizes, together, strict=True):
        reference = exact_logistic_regression(C).fit(design[:n], y[:n])
        np.testing.assert_allclose(solution[:-1], reference.coef_.ravel(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(solution[-1], reference.intercept_[0], rtol=1e-5, atol=1e-5)
        ours = 1 / (1 + np.exp(-(design @ solution[:-1] + solution[-1])))
        np.testing.assert_allclose(ours, reference.predict_proba(design)[:, 1], rtol=0, atol=1e-6)
        [alone] = newton_logistic([_Problem(design[:n], y[:n].astype(float), C)])
        np.testing.assert_allclose(alone, solution, rtol=0, atol=1e-9)


@pytest.mark.parametrize("C", [1e-5, 1e-2, 1.0, 10.0])
def test_lbfgs_solver_reaches_scikit_learns_optimum(C):
    """Batched L-BFGS on rows of one shared raw matrix, each problem standardized its own way: at tolerance 1e-7
    each solution is scikit-learn's (exact_logistic_regression) to 1e-5 in coefficients and probability (the
    matmuls are float32)."""
    from halp.probe import lbfgs_logistic_path

    rng = np.random.default_rng(3)
    X = (rng.normal(size=(400, 20)) * rng.uniform(0.1, 30, size=20)).astype(np.float32)
    y = (X[:, :5] @ rng.normal(size=5) / 10 + rng.normal(size=400) > 0.3).astype(np.int64)
    rows = [np.arange(400), np.arange(0, 300), np.arange(100, 400)]
    scalers = [StandardScaler().fit(X[part]) for part in rows]
    means, scales = np.stack([s.mean_ for s in scalers]), np.stack([s.scale_ for s in scalers])
    [solutions], [iterations] = lbfgs_logistic_path(
        X, rows, [y[part] for part in rows], means, scales, np.array([[C] * 3]), tol=1e-7
    )
    for part, scaler, solution in zip(rows, scalers, solutions, strict=True):
        design = scaler.transform(X[part]).astype(np.float64)
        reference = exact_logistic_regression(C).fit(design, y[part])
        np.testing.assert_allclose(solution[:-1], reference.coef_.ravel(), rtol=0, atol=1e-5)
        ours = 1 / (1 + np.exp(-(design @ solution[:-1] + solution[-1])))
        np.testing.assert_allclose(ours, reference.predict_proba(design)[:, 1], rtol=0, atol=1e-5)
    assert (iterations >= 1).all()


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_logreg_batch_equals_logistic_regression_cv_fold_by_fold(solver, monkeypatch):
    """`fit_batch` over CV folds against LogisticRegressionCV on each fold's standardized rows, its solver run to the
    optimum (newton-cholesky, tol 1e-8). Newton: the same C, coefficients to 1e-5. L-BFGS (forced here by a dimension
    limit of 0) stops at scikit-learn's lbfgs tolerance (1e-4 on the mean loss's gradient), as the lbfgs of
    LogisticRegressionCV does, so where small Cs tie exactly (the same ranking) it may pick another of them: its C
    scores within 0.01 of the best summed inner AUROC, and its coefficients are the optimum's at its C to 2e-3."""
    import halp.probe

    if solver == "lbfgs":
        monkeypatch.setattr(halp.probe, "LOGREG_NEWTON_MAX_DIM", 0)
    X, y = _fixed_data(n=240)
    splits = make_splits(y, None, folds=3, seed=0)
    probes = LogRegProbe(cv=4, random_state=7).fit_batch(X, [Fit(train, y) for train, _ in splits])
    modern = "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters
    kwargs = {"l1_ratios": (0.0,), "use_legacy_attributes": False} if modern else {}
    for probe, (train, _) in zip(probes, splits, strict=True):
        standardized = StandardScaler().fit_transform(X[train])
        reference = LogisticRegressionCV(
            Cs=list(LOGREG_CS),
            cv=StratifiedKFold(4, shuffle=True, random_state=7),
            scoring="roc_auc",
            solver="newton-cholesky",
            tol=1e-8,
            max_iter=1000,
            **kwargs,
        ).fit(standardized, y[train])
        chosen = float(np.ravel(reference.C_)[0])
        summed = np.asarray(reference.scores_).reshape(4, len(LOGREG_CS)).sum(axis=0)
        if solver == "newton":
            assert LOGREG_CS.index(probe.C_) == LOGREG_CS.index(chosen)  # the same value of the grid
        else:
            assert summed[LOGREG_CS.index(probe.C_)] >= summed.max() - 0.01
        at_C = exact_logistic_regression(probe.C_).fit(standardized, y[train])
        tolerance = 1e-5 if solver == "newton" else 2e-3
        np.testing.assert_allclose(probe.coef_, at_C.coef_.ravel(), rtol=tolerance, atol=tolerance)
        assert probe.intercept_ == pytest.approx(float(at_C.intercept_[0]), abs=tolerance)
        assert probe.n_iter_.shape == (4, len(LOGREG_CS)) and (probe.n_iter_ >= 1).all() and probe.refit_n_iter_ >= 1


def test_stacked_networks_compute_build_mlps_network():
    """The batched program's networks, in training (no dropout) and evaluation mode, equal `build_mlp`'s with the
    same tensors: outputs to 1e-5, BatchNorm running statistics to 1e-6 after a training step."""
    from halp.probe import _StackedMLPs

    torch.manual_seed(0)
    reference = build_mlp(6, (16, 8), 0.0)
    stack = _StackedMLPs(reference, 3, torch.device("cpu"))
    inputs = torch.randn(3, 20, 6)
    logits = stack.forward(inputs.transpose(1, 2), masks=[None, None])  # a training step's forward
    reference.train()
    for k in range(3):
        single = build_mlp(6, (16, 8), 0.0)
        single.load_state_dict(reference.state_dict())
        np.testing.assert_allclose(
            logits[k].detach().numpy(), single.train()(inputs[k]).squeeze(1).detach().numpy(), rtol=0, atol=1e-5
        )
        trained = stack.network(stack.snapshot(k), steps=1)
        np.testing.assert_allclose(trained[2].running_mean.numpy(), single[2].running_mean.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(trained[2].running_var.numpy(), single[2].running_var.numpy(), rtol=0, atol=1e-6)
        evaluated = stack.forward(inputs[k : k + 1].transpose(1, 2), select=torch.tensor([k]))[0]
        np.testing.assert_allclose(
            evaluated.detach().numpy(), trained(inputs[k]).squeeze(1).detach().numpy(), rtol=0, atol=1e-5
        )
    assert set(reference.state_dict()) == set(trained.state_dict())


def test_stacked_gradients_are_autograds_for_build_mlps_network():
    """A training step's gradients in the stack (the first layer's weight gradient written into a kept buffer by its
    own backward, the rest by autograd) are autograd's for each network as `build_mlp` builds it, to 1e-5, and the
    buffer is rewritten, not accumulated, by the next step."""
    from halp.probe import _StackedMLPs

    torch.manual_seed(0)
    reference = build_mlp(6, (16, 8), 0.0)
    stack = _StackedMLPs(reference, 3, torch.device("cpu"))
    inputs, targets = torch.randn(3, 20, 6), (torch.rand(3, 20) < 0.5).float()
    for _ in range(2):  # the second step must give the same gradients (same weights: no optimizer step between)
        stack.clear_gradients()
        logits = stack.forward(inputs.transpose(1, 2), masks=[None, None])
        nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum().backward()
    gradients = stack.gradients()
    for k in range(3):
        single = build_mlp(6, (16, 8), 0.0)
        single.load_state_dict(reference.state_dict())
        single.train()
        nn.functional.binary_cross_entropy_with_logits(single(inputs[k]).squeeze(1), targets[k]).backward()
        linears = [layer for layer in single if isinstance(layer, nn.Linear)]
        norms = [layer for layer in single if isinstance(layer, nn.BatchNorm1d)]
        expected = [
            *(layer.weight.grad for layer in linears),
            *(layer.bias.grad[:, None] for layer in linears),
            *(layer.weight.grad for layer in norms),
            *(layer.bias.grad for layer in norms),
        ]
        assert len(expected) == len(gradients)
        for ours, theirs in zip(gradients, expected, strict=True):
            np.testing.assert_allclose(ours[k].numpy(), theirs.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "element-wise"])
def test_stacked_adam_is_torch_adam(fused):
    """The stacked networks' Adam (written out to keep torch.optim's import cost out of every worker), with the fused
    kernel and with the element-wise operations, gives torch.optim.Adam's parameters after 20 steps, to 1e-6, and
    dropping a network keeps the others' moments."""
    from halp.probe import _StackedAdam

    torch.manual_seed(0)
    ours = [torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    theirs = [tensor.detach().clone().requires_grad_(True) for tensor in ours]
    stacked, reference = _StackedAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2)
    assert stacked.fused == hasattr(torch, "_fused_adam_")
    stacked.fused = stacked.fused and fused
    for step in range(20):
        for group in (ours, theirs):
            loss = sum(
                ((tensor - step / 10) ** 2 * torch.arange(1, tensor.numel() + 1).view_as(tensor)).sum()
                for tensor in group
            )
            loss.backward()
        stacked.step(ours, [tensor.grad for tensor in ours])
        for tensor in ours:
            tensor.grad = None
        reference.step()
        reference.zero_grad()
    for mine, torchs in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine.detach().numpy(), torchs.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert stacked.fused == (fused and hasattr(torch, "_fused_adam_"))  # the kernel ran (or was never there)
    kept = torch.tensor([0, 2])
    stacked.keep(kept)
    np.testing.assert_allclose(
        stacked.first[0].numpy(), reference.state[theirs[0]]["exp_avg"][kept].numpy(), rtol=1e-6, atol=1e-9
    )


def test_batched_mlp_fits_equal_separate_fits_and_are_seeded():
    """Eleven fits trained together are each the fit trained alone (same code, K=1): same epochs, same held-out
    history and probabilities to 1e-6. The seed fixes the result; another seed changes it."""
    X, y = _fixed_data(n=300)
    probe = MLPProbe(hidden=(16, 8), epochs=12, batch_size=32, patience=3, threads=1)
    splits = make_splits(y, None, folds=5, seed=0)
    fits = [Fit(train, y) for train, _ in splits] + [Fit(np.arange(len(y)), y)]
    together = probe.fit_batch(X, fits)
    for fit, fitted in zip(fits, together, strict=True):
        [alone] = probe.fit_batch(X, [fit])
        assert (fitted.best_epoch_, len(fitted.loss_history_)) == (alone.best_epoch_, len(alone.loss_history_))
        np.testing.assert_allclose(fitted.validation_loss_history_, alone.validation_loss_history_, rtol=0, atol=1e-6)
        np.testing.assert_allclose(fitted.predict_proba(X), alone.predict_proba(X), rtol=0, atol=1e-6)
        assert fitted.rows_per_epoch_ == (len(fit.rows) - len(fitted.held_out_)) // 32 * 32
    final = MLPProbe(**probe.get_params()).fit(X, y)
    np.testing.assert_allclose(final.predict_proba(X), together[-1].predict_proba(X), rtol=0, atol=1e-6)
    other = MLPProbe(**{**probe.get_params(), "random_state": 5}).fit(X, y)
    assert np.abs(other.predict_proba(X) - final.predict_proba(X)).max() > 1e-3


def test_early_stopping_keeps_the_best_epoch_on_rows_outside_the_test_fold(tmp_path):
    """Grouped CV: each fit's held-out rows lie in its training fold (never the test fold), hold whole images,
    hold both classes near the fold's rate, are drawn the same way twice and differently with another seed; the
    kept network's loss on them is the best of its history."""
    from halp.probe import early_stopping_split

    rng = np.random.default_rng(4)
    images = np.repeat(np.arange(150), 2)
    y = np.repeat((rng.random(150) < 0.35).astype(np.int64), 2)
    X = (rng.normal(size=(300, 6)) + 0.7 * y[:, None]).astype(np.float32)
    splits = make_splits(y, images, folds=5, seed=0)
    probe = MLPProbe(hidden=(16, 8), epochs=15, batch_size=32, patience=2, threads=1)
    fitted = probe.fit_batch(X, [Fit(train, y) for train, _ in splits], images)
    for (train, test), one in zip(splits, fitted, strict=True):
        held = one.held_out_
        assert set(held) <= set(train) and not set(held) & set(test)
        assert not set(images[held]) & set(images[np.setdiff1d(train, held)])
        assert 0.06 < len(held) / len(train) < 0.14 and abs(y[held].mean() - y[train].mean()) < 0.1
        np.testing.assert_array_equal(held, early_stopping_split(train, y, images, 0.1, 42)[1])
        assert not np.array_equal(held, early_stopping_split(train, y, images, 0.1, 43)[1])
        logits = one.decision_function(X[held])
        loss = float(np.mean(np.logaddexp(0, logits) - y[held] * logits))
        assert loss == pytest.approx(min(one.validation_loss_history_), abs=1e-5)
        assert one.validation_loss_history_[one.best_epoch_ - 1] == min(one.validation_loss_history_)
        assert len(one.loss_history_) <= one.best_epoch_ + 2
    # A fold too small to stratify (one positive in 12 rows) still holds out a seeded part, unstratified: the
    # held-out loss needs no particular class. Before, such a fold stopped `halp probe` on any small run.
    tiny_y = np.r_[np.ones(1), np.zeros(11)].astype(int)
    small = MLPProbe(hidden=(4,), epochs=2).fit(X[:12], tiny_y)
    assert len(small.validation_loss_history_) >= 1
    kept, held = early_stopping_split(np.arange(12), tiny_y, None, 0.1, 42)
    assert len(held) == 2 and sorted([*kept, *held]) == list(range(12))
    kept, held = early_stopping_split(np.arange(12), tiny_y, np.repeat(np.arange(6), 2), 0.1, 42)
    assert len(held) == 2 and held[0] // 2 == held[1] // 2  # one whole image held out
    # One that cannot hold out anything (a single image) names the way out.
    with pytest.raises(ProbeError, match="validation_fraction=None"):
        MLPProbe(hidden=(4,), epochs=2).fit(X[:4], np.array([0, 1, 0, 1]), groups=np.array(["a"] * 4))
    without = MLPProbe(hidden=(4,), epochs=3, batch_size=4, validation_fraction=None).fit(
        X[:12], np.r_[np.ones(1), np.zeros(11)].astype(int)
    )
    assert len(without.loss_history_) == 3 and without.validation_loss_history_ == []


def test_probes_saved_before_the_batched_fits_load_and_predict_the_same():
    """tests/data/probes_saved_by_8708f24: probes saved by the code before this change (logreg with inner CV, a small
    MLP), with their predictions then; loaded now they predict the same to 1e-12."""
    folder = Path(__file__).parent / "data" / "probes_saved_by_8708f24"
    expected = json.loads((folder / "expected.json").read_text())["p_hallucinated"]
    query = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32) * 10
    for kind in ("logreg", "mlp"):
        probe, meta = load_probe(folder / kind)
        assert meta["feature"] == "query_token/layer_1"
        np.testing.assert_allclose(probe.predict_proba(query)[:, 1], expected[kind], rtol=0, atol=1e-12)


def test_a_studys_early_stopping_rows_are_grouped_stratified_parts_of_each_training_fold(tmp_path):
    """Every fit of a grouped study (CV, control, final): the held-out rows are ~10% of its training rows, whole
    images, never a test row, at nearly its class rate (real or control labels), the same for the same seed."""
    from halp.probe import ProbeSettings, early_stopping_split, load_probe_data

    run_dir, _ = write_run(tmp_path / "run", n_images=500, per_image=2, positive_rate=0.35)
    data = load_probe_data(run_dir, ProbeSettings(probe="mlp"))
    assert data.grouped and data.groups is not None
    fits = data.fits()
    tests = [test for _, test in data.splits] + [test for _, test in data.control_splits] + [np.zeros(0, dtype=int)]
    for fit, test in zip(fits, tests, strict=True):
        trained, held = early_stopping_split(fit.rows, fit.y, data.groups, 0.1, 42)
        np.testing.assert_array_equal(np.sort(np.r_[trained, held]), fit.rows)
        assert not set(held) & set(test) and not set(data.groups[held]) & set(data.groups[trained])
        assert 0.09 < len(held) / len(fit.rows) < 0.11
        assert abs(fit.y[held].mean() - fit.y[fit.rows].mean()) < 0.02
        np.testing.assert_array_equal(held, early_stopping_split(fit.rows, fit.y, data.groups, 0.1, 42)[1])
        assert not np.array_equal(held, early_stopping_split(fit.rows, fit.y, data.groups, 0.1, 7)[1])


def test_probe_workers_leave_ctrl_c_to_the_main_process_while_idle():
    """The probe processes ignore SIGINT while they wait for cells (no traceback from each on Ctrl-C) and do not
    block it (a cell takes it: `_evaluate_in_worker`)."""
    with ProbeWorkers(2) as workers:
        pool = workers.ready()
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert signal.SIGINT not in pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, set()).result()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process keeps its handler


def test_ctrl_c_during_a_parallel_probe_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C to `halp probe --jobs 2`'s process group (as a terminal sends it) while the probe processes start or
    run cells: exit 130, the one "interrupted" line, no traceback from any process, none left behind."""
    run_dir, _ = write_run(tmp_path / "run", n_images=600, dim=64)
    log = tmp_path / "output.txt"  # stdout and stderr; a file, not a pipe, which an unread full pipe would stall
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "halp", "probe", str(run_dir), "--probe", "both", "--jobs", "2"],
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and "labelled rows" not in log.read_text():
        time.sleep(0.05)
    assert process.poll() is None, "halp probe ended before the interrupt: " + log.read_text()[-2000:]
    os.killpg(process.pid, signal.SIGINT)  # the data is read; the processes are starting (2-3 s) or running cells
    try:
        returncode = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail("halp probe did not end within 90 s of Ctrl-C")
    text = log.read_text()
    assert returncode == 130, text[-2000:]
    assert "Traceback" not in text and "interrupted" in text.strip().splitlines()[-1], text[-2000:]
    deadline = time.monotonic() + 30  # the fork server and the probe processes leave with the main process
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of halp probe's group outlived it by 30 s")


def test_a_probe_process_that_took_ctrl_c_runs_no_further_cell(monkeypatch):
    """A cell interrupted by Ctrl-C marks its process, and the next cell queued to it ends at once (KeyboardInterrupt)
    instead of running after the main process stopped waiting; other exceptions do not mark it."""
    import halp.probe as probe_module

    class Data:
        def matrix(self, feature: str) -> np.ndarray:
            return np.zeros((2, 2), dtype=np.float32)

    calls = []

    def interrupted(*args: Any) -> None:
        calls.append(args[2])
        raise KeyboardInterrupt if args[2] == "stopped" else ProbeError("a failed cell")

    monkeypatch.setattr(probe_module, "evaluate_feature", interrupted)
    monkeypatch.setattr(probe_module, "_took_ctrl_c", False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(ProbeError):
            probe_module._evaluate_in_worker(Data(), ProbeSettings(), "failed", "logreg")
        assert not probe_module._took_ctrl_c
        with pytest.raises(KeyboardInterrupt):
            probe_module._evaluate_in_worker(Data(), ProbeSettings(), "stopped", "logreg")
        assert probe_module._took_ctrl_c
        with pytest.raises(KeyboardInterrupt):
            probe_module._evaluate_in_worker(Data(), ProbeSettings(), "queued", "logreg")
    finally:
        signal.signal(signal.SIGINT, handler)  # a cell leaves SIGINT ignored, as a probe process's idle state
    assert calls == ["failed", "stopped"]  # the queued cell never started
