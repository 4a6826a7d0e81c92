"""`halp report` on probe results trained by the real `halp.probe.train_probes` over a synthetic run.

The run's features are synthetic (no model is needed to test a report): one feature carries the
label, the others are noise, so what the report must single out is known in advance.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from halp.cli import app
from halp.probe import train_probes
from halp.report import (
    NO_LAYER,
    ReportError,
    auroc_grids,
    build_report,
    label_balance,
    probe_settings,
    read_probe_results,
    roc_curve_rows,
    split_feature,
)
from halp.store import Rows, write_rows

N = 120
LAYERS = (0, 2)
SIGNAL = "query_token/layer_2"
HOSTILE = "<script>alert('x')</script>"
HOSTILE_MODEL = '<img src=x onerror="alert(1)">'


def _feature_names() -> list[str]:
    names = ["vision_only", "vision_projected"]
    for group in ("vision_token", "vision_token_mean", "query_token"):
        names += [f"{group}/layer_{layer}" for layer in LAYERS]
    return names


def _write_run(run_dir: Path, seed: int = 0) -> np.ndarray:
    """features.h5 where only SIGNAL predicts the label, and labels.csv with a few unknowns."""
    rng = np.random.default_rng(seed)
    y = (np.arange(N) % 5 < 2).astype(int)  # 40 % hallucinated
    rng.shuffle(y)
    features = {}
    for name in _feature_names():
        values = rng.normal(size=(N, 8)).astype(np.float32)
        if name == SIGNAL:
            values[:, 0] += 2.5 * y
        features[name] = values
    qids = [f"q{i:03d}" for i in range(N)]
    rows = Rows(
        strings={
            "question_id": qids,
            "image_id": [f"img{i // 2:03d}.png" for i in range(N)],
            "question": ["Is it?"] * N,
            "ground_truth": ["yes"] * N,
            "answer": ["no"] * N,
            "row_sha256": [""] * N,  # no content digest: these rows were not extracted from a table
        },
        meta={"source": [HOSTILE if i % 2 else "plain & simple" for i in range(N)]},
        features=features,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_rows(run_dir / "features.h5", rows, {"model_id": HOSTILE_MODEL, "layers": list(LAYERS), "dtype": "float32"})
    labels = [str(v) for v in y]
    for i in range(0, N, 40):  # unknown labels are shown in the balance and left out of the probes
        labels[i] = ""
    answer_types = ["yesno" if i % 3 else "number" for i in range(N)]
    pd.DataFrame(
        {"question_id": qids, "label": labels, "method": "manual", "reason": "", "answer_type": answer_types}
    ).to_csv(run_dir / "labels.csv", index=False)
    return y


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    _write_run(run_dir)
    # A fixed C skips the inner CV over C: the report, not the probe, is under test here.
    train_probes(
        run_dir, probe="logreg", folds=3, group_by="source", bootstrap=50, seed=0, probe_params={"logreg": {"C": 1.0}}
    )
    return run_dir


def test_split_feature() -> None:
    assert split_feature("query_token/layer_27") == ("query_token", 27)
    assert split_feature("vision_only") == ("vision_only", None)
    assert split_feature("vision_token_mean/layer_0") == ("vision_token_mean", 0)


def test_report_files_and_the_planted_feature_is_best(probed_run: Path) -> None:
    report = build_report(probed_run)
    assert report.html_path == probed_run / "report" / "report.html"
    for name in ("auroc_heatmap", "roc_curves", "label_balance", "deployment"):
        png = report.pngs[name].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    assert report.best["feature"] == SIGNAL
    page = report.html_path.read_text(encoding="utf-8")
    headline = re.search(r'<p class="headline">(.*?)</p>', page, re.S)
    assert headline is not None and SIGNAL in headline.group(1)
    assert page.count("data:image/png;base64,") == 4  # the page stands alone (its four figures are embedded)
    results = pd.read_csv(probed_run / "probes" / "results.csv")
    assert f"{results['auroc_mean'].max():.3f}" in headline.group(1)


def test_heatmap_grid_holds_the_results(probed_run: Path) -> None:
    data = read_probe_results(probed_run)
    (grid,) = auroc_grids(data.results)
    assert grid.rows == ["vision_only", "vision_projected", "vision_token", "vision_token_mean", "query_token"]
    assert grid.columns == [NO_LAYER, *(str(layer) for layer in LAYERS)]
    filled = 0
    for _, row in data.results.iterrows():
        representation, layer = split_feature(row["feature"])
        i, j = grid.rows.index(representation), grid.columns.index(NO_LAYER if layer is None else str(layer))
        assert grid.auroc[i, j] == pytest.approx(row["auroc_mean"])
        assert grid.low[i, j] == pytest.approx(row["auroc_ci_low"])
        assert grid.high[i, j] == pytest.approx(row["auroc_ci_high"])
        filled += 1
    assert filled == len(_feature_names()) == int(np.isfinite(grid.auroc).sum())


def test_roc_rows_are_the_best_of_each_representation(probed_run: Path) -> None:
    data = read_probe_results(probed_run)
    rows = roc_curve_rows(data)
    assert split_feature(rows[0]["feature"])[0] == "query_token"
    assert len({split_feature(row["feature"])[0] for row in rows}) == len(rows) == 5
    for row in rows:
        representation = split_feature(row["feature"])[0]
        same = data.results[[split_feature(f)[0] == representation for f in data.results["feature"]]]
        assert row["auroc_mean"] == same["auroc_mean"].max()


def test_label_balance_counts_labels_csv(probed_run: Path) -> None:
    balance = label_balance(read_probe_results(probed_run))
    labels = pd.read_csv(probed_run / "labels.csv", dtype=str, keep_default_na=False)
    assert balance.loc["all", "unknown"] == (labels["label"] == "").sum() == 3
    assert balance.loc["all", "hallucinated"] == (labels["label"] == "1").sum()
    number_negatives = (labels["label"] == "0") & (labels["answer_type"] == "number")
    assert balance.loc["number", "not hallucinated"] == number_negatives.sum()
    assert balance.loc["all"].sum() == N


def test_html_escapes_strings_from_input_files(probed_run: Path) -> None:
    page = build_report(probed_run).html_path.read_text(encoding="utf-8")
    groups = pd.read_csv(probed_run / "probes" / "groups.csv")
    assert HOSTILE in set(groups["group"])  # the hostile string did reach the report's input
    assert HOSTILE not in page and HOSTILE_MODEL not in page and "plain & simple" not in page
    # Escaped as Jinja2's autoescape writes it (markupsafe: &#39; and &#34; for the quotes).
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "plain &amp; simple" in page
    assert "<script" not in page.lower()


def test_report_without_optional_inputs(probed_run: Path, tmp_path: Path) -> None:
    """Only results.csv is required: no predictions, groups or labels.csv still give a full page."""
    run = tmp_path / "run"
    (run / "probes").mkdir(parents=True)
    shutil.copy2(probed_run / "probes" / "results.csv", run / "probes" / "results.csv")
    report = build_report(run)
    assert "roc_curves" not in report.pngs and report.pngs["label_balance"].is_file()
    page = report.html_path.read_text(encoding="utf-8")
    assert "No out-of-fold predictions" in page and "No per-group results" in page
    results = pd.read_csv(run / "probes" / "results.csv")
    balance = label_balance(read_probe_results(run))
    assert balance.loc["all", "hallucinated"] == results["n_positive"].iloc[0]
    assert balance.loc["all"].sum() == results["n"].iloc[0]


def test_missing_results_say_which_command_makes_them(tmp_path: Path) -> None:
    _write_run(tmp_path / "run")
    with pytest.raises(ReportError, match="halp probe"):
        build_report(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"train probes first (`halp probe {tmp_path / 'run'}`)" in " ".join(result.output.split())
    # Following it (on one feature, without resamples: the test stays short) makes the report.
    quick = ["--features", SIGNAL, "--folds", "3", "--bootstrap", "0"]
    assert CliRunner().invoke(app, ["probe", str(tmp_path / "run"), *quick]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(tmp_path / "run")]).exit_code == 0


def test_cli_report_prints_grid_best_and_path(probed_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["report", str(probed_run), "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "auroc_heatmap.png").is_file()
    assert f"best: {SIGNAL} (logreg)" in result.output
    assert str(out / "report.html") in result.output
    assert "query_token" in result.output and NO_LAYER in result.output


def test_report_leaves_matplotlib_global_state_alone(probed_run: Path, tmp_path: Path) -> None:
    # The raw rcParams value: matplotlib.get_backend() would itself import pyplot to resolve it.
    code = (
        "import sys, matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "from halp.report import build_report\n"
        f"build_report({str(probed_run)!r}, {str(tmp_path)!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "after = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "assert after == before, (before, after)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_report_says_what_the_run_found_within_its_grouping_column(probed_run: Path) -> None:
    """The "what this says" box: the planted feature against vision_only (noise), and both within each source."""
    report = build_report(probed_run)
    assert report.finding is not None
    sentences = report.finding.sentences
    assert sentences[0].startswith(f"{SIGNAL} (logreg) predicts hallucinations better than vision_only")
    assert sentences[1].startswith(f"{SIGNAL} (logreg) stays above chance within every source")
    assert sentences[2].startswith("vision_only (logreg) is at chance within every source")
    pooled = report.finding.within[1].pooled
    assert sentences[2].endswith(
        f"and on all rows pooled too (AUROC {pooled.auroc:.3f}, 95% interval {pooled.low:.3f} to {pooled.high:.3f})."
    )
    page = report.html_path.read_text(encoding="utf-8")
    box = re.search(r"<div class='finding'>(.*?)</div>", page, re.S)
    assert box is not None and "What this says" in box.group(1)
    assert [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", box.group(1))] == sentences


def test_report_finding_without_a_grouping_column_states_the_comparison_alone(probed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(probed_run, run)
    (run / "probes" / "groups.csv").unlink()
    settings = (run / "probes" / "results.json").read_text().replace('"group_by": "source"', '"group_by": null')
    (run / "probes" / "results.json").write_text(settings)
    finding = build_report(run).finding
    assert finding is not None and len(finding.sentences) == 1
    assert finding.sentences[0].startswith(f"{SIGNAL} (logreg) predicts")
    result = CliRunner().invoke(app, ["report", str(run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "what this says" in result.output and "predicts hallucinations better" in result.output


def test_the_run_section_names_the_validation_scheme_and_no_empty_setting(probed_run: Path) -> None:
    page = build_report(probed_run).html_path.read_text(encoding="utf-8")
    run = re.search(r"<dl>(.*?)</dl>", page, re.S)
    assert run is not None
    shown = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", run.group(1)))
    assert shown["validation"] == "3-fold stratified CV, grouped by image"
    assert shown["bootstrap"] == "50 resamples over out-of-fold predictions pooled across folds"
    assert "None" not in shown.values() and "split" not in " ".join(shown)
    older = dict(probe_settings({"split": 0.2, "folds": None}))  # results.json without the scheme's words
    assert older["validation"] == "one stratified split, test fraction 0.2"
