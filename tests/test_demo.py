"""`halp demo`: the planted VQA set is what it claims, the planted check can fail, and the demo passes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from halp.cli import app
from halp.demo import BLIND_MAX_AUROC, FOUND_AUROC, PLANTED, make_planted_set, planted_checks
from halp.report import is_vision_feature


def test_planted_labels_depend_only_on_what_they_claim(tmp_path: Path) -> None:
    table, images, labels = make_planted_set(tmp_path, n_images=40, unknown_fraction=0.0, seed=3)
    vqa = pd.read_csv(table, dtype=str)
    planted = pd.read_csv(labels, dtype={"question_id": str})
    assert not set(PLANTED) & set(vqa.columns)  # the labels are not in the table the model reads
    assert list(planted["question_id"]) == list(vqa["question_id"])
    rows = vqa.merge(planted, on="question_id")
    for _, row in rows.iterrows():
        pixels = np.asarray(Image.open(images / row["image_id"]))
        # The background dominates the median whatever the shape: below 120 is a low-light image.
        assert row["image_label"] == int(np.median(pixels) < 120), row["image_id"]
        assert row["lighting"] == ("dark" if row["image_label"] else "bright")
        counting = row["question"].startswith(("How many", "Count"))
        assert row["question_label"] == int(counting), row["question"]
    # Both labels occur, and neither decides the other (each image is asked both kinds of question).
    assert set(rows["image_label"]) == set(rows["question_label"]) == {0, 1}
    assert len(pd.crosstab(rows["image_label"], rows["question_label"]).to_numpy().ravel().nonzero()[0]) == 4
    assert vqa.groupby("image_id")["question_id"].count().eq(2).all()


def test_unknown_labels_are_left_empty(tmp_path: Path) -> None:
    _, _, labels = make_planted_set(tmp_path, n_images=30, unknown_fraction=0.5, seed=0)
    planted = pd.read_csv(labels, dtype=str, keep_default_na=False)
    for column in PLANTED:
        assert 0 < (planted[column] == "").sum() < len(planted)
        assert set(planted[column]) <= {"", "0", "1"}


def _results(auroc: dict[str, float], control: float = 0.5) -> pd.DataFrame:
    return pd.DataFrame(
        {"feature": list(auroc), "probe": "logreg", "auroc_mean": list(auroc.values()), "control_auroc_mean": control}
    )


FEATURES = [
    "vision_only",
    "vision_projected",
    "vision_token/layer_0",
    "vision_token_mean/layer_0",
    "query_token/layer_0",
]


def _planted_outcome(image_vision: float = 0.99, question_query: float = 0.99, question_vision: float = 0.5):
    image = _results({f: image_vision if is_vision_feature(f) else 0.8 for f in FEATURES})
    question = _results({f: question_vision if is_vision_feature(f) else question_query for f in FEATURES})
    return image, question


def test_planted_check_passes_on_the_planted_outcome() -> None:
    checks = planted_checks(*_planted_outcome())
    assert len(checks) == 4 and all(check.passed for check in checks)


@pytest.mark.parametrize(
    ("outcome", "failing"),
    [
        ({"image_vision": FOUND_AUROC - 0.05}, "best vision-derived AUROC"),
        ({"question_query": FOUND_AUROC - 0.05}, "best query-token AUROC"),
        ({"question_vision": BLIND_MAX_AUROC + 0.05}, "cannot see the question"),
    ],
)
def test_planted_check_fails_when_the_outcome_is_wrong(outcome: dict[str, float], failing: str) -> None:
    checks = planted_checks(*_planted_outcome(**outcome))
    assert [check.claim for check in checks if not check.passed] == [
        next(check.claim for check in checks if failing in check.claim)
    ]


def test_planted_check_fails_when_the_control_is_not_at_chance() -> None:
    image, question = _planted_outcome()
    checks = planted_checks(image.assign(control_auroc_mean=0.9), question)
    assert [check.passed for check in checks] == [True, False, True, True]


@pytest.mark.slow
def test_demo_end_to_end_finds_each_planted_label_where_it_was_planted(tmp_path: Path) -> None:
    """The whole CLI demo (smaller set than the default, same design): extract, label, probe, report, check."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--images", "80"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == 4 and "FAIL" not in result.output

    results = {label: pd.read_csv(out / label / "probes" / "results.csv") for label in PLANTED}
    image, question = results["image_label"], results["question_label"]
    vision = [is_vision_feature(feature) for feature in image["feature"]]
    query = [feature.startswith("query_token/") for feature in question["feature"]]
    # Independently of planted_checks: the image label is found by vision features, not by chance ...
    assert image[vision]["auroc_mean"].max() >= FOUND_AUROC
    best_vision = image[vision].loc[image[vision]["auroc_mean"].idxmax()]
    assert abs(best_vision["control_auroc_mean"] - 0.5) <= 0.15
    assert best_vision["auroc_ci_low"] > 0.5
    # ... and the question label by query-token features, while vision features stay blind to it.
    assert question[query]["auroc_mean"].max() >= FOUND_AUROC
    assert question[[is_vision_feature(f) for f in question["feature"]]]["auroc_mean"].max() <= BLIND_MAX_AUROC
    assert question.loc[question["feature"] == "vision_only", "auroc_mean"].item() == pytest.approx(0.5, abs=0.15)

    for label in PLANTED:
        report = out / label / "report" / "report.html"
        assert report.is_file() and str(report) in result.output
        labels = pd.read_csv(out / label / "labels.csv", dtype=str, keep_default_na=False)
        assert set(labels["method"]) == {"manual"} and len(labels) == 160
    assert (out / "run" / "features.h5").is_file()
