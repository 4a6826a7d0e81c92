"""`RiskScorer` and `halp predict`: risk = the saved probe applied to prefill features, nothing generated.

The reference is independent of the scorer's own path: features written by `halp extract
--no-generate` (another process-level entry point, another batch size) for the same rows, fed to
the probe file loaded with `halp.probe.load_probe`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.data import load_image, read_samples
from halp.demo import make_planted_set
from halp.extract import ExtractConfig, run_extraction
from halp.label import label_run
from halp.predict import RiskScorer, ScorerError, choose_probe
from halp.probe import load_probe, probe_stem, train_probes
from halp.store import read_strings

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
CHECKED_FEATURES = (
    "vision_only",
    "vision_projected",
    "vision_token/layer_1",
    "vision_token_mean/layer_2",
    "query_token/layer_3",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir) -> dict[str, Path]:
    """A generated run (answers decoded) with both probe types trained on the planted image label."""
    root = tmp_path_factory.mktemp("predict")
    table, images, planted = make_planted_set(root / "data", n_images=15, unknown_fraction=0.0, seed=1)
    checkpoint = checkpoint_dir("qwen2_vl")
    run = root / "run"
    config = ExtractConfig(
        model=str(checkpoint),
        data=table,
        images=images,
        out=run,
        layers="halp",
        batch_size=4,
        max_new_tokens=3,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    assert run_extraction(config).finished
    label_run(run, labels=planted, label_column="image_label")
    train_probes(
        run, probe="both", folds=3, bootstrap=0, seed=0, probe_params={"logreg": {"C": 1.0}, "mlp": {"epochs": 3}}
    )
    # The reference features: the CLI's prefill-only extraction of the same rows, another batch size.
    reference = root / "no_generate"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            *("--model", str(checkpoint), "--data", str(table), "--images", str(images), "--out", str(reference)),
            *("--no-generate", "--device", "cpu", "--dtype", "float32", "--batch-size", "3"),
        ],
    )
    assert result.exit_code == 0, result.output
    return {"run": run, "table": table, "images": images, "reference": reference, "checkpoint": checkpoint}


def _reference_risks(trained: dict[str, Path], feature: str, probe: str) -> tuple[list[str], np.ndarray]:
    with h5py.File(trained["reference"] / "features.h5", "r") as handle:
        assert handle.attrs["max_new_tokens"] == 0
        ids = read_strings(handle["question_id"])
        features = handle[feature][()]
    fitted, _ = load_probe(probe_stem(trained["run"], feature, probe))
    return ids, fitted.predict_proba(features)[:, 1]


@pytest.mark.parametrize("probe", ["logreg", "mlp"])
def test_score_equals_saved_probe_on_no_generate_features(trained: dict[str, Path], probe: str) -> None:
    samples = read_samples(trained["table"])
    questions = [sample.question for sample in samples]
    # Paths and PIL images are both accepted.
    images = [
        str(trained["images"] / s.image_id) if i % 2 else load_image(trained["images"], s.image_id)
        for i, s in enumerate(samples)
    ]
    per_feature = {}
    for feature in CHECKED_FEATURES:
        scorer = RiskScorer.from_run(trained["run"], feature=feature, probe=probe, device="cpu")
        assert (scorer.feature, scorer.probe_name) == (feature, probe)
        ids, expected = _reference_risks(trained, feature, probe)
        assert ids == [sample.question_id for sample in samples]
        got = scorer.score_batch(images, questions)
        np.testing.assert_allclose(got, expected, **CLOSE, err_msg=feature)
        assert scorer.score(images[3], questions[3]) == pytest.approx(expected[3], rel=1e-4, abs=1e-5)
        per_feature[feature] = got
    # Non-vacuous: the risks vary across rows and depend on which feature is read.
    assert all(np.std(risks) > 1e-3 for risks in per_feature.values())
    assert not np.allclose(per_feature["vision_only"], per_feature["query_token/layer_3"], atol=1e-3)


def test_default_is_best_probe_and_run_settings(trained: dict[str, Path]) -> None:
    results = pd.read_csv(trained["run"] / "probes" / "results.csv")
    best = results.loc[results["auroc_mean"].idxmax()]
    scorer = RiskScorer.from_run(trained["run"], device="cpu")
    assert (scorer.feature, scorer.probe_name) == (best["feature"], best["probe"])
    assert scorer.threshold == 0.5  # the saved probe's
    assert str(next(scorer.extractor.model.parameters()).dtype) == "torch.float32"  # the run's dtype
    only_mlp = results[results["probe"] == "mlp"]
    assert choose_probe(trained["run"], probe="mlp") == (
        only_mlp.loc[only_mlp["auroc_mean"].idxmax(), "feature"],
        "mlp",
    )
    assert RiskScorer.from_run(trained["run"], "vision_only", "logreg", "cpu", threshold=0.9).threshold == 0.9


def test_predict_cli_writes_risk_and_flags(trained: dict[str, Path], tmp_path: Path) -> None:
    table = pd.read_csv(trained["table"], dtype=str).head(6)
    missing = table.iloc[[0]].assign(question_id="lost", image_id="no_such_image.png")
    data = tmp_path / "new.csv"
    pd.concat([table, missing]).to_csv(data, index=False)
    out = tmp_path / "risk.csv"
    args = ["predict", "--run", str(trained["run"]), "--data", str(data), "--images", str(trained["images"])]
    result = CliRunner().invoke(
        app, [*args, "--feature", "query_token/layer_3", "--threshold", "0.4", "--out", str(out)]
    )
    assert result.exit_code == 1, result.output  # one row could not be scored
    written = pd.read_csv(out, dtype={"question_id": str})
    assert list(written.columns) == ["question_id", "risk", "flagged", "error"]
    assert list(written["question_id"]) == [*table["question_id"], "lost"]
    lost = written.iloc[-1]
    assert np.isnan(lost["risk"]) and "no_such_image.png" in lost["error"]
    scored = written.iloc[:-1]
    best_probe = choose_probe(trained["run"], feature="query_token/layer_3")[1]
    _, expected = _reference_risks(trained, "query_token/layer_3", best_probe)
    np.testing.assert_allclose(scored["risk"].to_numpy(), expected[:6], **CLOSE)
    assert list(scored["flagged"].astype(int)) == [int(r >= 0.4) for r in scored["risk"]]

    default_out = trained["run"] / "risk" / "new.csv"
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == 1 and default_out.is_file()


def test_errors_say_what_is_wrong(trained: dict[str, Path], tmp_path: Path, checkpoint_dir) -> None:
    with pytest.raises(ScorerError, match="no scored probe"):
        RiskScorer.from_run(trained["run"], feature="query_token/layer_99", device="cpu")
    with pytest.raises(ScorerError, match="no saved probe"):
        RiskScorer.from_run(trained["run"], feature="query_token/layer_3", probe="svm", device="cpu")
    with pytest.raises(ScorerError, match="not a halp feature"):
        RiskScorer.from_run(trained["run"], feature="logits/layer_1", probe="logreg", device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(trained["run"] / "features.h5", bare / "features.h5")
    with pytest.raises(ScorerError, match="halp probe"):
        RiskScorer.from_run(bare, device="cpu")
    with pytest.raises(ScorerError, match="qwen2_vl model"):
        RiskScorer.from_run(trained["run"], "vision_only", "logreg", "cpu", model=str(checkpoint_dir("qwen2_5_vl")))
    scorer = RiskScorer.from_run(trained["run"], "vision_only", "logreg", "cpu")
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        scorer.score_batch([trained["images"] / "img_0000.png"] * 2, ["Why?"])


def test_import_halp_is_light_and_exports_risk_scorer_lazily() -> None:
    code = (
        "import sys, halp\n"
        "assert 'torch' not in sys.modules and 'halp.predict' not in sys.modules\n"
        "from halp import RiskScorer\n"
        "assert RiskScorer.__module__ == 'halp.predict'\n"
        "try:\n"
        "    halp.NoSuchThing\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('missing attribute did not raise')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_bad_rows_get_an_error_and_the_others_a_risk(trained: dict[str, Path], tmp_path: Path) -> None:
    """Issue 10, finding 4: rows that stopped `halp predict` before (nothing was written) are that row's error."""
    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(trained["images"], images)
    Image.new("RGB", (1200, 4), "red").save(images / "sliver.png")
    table = pd.read_csv(trained["table"], dtype=str).head(3)
    first = table.iloc[0]
    bad = pd.DataFrame(
        [
            {**first.to_dict(), "question_id": "sliver", "image_id": "sliver.png"},
            {**first.to_dict(), "question_id": "placeholder", "question": "Is <|image_pad|> red?"},
            {**first.to_dict(), "question_id": "long_name", "image_id": "x" * 300 + ".png"},
        ]
    )
    data = tmp_path / "hostile.csv"
    pd.concat([table.iloc[:1], bad, table.iloc[1:]]).to_csv(data, index=False)
    out = tmp_path / "risk.csv"
    result = CliRunner().invoke(
        app,
        ["predict", "--run", str(trained["run"]), "--data", str(data), "--images", str(images),
         "--feature", "query_token/layer_3", "--probe", "logreg", "--device", "cpu", "--out", str(out)],
    )
    assert result.exit_code == 1, result.output
    written = pd.read_csv(out, dtype={"question_id": str}).set_index("question_id")
    assert written.loc[list(table["question_id"]), "risk"].notna().all()
    assert written.loc[["sliver", "placeholder", "long_name"], "risk"].isna().all()
    assert "aspect ratio" in written.loc["sliver", "error"]
    assert "<|image_pad|>" in written.loc["placeholder", "error"]
    assert "not a usable file name" in written.loc["long_name", "error"]


# ----- messages that lead somewhere: each hint is followed here and works --------------------------------------------
def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_predict_on_a_run_without_probes_says_to_train_them_and_that_works(trained: dict[str, Path], tmp_path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("features.h5", "run.json", "labels.csv"):
        shutil.copy2(trained["run"] / name, bare / name)
    table = pd.read_csv(trained["table"], dtype=str).head(4)
    data = tmp_path / "new.csv"
    table.to_csv(data, index=False)
    predict = ["predict", "--run", str(bare), "--data", str(data), "--images", str(trained["images"]),
               "--device", "cpu"]  # fmt: skip
    refused = CliRunner().invoke(app, predict)
    line = _one_line(refused.output)
    assert refused.exit_code == 2 and line.endswith(f"run `halp probe {bare}` first"), line
    assert "name both" not in line
    # The step the message names (on one feature, without resamples, in 3 folds: the test stays short).
    quick = ["--features", "query_token/layer_3", "--bootstrap", "0", "--folds", "3"]
    followed = CliRunner().invoke(app, ["probe", str(bare), *quick])
    assert followed.exit_code == 0, followed.output
    scored = CliRunner().invoke(app, predict)
    assert scored.exit_code == 0, scored.output
    assert pd.read_csv(bare / "risk" / "new.csv")["risk"].notna().all()


def test_a_probe_that_was_not_trained_names_the_trained_ones_and_how_to_train_it(trained: dict[str, Path], tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    for path in (run / "probes" / "models").glob("query_token__layer_3__mlp.*"):
        path.unlink()
    table = pd.read_csv(trained["table"], dtype=str).head(4)
    data = tmp_path / "new.csv"
    table.to_csv(data, index=False)
    predict = ["predict", "--run", str(run), "--data", str(data), "--images", str(trained["images"]), "--device", "cpu"]
    with pytest.raises(ScorerError, match="choose one of its trained probes with feature= and probe="):
        RiskScorer.from_run(run, "query_token/layer_3", "mlp", "cpu")
    refused = CliRunner().invoke(app, [*predict, "--feature", "query_token/layer_3", "--probe", "mlp"])
    line = _one_line(refused.output)
    assert refused.exit_code == 2 and "choose one of its trained probes with --feature and --probe (" in line, line
    results = pd.read_csv(run / "probes" / "results.csv").sort_values("auroc_mean", ascending=False, kind="stable")
    asked = ("query_token/layer_3", "mlp")
    best_saved = next(row for _, row in results.iterrows() if (row["feature"], row["probe"]) != asked)
    assert f"({best_saved['feature']} ({best_saved['probe']}), " in line and "query_token/layer_3 (mlp)" not in line
    train = f"`halp probe {run} --features query_token/layer_3 --probe mlp`"
    assert line.endswith(f"or train this one with {train}")
    # Both ways out work: a listed probe, or training the asked one with the command shown.
    listed = CliRunner().invoke(app, [*predict, "--feature", "query_token/layer_3", "--probe", "logreg"])
    assert listed.exit_code == 0, listed.output
    assert CliRunner().invoke(app, [*train.strip("`").split()[1:], "--bootstrap", "0", "--folds", "3"]).exit_code == 0
    trained_now = CliRunner().invoke(app, [*predict, "--feature", "query_token/layer_3", "--probe", "mlp"])
    assert trained_now.exit_code == 0, trained_now.output


def test_a_probe_without_a_saved_threshold_asks_for_one_and_taking_it_works(trained: dict[str, Path], tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    stem = probe_stem(run, "vision_only", "logreg")
    saved = stem.with_name(stem.name + ".json")
    config = json.loads(saved.read_text())
    config["meta"].pop("threshold")  # a probe saved without one (written by another tool, say)
    saved.write_text(json.dumps(config))
    table = pd.read_csv(trained["table"], dtype=str).head(4)
    data = tmp_path / "new.csv"
    table.to_csv(data, index=False)
    predict = ["predict", "--run", str(run), "--data", str(data), "--images", str(trained["images"]), "--device", "cpu",
               "--feature", "vision_only", "--probe", "logreg"]  # fmt: skip
    with pytest.raises(ScorerError, match=r"pass one as threshold=$"):
        RiskScorer.from_run(run, "vision_only", "logreg", "cpu")
    refused = CliRunner().invoke(app, predict)
    assert refused.exit_code == 2 and _one_line(refused.output).endswith("pass one as --threshold")
    assert CliRunner().invoke(app, [*predict, "--threshold", "0.5"]).exit_code == 0
