"""`halp data`: benchmarks as they are published -> halp tables (convert), and composites of them (compose)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from halp.cli.app import command_group, console

data_app = command_group("data", "Convert published benchmarks to halp tables; compose a mix.")


@data_app.command("convert")
def convert(
    source: Annotated[str, typer.Argument(help="amber, haloquest, pope, mme, hallusionbench or mathvista.")],
    # Named `path` like halp.sources.convert's parameter, so its messages (path=...) show as --from.
    path: Annotated[
        Path, typer.Option("--from", help="The benchmark's files: hub Parquet, annotation file or folder.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: <source>.parquet (images embedded), convert.json.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder, for layouts that keep images beside annotations.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this split / subset (e.g. testmini, adversarial).")] = None,
) -> None:
    """Convert one benchmark to halp's table (see docs/data.md for the layouts each source accepts)."""
    from halp.sources import convert as run_convert

    summary = run_convert(source, path, out, images, split)
    console.print(
        f"{summary.source}: {summary.rows} rows from {summary.layout} -> {summary.table}", markup=False, soft_wrap=True
    )
    console.print(
        "categories: " + ", ".join(f"{name or '(none)'} {count}" for name, count in summary.categories.items()),
        markup=False,
        soft_wrap=True,
    )
    if summary.skipped:
        console.print(
            f"{len(summary.skipped)} row(s) skipped (see {summary.out / 'skipped.jsonl'}), e.g. "
            f"{summary.skipped[0].source_id}: {summary.skipped[0].reason}",
            markup=False,
            soft_wrap=True,
        )


@data_app.command("compose")
def compose(
    dirs: Annotated[list[Path], typer.Option("--from", help="A `halp data convert` output folder (repeat).")],
    out: Annotated[Path, typer.Option(help="Output folder: composite.parquet and manifest.json.")],
    total: Annotated[int, typer.Option(help="Rows in the composite.")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed and inputs draw the same rows.")] = 0,
    proportions: Annotated[
        str, typer.Option(help="study (the HALP set's shares), equal, or a JSON file {source: weight}.")
    ] = "study",
) -> None:
    """Sample a composite: per-source counts in proportion, stratified by category within each source."""
    from halp.sources.compose import compose as run_compose

    summary = run_compose(list(dirs), out, total, seed, proportions)
    drawn = ", ".join(f"{source} {count}" for source, count in summary.drawn.items())
    console.print(f"{summary.total} rows ({drawn}) -> {summary.table}", markup=False, soft_wrap=True)
    console.print(f"manifest: {summary.manifest}", markup=False, soft_wrap=True)
