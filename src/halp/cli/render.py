"""Terminal rendering: the library returns data, these functions show it.

User strings (ids, questions, paths, feature names from files) are shown as rich `Text` or printed with
markup off, so brackets in them are never read as markup.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from halp.layout import probes_dir

if TYPE_CHECKING:
    from halp.demo import DemoResult
    from halp.findings import Finding
    from halp.label import LabelSummary
    from halp.report import Report
    from halp.summary import RunSummary


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _short(text: str, width: int = 80) -> Text:
    return Text(text if len(text) <= width else text[: width - 1] + "…")


def _line(console: Console, text: str) -> None:
    # soft_wrap: a long path stays one line that a terminal can select and open.
    console.print(Text(text), soft_wrap=True)


# ----- halp inspect / halp models ---------------------------------------------------------------------------
def run_summary(console: Console, summary: RunSummary) -> None:
    _line(console, f"{summary.path}: {summary.num_samples} samples, {len(summary.features)} features")
    attrs = Table("attribute", "value", title="run")
    for key, value in summary.attrs.items():
        attrs.add_row(Text(key), _short(str(value), 100))
    console.print(attrs)
    features = Table(title="features")
    features.add_column("feature", no_wrap=True)
    features.add_column("shape", no_wrap=True)
    features.add_column("dtype")
    detailed = any(info.stats is not None for info in summary.features)
    if detailed:
        for column in ("min", "max", "mean", "std"):
            features.add_column(column, justify="right")
    for info in summary.features:
        row = [Text(info.name), str(info.shape), info.dtype]
        if info.stats is not None:
            row += [f"{info.stats[key]:.4g}" for key in ("min", "max", "mean", "std")]
        features.add_row(*row)
    console.print(features)
    if summary.meta_columns:
        _line(console, "metadata columns: " + ", ".join(summary.meta_columns))
    for sample in summary.samples:
        view = Table(title=Text(f"sample {sample['question_id']}"))
        view.add_column("field", no_wrap=True)
        view.add_column("value")
        for name, value in sample.items():
            if isinstance(value, dict):
                text = (
                    f"dim {value['dim']}, norm {value['norm']:.4g}, mean {value['mean']:.4g}, std {value['std']:.4g}"
                )
                view.add_row(Text(name), Text(text))
            else:
                view.add_row(Text(name), _short(str(value), 200))
        console.print(view)


def families(console: Console, rows: list[dict[str, str]]) -> None:
    table = Table("model_type", "adapter", "projector", "decoder layers", title="supported families")
    for row in rows:
        table.add_row(*(Text(row[key]) for key in ("model_type", "adapter", "projector", "decoder_layers")))
    console.print(table)


def checkpoint(console: Console, model: str, description: dict[str, Any]) -> None:
    table = Table("extraction point", "value", title=Text(model))
    for key, value in description.items():
        table.add_row(Text(key), Text(str(value)))
    console.print(table)


# ----- halp label / probe / report / demo --------------------------------------------------------------------
def label_coverage(console: Console, summary: LabelSummary) -> None:
    """Labelled / hallucinated / unknown per answer type, and where labels came from."""
    from halp.label import ANSWER_TYPES

    table = Table("answer type", "rows", "hallucinated (1)", "correct (0)", "unknown", title="label coverage")
    for answer_type in ANSWER_TYPES:
        counts = {value: summary.counts.get((answer_type, value), 0) for value in (1, 0, None)}
        rows = sum(counts.values())
        if rows:
            table.add_row(answer_type, str(rows), str(counts[1]), str(counts[0]), str(counts[None]))
    console.print(table)
    labelled, total = summary.labelled, summary.total
    share = f"{labelled / total:.1%}" if total else "n/a"
    rate = f"{summary.positives / labelled:.1%}" if labelled else "n/a"
    _line(
        console,
        f"{labelled} of {total} labelled ({share}); {summary.positives} hallucinated ({rate} of labelled). "
        f"Sources: {', '.join(f'{method} {n}' for method, n in sorted(summary.methods.items()))}.",
    )
    if summary.label_column is not None:
        _line(console, f"manual labels from column {summary.label_column!r}")
    if summary.unmatched_manual:
        _line(console, f"{summary.unmatched_manual} labelled question_id(s) of the table are not in this run")
    _line(console, f"wrote {summary.path}")


def probe_results(console: Console, results: pd.DataFrame, run_dir: str | Path) -> None:
    """AUROC (fold mean ± std, bootstrap interval), AUPRC and the shuffled-label control, per feature x probe."""
    table = Table("feature", "probe", "n (pos)", "AUROC", "95% CI", "AUPRC", "F1", "control AUROC", "s")
    for row in results.to_dict(orient="records"):
        table.add_row(
            Text(str(row["feature"])),
            Text(str(row["probe"])),
            f"{row['n']} ({row['n_positive']})",
            f"{fmt(row['auroc_mean'])} ± {fmt(row['auroc_std'])}",
            f"[{fmt(row['auroc_ci_low'])}, {fmt(row['auroc_ci_high'])}]",
            fmt(row["auprc_mean"]),
            fmt(row["f1_mean"]),
            fmt(row["control_auroc_mean"]),
            f"{row['fit_seconds']:.1f}",
        )
    console.print(table)
    _line(console, f"wrote {probes_dir(run_dir)}: results.csv, results.json, predictions.csv, models/")


def auroc_grid_tables(results: pd.DataFrame, title: str = "AUROC") -> list[Table]:
    """The heatmap as rich Tables (one per probe type): representation rows x layer columns."""
    from halp.features import feature_name
    from halp.report import NO_LAYER, auroc_grids

    tables = []
    ranked = results.dropna(subset=["auroc_mean"])
    best = ranked.loc[ranked["auroc_mean"].idxmax()] if not ranked.empty else None
    for grid in auroc_grids(results):
        # A light box and two decimals keep a 28-layer grid readable in an 80-column terminal.
        table = Table(title=f"{title} ({grid.probe} probe; columns: decoder layer)", box=box.SIMPLE_HEAD)
        table.add_column("representation", no_wrap=True)
        for column in grid.columns:
            table.add_column(column, justify="right", no_wrap=True)
        for i, representation in enumerate(grid.rows):
            cells = [Text(representation)]
            for j, column in enumerate(grid.columns):
                value = grid.auroc[i, j]
                feature = feature_name(representation, None if column == NO_LAYER else int(column))
                is_best = best is not None and (best["feature"], best["probe"]) == (feature, grid.probe)
                text = "" if not np.isfinite(value) else f"{value:.2f}"
                cells.append(Text(text, style="bold reverse" if is_best else ""))
            table.add_row(*cells)
        tables.append(table)
    return tables


def report_summary(console: Console, report: Report, title: str = "AUROC") -> None:
    """The AUROC grid(s), the best probe and where the report is, for the terminal."""
    for table in auroc_grid_tables(report.results, title):
        console.print(table)
    best = report.best
    line = f"best: {best['feature']} ({best['probe']}) AUROC {fmt(best['auroc_mean'])}"
    if "auroc_ci_low" in best and "auroc_ci_high" in best:
        line += f" [{fmt(best['auroc_ci_low'])}, {fmt(best['auroc_ci_high'])}]"
    _line(console, line)
    finding(console, report.finding)
    _line(console, f"report: {report.html_path}")


def finding(console: Console, stated: Finding | None) -> None:
    """"What this says": the finding's sentences (`halp.findings`), one bullet each, in a box."""
    from rich.panel import Panel

    if stated is None or not stated.sentences:
        return
    body = Text("\n").join(Text(f"• {sentence}") for sentence in stated.sentences)
    console.print(Panel(body, title="what this says", title_align="left", box=box.ROUNDED))


def demo_result(console: Console, result: DemoResult) -> None:
    """Per planted label: the AUROC grid and report path; then the planted check, claim by claim."""
    from halp.demo import PLANTED

    for label, report in result.reports.items():
        console.rule(Text(f"{label}: planted on {PLANTED[label]}"))
        report_summary(console, report, title=f"AUROC on {label}")
    console.rule(Text("planted check"))
    for check in result.checks:
        mark = "PASS" if check.passed else "FAIL"
        style = "green" if check.passed else "bold red"
        console.print(Text(f"{mark}  {check.label}: {check.claim} — {check.detail}", style=style), soft_wrap=True)
    timing = ", ".join(f"{name} {value:.1f}s" for name, value in result.seconds.items())
    _line(console, f"time: {timing}")
