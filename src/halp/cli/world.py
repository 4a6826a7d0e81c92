"""`halp world`: train (or reuse) a tiny Qwen2-VL on the synthetic world and run the study on its own mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from halp.cli.app import (
    BootstrapOption,
    FoldsOption,
    ImageCountOption,
    ProbeKindOption,
    app,
    console,
    from_options,
    options_set,
    say,
    setup_logging,
)

if TYPE_CHECKING:
    from halp.world.study import StudyResult


@app.command()
def world(
    out: Annotated[Path, typer.Option(help="Directory for the study set, the run and the report.")] = Path(
        "halp-world"
    ),
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the study's recipe).")] = None,
    grounding_steps: Annotated[
        int | None,
        typer.Option(help="Of those, the first steps on one-object colour/shape questions (default: the recipe's)."),
    ] = None,
    vision_steps: Annotated[
        int | None,
        typer.Option(help="Steps pretraining the vision tower on per-token scene labels first (0: none).", min=0),
    ] = None,
    vision_dim: Annotated[
        int | None, typer.Option(help="Width of the vision tower (default: the recipe's).", min=8)
    ] = None,
    vision_depth: Annotated[
        int | None, typer.Option(help="Blocks of the vision tower (default: the recipe's).", min=1)
    ] = None,
    grounded_share: Annotated[
        float | None,
        typer.Option(help="After the curriculum, the share of each batch on colour/shape/choice.", min=0, max=1),
    ] = None,
    n_images: ImageCountOption = None,
    probe: ProbeKindOption = "both",
    folds: FoldsOption = 5,
    bootstrap: BootstrapOption = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the study set and of the probes' folds and bootstrap.")] = 0,
    model_seed: Annotated[
        int,
        typer.Option(help="Seed of the model's weights and training stream (the shipped weights are seed 0's)."),
    ] = 0,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (1 is fastest on a shared machine: idle threads spin).")
    ] = 1,
    probe_jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", help="Processes training the probes (default: the usable CPU cores).", min=1
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Where trained models are kept (default $HALP_CACHE/world or ~/.cache/halp/world)."),
    ] = None,
    shipped: Annotated[
        bool,
        typer.Option(
            help="Use the weights halp ships for the default recipe; --no-shipped trains them on this machine "
            "(20 minutes on 2 quiet cores, then cached). Any other setting always trains its own."
        ),
    ] = True,
) -> None:
    """Real hallucinations offline: a tiny VLM trained on a synthetic world, probed on its own wrong answers."""
    options = options_set(locals())  # an option left out keeps the recipe's (or the study's) default
    from halp.world.model import WorldModelConfig
    from halp.world.study import StudyConfig, run_study

    setup_logging()
    model = from_options(WorldModelConfig, options, seed=model_seed)
    result = run_study(from_options(StudyConfig, options, model=model), say=say)
    print_world(console, result)


def print_world(console: Any, result: StudyResult) -> None:
    """Accuracy of the model, the AUROC grid, the query-vs-vision comparison, per-type AUROCs, timings."""
    from rich.table import Table
    from rich.text import Text

    from halp.cli.render import auroc_grid_tables, finding

    training = result.training
    console.rule(Text("the world model"))
    origin = "shipped with halp" if training.shipped else "cached" if training.cached else "trained"
    console.print(
        Text(
            f"{training.checkpoint} ({origin}; training took "
            f"{training.seconds:.0f}s on {training.threads} thread(s)); held-out accuracy "
            f"{training.heldout_accuracy:.3f}; greedy accuracy on the study set {result.accuracy['overall']:.3f}"
        ),
        soft_wrap=True,
    )
    accuracy = Table("question type", "accuracy", title="greedy accuracy per question type")
    for kind, value in result.accuracy["question_type"].items():
        accuracy.add_row(Text(kind), f"{value:.3f}")
    console.print(accuracy)
    console.print(
        Text(
            f"labels: exact for all {result.accuracy['n']} rows; halp's rules decide {result.rules.decided} of them "
            f"and agree on {result.rules.agreed}"
        ),
        soft_wrap=True,
    )
    for table in auroc_grid_tables(result.results, "AUROC (label: the model's own answer is wrong)"):
        console.print(table)
    claim = Table("probe", "comparison", "n", "AUROC difference", "95% interval", title="query-token vs vision")
    for row in result.claim:
        claim.add_row(
            Text(row["probe"]),
            Text(f"{row['first']} - {row['second']}"),
            str(row["n"]),
            f"{row['difference']:+.3f}",
            f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]",
        )
    console.print(claim)
    best = result.results.dropna(subset=["auroc_mean"]).sort_values("auroc_mean", ascending=False).iloc[0]
    groups = result.groups[(result.groups["feature"] == best["feature"]) & (result.groups["probe"] == best["probe"])]
    table = Table(
        "by",
        "group",
        "n",
        "wrong",
        "AUROC",
        "95% interval",
        title=f"best probe per group: {best['feature']} ({best['probe']})",
    )
    for _, row in groups.iterrows():
        table.add_row(
            Text(str(row["by"])),
            Text(str(row["group"])),
            str(row["n"]),
            str(row["n_positive"]),
            f"{row['auroc']:.3f}",
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
        )
    console.print(table)
    finding(console, result.finding)
    timing = ", ".join(f"{name} {value:.0f}s" for name, value in result.seconds.items())
    console.print(Text(f"time: {timing}; report: {result.report}"), soft_wrap=True)
