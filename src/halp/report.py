"""`halp report`: which representation and layer predicts hallucination, as PNGs and one HTML page.

Reads what `halp probe` wrote (`probes/results.csv`, `probes/predictions.csv`, optionally
`probes/groups.csv`), the run's `labels.csv` and the attributes of `features.h5`, and writes into
`RUN_DIR/report/` (or another directory):

- `auroc_heatmap.png`: AUROC per representation (rows) x decoder layer (columns), one panel per probe
  type, each cell annotated with its bootstrap interval; the best cell is outlined.
- `roc_curves.png`: pooled out-of-fold ROC curves of the best probe of each representation.
- `label_balance.png`: hallucinated / not / unknown per answer type.
- `deployment.png`: the best probe's risk-coverage curve (accuracy of the answers kept when those at or above
  a risk threshold are withheld, against the fraction kept) with its area, and its reliability diagram with
  the expected calibration error; the HTML adds the threshold for each target accuracy.
- `report.html`: all of the above (PNGs embedded, so the page can be sent on its own), the full
  results table and the per-group table, from the template `templates/report.html` (halp.pages): every string
  that comes from an input file is escaped. Every file is written atomically (halp.layout).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from halp.errors import ReportError
from halp.features import REPRESENTATIONS, is_vision_feature, representation_rank, split_feature  # noqa: F401
from halp.findings import Finding, state_finding
from halp.label import parse_label_value, read_labels
from halp.layout import (
    GROUPS_FILE,
    PREDICTIONS_FILE,
    REPORT_PAGE,
    RESULTS_FILE,
    RESULTS_JSON_FILE,
    atomic_write,
    features_path,
    labels_file,
    probes_dir,
    report_dir,
    write_text_atomic,
)

# The deployment curves are computed in halp.metrics; they stay importable from here too, as before.
from halp.metrics import (
    RELIABILITY_BINS,
    Reliability,
    RiskCoverage,
    pooled_scores,
    reliability,
    risk_coverage,
)
from halp.pages import Table, png_base64, render_page
from halp.results import best_result, read_groups, read_predictions, read_results, read_settings
from halp.review.decisions import review_agreement
from halp.rows import read_row_texts

#: Representations in pipeline order: before the LM, then inside it.
#: The heatmap column of the representations that have no decoder layer.
NO_LAYER = "pre-LM"
#: Past this many heatmap columns the intervals no longer fit in a cell; they stay in the table.
MAX_COLUMNS_WITH_INTERVALS = 12
#: The page `build_report` writes beside the PNGs.



@dataclass
class ProbeResults:
    """What `halp probe` wrote for one run, read back."""

    results: pd.DataFrame
    predictions: pd.DataFrame | None = None
    groups: pd.DataFrame | None = None
    labels: pd.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    run_attrs: dict[str, Any] = field(default_factory=dict)

    def best(self) -> pd.Series:
        """The feature x probe row with the highest mean AUROC (ties: the earlier row)."""
        best = best_result(self.results)
        if best is None:
            raise ReportError("no feature has an AUROC (every fold had a single class?)")
        return best


def read_probe_results(run_dir: str | Path) -> ProbeResults:
    """Read `RUN_DIR/probes/*` (halp.results' readers) and `RUN_DIR/labels.csv` (halp.label.read_labels); only
    results.csv is required."""
    run_dir = Path(run_dir)
    probes = probes_dir(run_dir)
    results_path = probes / RESULTS_FILE
    if not results_path.is_file():
        raise ReportError(f"{results_path} does not exist; train probes first (`halp probe {run_dir}`)")
    results = read_results(results_path)
    missing = [column for column in ("feature", "probe", "auroc_mean") if column not in results]
    if missing:
        raise ReportError(f"{results_path} lacks column(s) {', '.join(missing)}")
    predictions = read_predictions(probes / PREDICTIONS_FILE) if (probes / PREDICTIONS_FILE).is_file() else None
    groups = read_groups(probes / GROUPS_FILE) if (probes / GROUPS_FILE).is_file() else None
    labels = read_labels(labels_file(run_dir)).frame if labels_file(run_dir).is_file() else None
    settings = read_settings(probes / RESULTS_JSON_FILE)
    return ProbeResults(results, predictions, groups, labels, settings, _run_attrs(run_dir))


def _run_attrs(run_dir: Path) -> dict[str, Any]:
    path = features_path(run_dir)
    if not path.is_file():
        return {}
    attrs = read_row_texts(path, columns=(), meta=()).attrs  # a damaged file is named, with what to do
    return {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in attrs.items()}


# ----- the AUROC grid ----------------------------------------------------------------------


@dataclass
class AurocGrid:
    """AUROC and interval per representation x layer column, for one probe type."""

    probe: str
    rows: list[str]
    columns: list[str]
    auroc: np.ndarray  # (rows, columns), NaN where the representation has no such column
    low: np.ndarray
    high: np.ndarray


def auroc_grids(results: pd.DataFrame) -> list[AurocGrid]:
    """One grid per probe type; the layer-free representations share the `pre-LM` column."""
    parsed = [split_feature(feature) for feature in results["feature"]]
    representations = sorted({rep for rep, _ in parsed}, key=lambda rep: (representation_rank(rep), rep))
    layers = sorted({layer for _, layer in parsed if layer is not None})
    columns = ([NO_LAYER] if any(layer is None for _, layer in parsed) else []) + [str(layer) for layer in layers]
    grids = []
    for probe in sorted(results["probe"].unique()):
        shape = (len(representations), len(columns))
        auroc, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
        for (rep, layer), (_, row) in zip(parsed, results.iterrows(), strict=True):
            if row["probe"] != probe:
                continue
            i = representations.index(rep)
            j = columns.index(NO_LAYER if layer is None else str(layer))
            auroc[i, j] = row["auroc_mean"]
            low[i, j] = row.get("auroc_ci_low", np.nan)
            high[i, j] = row.get("auroc_ci_high", np.nan)
        grids.append(AurocGrid(str(probe), representations, columns, auroc, low, high))
    return grids


# ----- figures (matplotlib without pyplot: no global backend state is touched) -------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def heatmap_png(grids: Sequence[AurocGrid], best: tuple[str, str] | None = None) -> bytes:
    """AUROC per representation x layer; colour from chance (0.5, pale) to perfect (1.0).

    `best` = (feature, probe) is outlined: ties at the top are common, so the cell is named, not searched.
    """
    from matplotlib.patches import Rectangle

    n_columns = len(grids[0].columns)
    show_intervals = n_columns <= MAX_COLUMNS_WITH_INTERVALS
    cell_width = 1.05 if show_intervals else 0.55
    panel_width = 2.2 + cell_width * n_columns
    figure = _figure(panel_width * len(grids) + 0.9, 0.75 * len(grids[0].rows) + 1.5)
    axes = figure.subplots(1, len(grids), squeeze=False)[0]
    best_cell = None
    if best is not None:
        representation, layer = split_feature(best[0])
        best_cell = (best[1], representation, NO_LAYER if layer is None else str(layer))
    image = None
    for axis, grid in zip(axes, grids, strict=True):
        masked = np.ma.masked_invalid(grid.auroc)
        cmap = _colormap()
        image = axis.imshow(masked, cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
        axis.set_xticks(range(len(grid.columns)), grid.columns)
        axis.set_yticks(range(len(grid.rows)), grid.rows)
        axis.set_xlabel("decoder layer")
        axis.set_title(f"probe: {grid.probe}")
        axis.tick_params(length=0)
        for i in range(len(grid.rows)):
            for j in range(len(grid.columns)):
                value = grid.auroc[i, j]
                if not np.isfinite(value):
                    continue
                text = f"{value:.2f}"
                if show_intervals and np.isfinite(grid.low[i, j]) and np.isfinite(grid.high[i, j]):
                    text += f"\n[{grid.low[i, j]:.2f}, {grid.high[i, j]:.2f}]"
                colour = "white" if value > 0.82 else "black"
                axis.text(j, i, text, ha="center", va="center", fontsize=8 if show_intervals else 7, color=colour)
                if best_cell == (grid.probe, grid.rows[i], grid.columns[j]):
                    axis.add_patch(
                        Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="#ff3b30", linewidth=3)
                    )
        axis.set_xticks(np.arange(-0.5, len(grid.columns)), minor=True)
        axis.set_yticks(np.arange(-0.5, len(grid.rows)), minor=True)
        axis.grid(which="minor", color="white", linewidth=1.5)
        axis.tick_params(which="minor", length=0)
        for spine in axis.spines.values():
            spine.set_visible(False)
    if image is not None:
        bar = figure.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02)
        bar.set_label("AUROC (mean over folds; ≤0.5 = chance)")
    caption = "cell: mean AUROC " + ("[95% bootstrap interval]" if show_intervals else "(intervals: see the table)")
    caption += "; red box: best"
    figure.suptitle(caption, fontsize=9)
    return _png(figure)


def _colormap() -> Any:
    from matplotlib import colormaps

    base = colormaps["YlGnBu"]
    # Cells a representation does not have are light grey; below-chance AUROCs take the chance colour.
    return base.with_extremes(bad="#f2f2f2", under=base(0.0))


def roc_curve_rows(data: ProbeResults, limit: int = 5) -> list[pd.Series]:
    """The best feature x probe of each representation, best first, at most `limit`."""
    ranked = data.results.dropna(subset=["auroc_mean"]).sort_values("auroc_mean", ascending=False, kind="stable")
    chosen, seen = [], set()
    for _, row in ranked.iterrows():
        representation = split_feature(row["feature"])[0]
        if representation in seen:
            continue
        seen.add(representation)
        chosen.append(row)
    return chosen[:limit]


def roc_png(data: ProbeResults, limit: int = 5) -> bytes | None:
    """Pooled out-of-fold ROC curves of the best probe per representation; None without predictions."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if data.predictions is None or data.predictions.empty:
        return None
    figure = _figure(6.4, 5.2)
    axis = figure.subplots()
    drawn = 0
    for row in roc_curve_rows(data, limit):
        labels, scores = pooled_scores(data.predictions, row["feature"], row["probe"])
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        pooled = roc_auc_score(labels, scores)
        axis.plot(fpr, tpr, linewidth=2, label=f"{row['feature']} ({row['probe']}): {pooled:.3f}")
        drawn += 1
    if drawn == 0:
        return None
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance: 0.500")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate (hallucinations caught)")
    axis.set_title("ROC, out-of-fold scores pooled over folds")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.legend(loc="lower right", fontsize=8, title="feature (probe): pooled AUROC", title_fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)


# ----- deployment curves: what withholding risky answers buys, and whether the risk is calibrated -----------
#: Target accuracies the report lists a withholding threshold for.
TARGET_ACCURACIES = (0.7, 0.8, 0.9, 0.95, 0.99)


def deployment_png(curve: RiskCoverage, calibration: Reliability, name: str) -> bytes:
    """Two panels: accuracy of the kept answers vs the fraction kept; observed vs predicted hallucination rate."""
    figure = _figure(11.0, 4.6)
    left, right = figure.subplots(1, 2)
    left.step(curve.coverage, curve.accuracy, where="post", linewidth=2, label=f"{name}: area {curve.area:.3f}")
    left.axhline(curve.base, linestyle="--", color="grey", linewidth=1, label=f"keep all / random: {curve.base:.3f}")
    left.set_xlabel("coverage (fraction of answers kept, lowest risk first)")
    left.set_ylabel("accuracy of the kept answers")
    left.set_title(f"risk-coverage (oracle area {curve.oracle:.3f})")
    left.set_xlim(0, 1)
    left.set_ylim(min(curve.base, float(curve.accuracy.min())) - 0.05, 1.01)
    left.legend(loc="lower left", fontsize=8)
    left.grid(alpha=0.3)
    right.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    right.plot(calibration.predicted, calibration.observed, marker="o", linewidth=2, label=f"ECE {calibration.ece:.3f}")
    for x, y, n in zip(calibration.predicted, calibration.observed, calibration.counts, strict=True):
        right.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="#555")
    right.set_xlabel("predicted P(hallucinated) (bin mean)")
    right.set_ylabel("observed hallucination rate")
    right.set_title(f"reliability, {RELIABILITY_BINS} bins (labels: answers per bin)")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.legend(loc="upper left", fontsize=8)
    right.grid(alpha=0.3)
    return _png(figure)


def threshold_text(kept: float, withheld: float) -> str:
    """The shortest decimal T with kept < T <= withheld: flagging risk >= T (what `halp predict --threshold T`
    does) withholds exactly the answers from `withheld` up, as the table's coverage says. Three decimals when they
    suffice; more only where two risks are closer than that ("1.000" could stand for 0.9996 and for 0.99997)."""
    if math.isinf(withheld):
        return "inf"
    for digits in range(3, 18):
        text = f"{math.floor(withheld * 10**digits) / 10**digits:.{digits}f}"
        if kept < float(text) <= withheld:
            return text
    return repr(withheld)  # the float itself round-trips exactly


def threshold_table(curve: RiskCoverage, targets: Sequence[float] = TARGET_ACCURACIES) -> pd.DataFrame:
    """Per target accuracy: the threshold to pass to `halp predict --threshold` (as text, with the digits that
    reproduce the coverage), the coverage and the accuracy of the answers kept."""
    rows = []
    for target in targets:
        found = curve.threshold_for(target)
        if found is None:
            rows.append({"target accuracy": target, "withhold risk >=": "unreachable", "coverage": np.nan,
                         "accuracy": np.nan})  # fmt: skip
        else:
            threshold, coverage, accuracy = found
            kept = float(curve.risk[curve.last_reaching(target)])  # the highest risk still answered
            rows.append({"target accuracy": target, "withhold risk >=": threshold_text(kept, threshold),
                         "coverage": coverage, "accuracy": accuracy})  # fmt: skip
    return pd.DataFrame(rows)


def _deployment_section(data: ProbeResults, pngs: dict[str, bytes]) -> dict[str, Any]:
    """The deployment curves of the best probe (their figure is added to `pngs`), or why there are none."""
    if data.predictions is None or data.predictions.empty:
        return {"missing": "No out-of-fold predictions (probes/predictions.csv) for deployment curves."}
    best = data.best()
    labels, scores = pooled_scores(data.predictions, best["feature"], best["probe"])
    if len(labels) == 0:
        return {"missing": "The best probe has no out-of-fold predictions."}
    curve = risk_coverage(labels, scores)
    calibration = reliability(labels, scores)
    pngs["deployment"] = deployment_png(curve, calibration, f"{best['feature']} ({best['probe']})")
    return {
        "missing": None, "feature": best["feature"], "probe": best["probe"], "area": curve.area, "base": curve.base,
        "oracle": curve.oracle, "ece": calibration.ece, "thresholds": Table.of(threshold_table(curve)),
    }  # fmt: skip


#: labels.csv's label (as `halp.label.parse_label_value` reads it) -> its column in the label balance.
LABEL_NAMES = {1: "hallucinated", 0: "not hallucinated", None: "unknown"}
LABEL_COLOURS = {"hallucinated": "#d62728", "not hallucinated": "#2ca02c", "unknown": "#bbbbbb"}


def label_balance(data: ProbeResults) -> pd.DataFrame:
    """Counts per answer type (rows, plus `all`) x hallucinated / not / unknown (columns)."""
    if data.labels is not None and "label" in data.labels:
        labels = data.labels
        words = [LABEL_NAMES[parse_label_value(value)] for value in labels["label"]]
        names = pd.Series(words, index=labels.index, name="label")
        kinds = labels["answer_type"] if "answer_type" in labels else pd.Series(["all"] * len(labels))
        table = pd.crosstab(kinds.replace("", "(none)"), names)
        if list(table.index) != ["all"]:
            table = pd.concat([table.sum().to_frame("all").T, table])
    else:
        # Without labels.csv the balance is the probes' own n / n_positive (labelled rows only).
        first = data.results.iloc[0]
        positives = int(first.get("n_positive", 0))
        table = pd.DataFrame(
            {"hallucinated": [positives], "not hallucinated": [int(first.get("n", 0)) - positives]}, index=["all"]
        )
    ordered = [name for name in LABEL_COLOURS if name in table.columns]
    return table[ordered + [c for c in table.columns if c not in ordered]]


def label_balance_png(balance: pd.DataFrame) -> bytes:
    figure = _figure(6.4, 0.45 * len(balance.index) + 1.9)
    axis = figure.subplots()
    left = np.zeros(len(balance.index))
    positions = np.arange(len(balance.index))
    for column in balance.columns:
        values = balance[column].to_numpy(dtype=float)
        axis.barh(positions, values, left=left, color=LABEL_COLOURS.get(column, "#9467bd"), label=column)
        for y, (start, value) in enumerate(zip(left, values, strict=True)):
            if value > 0:
                axis.text(start + value / 2, y, f"{int(value)}", ha="center", va="center", fontsize=8)
        left += values
    axis.set_yticks(positions, [str(index) for index in balance.index])
    axis.invert_yaxis()
    axis.set_xlabel("samples")
    axis.set_title("label balance by answer type")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(balance.columns), fontsize=8)
    return _png(figure)


# ----- the page (templates/report.html) -----------------------------------------------------


RESULT_COLUMNS = (
    "feature",
    "probe",
    "n",
    "n_positive",
    "auroc_mean",
    "auroc_std",
    "auroc_ci_low",
    "auroc_ci_high",
    "auprc_mean",
    "accuracy_mean",
    "f1_mean",
    "control_auroc_mean",
)

def _headline(data: ProbeResults) -> dict[str, Any]:
    """The best feature x probe, its interval and shuffled-label control, and the best AUROC of each representation."""
    best = data.best()
    interval = None
    if "auroc_ci_low" in best and "auroc_ci_high" in best:
        interval = (best["auroc_ci_low"], best["auroc_ci_high"])
    control = None
    if "control_auroc_mean" in best and pd.notna(best["control_auroc_mean"]):
        control = best["control_auroc_mean"]
    by_representation = (
        data.results.dropna(subset=["auroc_mean"])
        .assign(representation=[split_feature(f)[0] for f in data.results.dropna(subset=["auroc_mean"])["feature"]])
        .groupby("representation")["auroc_mean"]
        .max()
        .sort_values(ascending=False)
    )
    return {
        "feature": best["feature"], "probe": best["probe"], "auroc": best["auroc_mean"], "interval": interval,
        "control": control, "ranking": list(by_representation.items()),
    }  # fmt: skip


def _groups_section(data: ProbeResults) -> dict[str, Any] | None:
    """The best probe's AUROC within each group, and every feature x probe's as a pivot; None without groups.csv."""
    if data.groups is None or data.groups.empty:
        return None
    best = data.best()
    rows = data.groups[(data.groups["feature"] == best["feature"]) & (data.groups["probe"] == best["probe"])]
    columns = [c for c in ("group", "n", "n_positive", "auroc") if c in rows.columns]
    # Every feature x probe, as a pivot, for who wants to compare groups across features.
    pivot = data.groups.pivot_table(index=["feature", "probe"], columns="group", values="auroc", aggfunc="first")
    pivot = pivot.reset_index()
    pivot.columns = [str(column) for column in pivot.columns]
    return {
        "feature": best["feature"], "probe": best["probe"], "pivot": Table.of(pivot),
        "best": Table.of(rows[columns].sort_values("group", kind="stable")) if not rows.empty else None,
    }  # fmt: skip


def group_table(run_dir: Path, columns: Sequence[str], data: ProbeResults) -> pd.DataFrame | None:
    """question_id and each of `columns` that the run carries as metadata (features.h5) or its labels.csv has."""
    path = features_path(run_dir)
    found: dict[str, list[str]] = {}
    if path.is_file():
        texts = read_row_texts(path, columns=("question_id",), meta=columns)
        if texts.meta:
            found = {"question_id": texts.columns["question_id"], **texts.meta}
    frame = pd.DataFrame(found) if found else None
    others = [column for column in columns if frame is None or column not in frame.columns]
    if data.labels is not None and any(column in data.labels.columns for column in others):
        from_labels = data.labels[["question_id", *[c for c in others if c in data.labels.columns]]]
        frame = from_labels if frame is None else frame.merge(from_labels, on="question_id", how="left")
    return frame


def finding_for(data: ProbeResults, run_dir: Path, columns: Sequence[str] | None = None) -> Finding | None:
    """"What this says" for a run: its best feature vs vision_only, within each grouping column (default: the
    probes' --group-by), with the probes' bootstrap resamples and seed."""
    if columns is None:
        columns = [data.settings["group_by"]] if data.settings.get("group_by") else []
    groups = group_table(run_dir, columns, data) if columns else None
    return state_finding(
        data.results,
        data.predictions,
        groups,
        columns,
        int(data.settings.get("bootstrap", 1000)),
        int(data.settings.get("seed", 42)),
    )


def probe_settings(settings: dict[str, Any]) -> list[tuple[str, Any]]:
    """How the probes were trained, in words: the validation scheme as `halp probe` describes it (not its raw
    folds/split fields, one of which is always empty), the labels, grouping, seed and resamples."""
    items: list[tuple[str, Any]] = []
    if settings.get("labels"):
        column = f" (column {settings['label_column']})" if settings.get("label_column") else ""
        items.append(("labels", f"{settings['labels']}{column}"))
    if "n" in settings:
        rows = f"{settings['n']} labelled rows"
        if "n_positive" in settings:
            rows += f", {settings['n_positive']} hallucinated"
        if "n_rows" in settings:
            rows += f", of {settings['n_rows']} in the run"
        items.append(("rows", rows))
    if settings.get("validation"):
        items.append(("validation", settings["validation"]))
    elif settings.get("split") is not None:
        items.append(("validation", f"one stratified split, test fraction {settings['split']}"))
    elif settings.get("folds") is not None:
        items.append(("validation", f"{settings['folds']}-fold stratified CV"))
    if settings.get("group_by"):
        items.append(("per-group results by", settings["group_by"]))
    if settings.get("seed") is not None:
        items.append(("seed", settings["seed"]))
    if settings.get("bootstrap") is not None:
        over = f" over {settings['bootstrap_over']}" if settings.get("bootstrap_over") else ""
        items.append(("bootstrap", f"{settings['bootstrap']} resamples{over}"))
    if settings.get("threshold") is not None:
        items.append(("probe threshold", settings["threshold"]))
    return items


def _run_section(data: ProbeResults, run_dir: Path) -> list[tuple[str, Any]]:
    attrs = data.run_attrs
    items: list[tuple[str, Any]] = [("run directory", run_dir.resolve())]
    for key in ("model_id", "architecture", "num_layers", "layers", "dtype", "num_samples", "generated"):
        if key in attrs:
            items.append((key, attrs[key]))
    return items + probe_settings(data.settings)


@dataclass
class Report:
    html_path: Path
    pngs: dict[str, Path]
    best: pd.Series
    results: pd.DataFrame
    finding: Finding | None = None


def _review_section(run_dir: Path) -> dict[str, Any] | None:
    """Manual review (`halp review`): agreement with the rules and Cohen's kappa between reviewers, if any."""
    summary = review_agreement(run_dir)
    if summary is None:
        return None
    rows = [
        {"compared": f"{a.first} vs {a.second}", "rows": a.n, "agree": a.agree, "rate": a.rate}
        | {"Cohen's kappa": a.kappa}
        for a in [*summary.automatic, *summary.reviewer_pairs]
    ]
    return {
        "reviewed": summary.reviewed,
        "who": ", ".join(f"{name} ({n})" for name, n in summary.reviewers.items()),
        "conflicts": len(summary.conflicts),
        "table": Table.of(pd.DataFrame(rows)) if rows else None,
    }


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    title: str | None = None,
    group_columns: Sequence[str] | None = None,
    finding: Finding | None = None,
) -> Report:
    """Write the PNGs and report.html for a run whose probes are trained; return where they are.

    "What this says" is stated within each of `group_columns` (default: the probes' --group-by column); `finding`
    passes one already computed (`halp world`).
    """
    run_dir = Path(run_dir)
    data = read_probe_results(run_dir)
    if finding is None:
        finding = finding_for(data, run_dir, group_columns)
    out = Path(out_dir) if out_dir is not None else report_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)

    grids = auroc_grids(data.results)
    best = data.best()
    pngs: dict[str, bytes] = {"auroc_heatmap": heatmap_png(grids, (best["feature"], best["probe"]))}
    roc = roc_png(data)
    if roc is not None:
        pngs["roc_curves"] = roc
    balance = label_balance(data)
    pngs["label_balance"] = label_balance_png(balance)
    deployment = _deployment_section(data, pngs)
    paths = {}
    for name, png in pngs.items():
        paths[name] = out / f"{name}.png"
        with atomic_write(paths[name], "wb") as handle:
            handle.write(png)

    results = data.results.sort_values("auroc_mean", ascending=False, kind="stable", na_position="last")
    results = results[[c for c in RESULT_COLUMNS if c in results.columns]].reset_index(drop=True)
    balance_table = balance.reset_index().rename(columns={"index": "answer type", "answer_type": "answer type"})
    balance_table.columns = [str(c) for c in balance_table.columns]
    page = render_page(
        "report.html",
        title=title or f"halp report: {run_dir.resolve().name}",
        headline=_headline(data),
        finding=finding.sentences if finding is not None else [],
        figures={name: png_base64(png) for name, png in pngs.items()},
        no_layer=NO_LAYER,
        deployment=deployment,
        balance=Table.of(balance_table),
        review=_review_section(run_dir),
        groups=_groups_section(data),
        results=Table.of(results, highlight=0),
        run=_run_section(data, run_dir),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    html_path = out / REPORT_PAGE
    write_text_atomic(html_path, page)
    return Report(html_path, paths, best, data.results, finding)
