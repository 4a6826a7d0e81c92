"""Print the Markdown tables of docs/world.md's Result section from a `halp world --out OUT` directory.

    python benchmarks/world_tables.py OUT

Reads OUT/world.json, OUT/world_groups.csv and OUT/run/probes/results.csv (nothing is recomputed), so the
numbers in the docs are exactly the run's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from halp.features import is_vision_feature, split_feature


def fmt(value: float) -> str:
    return f"{value:.3f}"


def accuracy_lines(summary: dict) -> list[str]:
    training, accuracy = summary["training"], summary["accuracy"]
    lines = [
        f"Held-out greedy accuracy (teacher-forced exact match, {training['config']['heldout']} questions of the "
        f"training mix): **{training['heldout_accuracy']:.3f}**; per type: "
        + ", ".join(f"{kind} {value:.3f}" for kind, value in training["heldout_by_type"].items()),
        "",
        f"Greedy accuracy on the {accuracy['n']} study rows as `halp extract` decoded them: "
        f"**{accuracy['overall']:.3f}**.",
        "",
        "| group | accuracy |",
        "|---|---|",
    ]
    for column in ("question_type", "difficulty"):
        lines += [f"| {column} = {value} | {share:.3f} |" for value, share in accuracy[column].items()]
    rules = summary["rules"]
    lines += [
        "",
        f"Rule cross-check: decided {rules['decided']} rows, agreed on {rules['agreed']}; undecided by type: "
        f"{rules['undecided_by_type']}.",
        "",
        "Stage times (s): " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in summary["seconds"].items()),
        "",
        ("The weights shipped with halp; their training: " if training.get("shipped") else "Training: ")
        + f"{training['seconds']:.0f} s wall, {training['cpu_seconds']:.0f} CPU-s, "
        f"{training['threads']} thread(s); config {training['config']}.",
    ]
    if training.get("vision_scores"):
        scores = training["vision_scores"]
        lines += [
            "",
            f"Vision pretraining, on a fresh batch of scenes: token-bit precision {scores['precision']:.3f}, recall "
            f"{scores['recall']:.3f}, loss {scores['loss']:.3f} against {scores['blind_loss']:.3f} for the best "
            "pixel-blind predictor."
            + "".join(
                f" Average precision of its {name[3:]} bits: {value:.3f}."
                for name, value in scores.items()
                if name.startswith("ap_")
            ),
        ]
    return lines


def auroc_lines(results: pd.DataFrame) -> list[str]:
    probes = sorted(results["probe"].unique())
    header = "| feature | " + " | ".join(f"{p} AUROC | {p} 95% CI | {p} control" for p in probes) + " |"
    lines = [header, "|---|" + "---|---|---|" * len(probes)]
    for feature in dict.fromkeys(results["feature"]):
        cells = []
        for probe in probes:
            row = results[(results["feature"] == feature) & (results["probe"] == probe)].iloc[0]
            cells += [
                f"{fmt(row['auroc_mean'])} ± {fmt(row['auroc_std'])}",
                f"[{fmt(row['auroc_ci_low'])}, {fmt(row['auroc_ci_high'])}]",
                fmt(row["control_auroc_mean"]),
            ]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return lines


def claim_lines(claim: list[dict]) -> list[str]:
    lines = ["| probe | comparison | n | difference | 95% CI |", "|---|---|---|---|---|"]
    for row in claim:
        lines.append(
            f"| {row['probe']} | {row['first']} − {row['second']} | {row['n']} | {row['difference']:+.3f} | "
            f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] |"
        )
    return lines


def group_lines(results: pd.DataFrame, groups: pd.DataFrame, by: str) -> list[str]:
    lines = []
    for probe, frame in results.groupby("probe", sort=True):
        frame = frame.dropna(subset=["auroc_mean"])
        query = frame[[split_feature(f)[0] == "query_token" for f in frame["feature"]]]
        vision = frame[[is_vision_feature(f) for f in frame["feature"]]]
        shown = list(
            dict.fromkeys(
                [
                    query.loc[query["auroc_mean"].idxmax(), "feature"],
                    "vision_only",
                    vision.loc[vision["auroc_mean"].idxmax(), "feature"],
                ]
            )
        )
        table = groups[(groups["probe"] == probe) & (groups["by"] == by)]
        lines += [
            f"{probe}:",
            "",
            "| group | n | wrong | " + " | ".join(shown) + " |",
            "|---|---|---|" + "---|" * len(shown),
        ]
        for value, rows in table.groupby("group", sort=True):
            first = rows.iloc[0]
            cells = []
            for feature in shown:
                row = rows[rows["feature"] == feature].iloc[0]
                cells.append(f"{fmt(row['auroc'])} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]")
            lines.append(f"| {value} | {first['n']} | {first['n_positive']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main(out: Path) -> None:
    summary = json.loads((out / "world.json").read_text())
    results = pd.read_csv(out / "run" / "probes" / "results.csv")
    groups = pd.read_csv(out / "world_groups.csv")
    sections = [
        ("Accuracy", accuracy_lines(summary)),
        ("AUROC of each representation and layer, with the shuffled-label control", auroc_lines(results)),
        (
            "Query token vs vision (paired bootstrap of AUROC difference on the same rows)",
            claim_lines(summary["claim"]),
        ),
        ("Within each question type (AUROC [95% CI]; n, wrong)", group_lines(results, groups, "question_type")),
        ("Within each difficulty (AUROC [95% CI]; n, wrong)", group_lines(results, groups, "difficulty")),
    ]
    for title, lines in sections:
        print(f"#### {title}\n")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
