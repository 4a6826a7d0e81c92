"""The pipeline's commands: extract, merge, inspect, export, models, label, probe, report, predict, demo, embed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from halp.cli.app import (
    AnsweredRunArgument,
    BootstrapOption,
    DeviceOption,
    DtypeOption,
    FinishedRunArgument,
    FoldsOption,
    ImageBatchOption,
    ImageCountOption,
    ImageLimitOption,
    ImagesToReadOption,
    LabelColumnOption,
    LayersOption,
    ModelOption,
    ProbeKindOption,
    PromptOption,
    TableImagesOption,
    TrustRemoteCodeOption,
    app,
    command_group,
    console,
    err_console,
    from_options,
    options_set,
    say,
    setup_logging,
)
from halp.cli.app import fail as _fail
from halp.layout import errors_file, features_path, risk_file, shard_dir

if TYPE_CHECKING:
    from halp.extract import ExtractConfig, ExtractSummary

Analysis = TypeVar("Analysis")


@contextmanager
def interrupted_exits(message: str) -> Iterator[None]:
    """Ctrl-C ends the command with this one line and exit status 130 (128 + SIGINT), not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@app.command()
def extract(
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="Run directory (created, or resumed if it exists).")],
    # --data is a str: an hf://datasets/... URL must not be folded into a local path.
    data: Annotated[
        str | None,
        typer.Option(
            help="VQA table: CSV, JSONL, Parquet, Arrow, a save_to_disk directory or hf://datasets/.../x.parquet "
            "(images embedded or under --images; see docs/data.md)."
        ),
    ] = None,
    images: TableImagesOption = None,
    hf_dataset: Annotated[
        str | None, typer.Option(help="A hub dataset instead of --data, loaded by datasets.load_dataset.")
    ] = None,
    hf_config: Annotated[str | None, typer.Option("--config", help="--hf-dataset: its configuration.")] = None,
    split: Annotated[str | None, typer.Option(help="--hf-dataset: the split (e.g. test).")] = None,
    layers: LayersOption = "halp",
    batch_size: Annotated[
        str, typer.Option(help="Samples per prefill pass, or 'auto': the largest that fits in GPU memory.")
    ] = "8",
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length, decoded from the prefill cache.")] = 32,
    generate: Annotated[bool, typer.Option("--generate/--no-generate", help="--no-generate: prefill only.")] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N rows of the table.")] = None,
    exif_orientation: Annotated[
        bool,
        typer.Option(
            "--exif-orientation/--no-exif-orientation",
            help="Turn images upright by their EXIF Orientation tag (default), or use the stored pixels as they are.",
        ),
    ] = True,
    trust_remote_code: TrustRemoteCodeOption = False,
    overwrite: Annotated[bool, typer.Option(help="Discard an existing run in --out and start afresh.")] = False,
    num_shards: Annotated[
        int | None, typer.Option(help="Split the table into K shards, one per process (e.g. a SLURM job array).")
    ] = None,
    shard_index: Annotated[int | None, typer.Option(help="This process's shard, 0..K-1.")] = None,
    engine: Annotated[str, typer.Option(help="local (this process, or torchrun ranks) or ray (the ray extra).")] = (
        "local"
    ),
    num_workers: Annotated[int, typer.Option(help="--engine ray: actors, one model each.")] = 1,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="--engine ray: GPUs per actor (default: 1 if the cluster has GPUs, else 0).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Input worker processes decoding and processing ahead of the model (0: in series). Default: "
            "spare cores beside a GPU model, at most 4; on CPU only cores the model's threads leave free."
        ),
    ] = None,
    processor_device: Annotated[
        str, typer.Option(help="Where the image processor runs: auto (the GPU if the model is on one), cpu, cuda.")
    ] = "auto",
    attn_implementation: Annotated[
        str, typer.Option(help="Attention kernel: sdpa, flash_attention_2 (flash-attn package) or eager.")
    ] = "sdpa",
    row_timeout: Annotated[
        float, typer.Option(help="Seconds an input worker may take to read one row's image before the row fails.")
    ] = 120.0,
) -> None:
    """Extract HALP features (vision-only, vision token, query token) in one prefill pass per batch.

    Under torchrun / accelerate launch each process extracts its rank's shard; see docs/scaling.md.
    """
    options = dict(locals())
    from halp.extract import ExtractConfig

    setup_logging()
    if batch_size != "auto" and not batch_size.isdigit():
        _fail(f"--batch-size {batch_size!r}: a positive integer or auto")
    if batch_size == "auto" and engine == "ray":
        _fail("--batch-size auto applies to --engine local; give Ray workers a number")
    config = from_options(ExtractConfig, options, batch_size=batch_size if batch_size == "auto" else int(batch_size))
    if engine not in ("local", "ray"):
        _fail(f"--engine {engine!r}: choose local or ray")
    if engine == "local" and (num_workers != 1 or gpus_per_worker is not None):
        _fail("--num-workers and --gpus-per-worker apply to --engine ray")
    with interrupted_exits("interrupted; rerun to resume (committed rows are kept)"):
        summary = _extract_with(engine, config, num_workers, gpus_per_worker)
    _report_extraction(summary)


def _extract_with(engine: str, config: ExtractConfig, num_workers: int, gpus_per_worker: float | None
                  ) -> ExtractSummary:
    from halp.extract import run_extraction

    if engine == "ray":
        from halp.ray_engine import run_ray_extraction

        return run_ray_extraction(config, num_workers, gpus_per_worker)
    return run_extraction(config)


def _report_extraction(summary: ExtractSummary) -> None:
    if summary.shard is not None:
        _report_shard(summary)
        return
    console.print(
        f"{summary.processed} processed ({summary.samples_per_second:.2f} samples/s), "
        f"{summary.already_done} already done, {len(summary.failed)} failed, of {summary.total}.",
        markup=False,
    )
    if summary.stages.batches:
        console.print(summary.stages.line(), markup=False, highlight=False, soft_wrap=True)
    if summary.changed:
        shown = ", ".join(summary.changed[:5]) + (" ..." if len(summary.changed) > 5 else "")
        console.print(
            f"{len(summary.changed)} committed row(s) had changed (question, image or other content) and were "
            f"extracted again: {shown}",
            markup=False,
        )
    # User paths are printed literally (markup=False): `--out "runs/exp[v2]"` is a path, not rich markup.
    console.print(f"features: {features_path(summary.run_dir)}", markup=False, highlight=False, soft_wrap=True)
    if not summary.finished:
        console.print(
            f"{len(summary.failed)} row(s) failed and are not in features.h5; see "
            f"{errors_file(summary.run_dir)}. Rerun the same command to retry only them.",
            markup=False,
        )
        raise typer.Exit(1)


def _report_shard(summary: ExtractSummary) -> None:
    shard = summary.shard
    console.print(
        f"shard {shard.name}: {summary.processed} processed ({summary.samples_per_second:.2f} samples/s), "
        f"{summary.already_done} already done, {len(summary.failed)} failed, of {summary.total}.",
        markup=False,
    )
    if summary.stages.batches:
        console.print(summary.stages.line(), markup=False, highlight=False, soft_wrap=True)
    if summary.failed:
        console.print(f"failed rows: {errors_file(summary.run_dir, shard.name)}", markup=False)
    if summary.pending_shards:
        console.print(
            f"waiting for shard(s) {', '.join(summary.pending_shards)}; the last to finish assembles features.h5 "
            f"(or run `halp merge {summary.run_dir}` once they are done).",
            markup=False,
        )
        # Under a launcher a non-zero exit would make it stop the other ranks: only the assembling rank reports.
        if summary.failed and shard.source == "flags":
            raise typer.Exit(1)
        return
    console.print(f"features: {features_path(summary.run_dir)} (all {shard.count} shards)", markup=False)
    if summary.run_failed:
        console.print(
            f"{summary.run_failed} row(s) of the run failed and are not in features.h5; see "
            f"{errors_file(summary.run_dir)}. Rerun the shards to retry only them.",
            markup=False,
        )
        raise typer.Exit(1)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a sharded extraction.")],
) -> None:
    """Assemble features.h5 from the shards of a run once every shard is done (the last shard does it too)."""
    from halp.store import RunStore

    store = RunStore(run_dir)
    identity = store.read_identity()
    if identity is None:
        _fail(f"{run_dir} is not a run directory (no run.json)")
        return
    num_shards = int(identity.get("num_shards", 1))
    if num_shards == 1:
        _fail(f"{run_dir} is a single-writer run; rerun `halp extract` with the same options to finish it")
        return
    with store.hold_run_lock("merge"):  # no shard starts or finishes while the parts are merged
        result = store.assemble_shards(num_shards)
    if result.missing:
        running = store.live_writers()
        states = [
            f"{name} ({'running' if shard_dir(store.root, name) in running else 'not running: rerun it'})"
            for name in result.missing
        ]
        _fail(f"not every shard is done: {', '.join(states)}")
        return
    verb = "assembled" if result.assembled else "already assembled"
    console.print(f"{verb} {result.num_samples} rows from {num_shards} shards: {store.features_path}", markup=False)
    if result.failed:
        console.print(f"{len(result.failed)} row(s) failed; see {errors_file(store.root)}", markup=False)
        raise typer.Exit(1)


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run directory or a features.h5 file.")],
    sample: Annotated[str | None, typer.Option(help="Show one sample by question_id.")] = None,
    detailed: Annotated[bool, typer.Option(help="Per-feature min/max/mean/std and the first samples.")] = False,
) -> None:
    """Summarize a run: samples, features, shapes and statistics."""
    from halp.cli.render import run_summary
    from halp.summary import summarize_run

    run_summary(console, summarize_run(run_dir, sample=sample, detailed=detailed))


@app.command()
def export(
    run_dir: FinishedRunArgument,
    output: Annotated[Path, typer.Argument(help="Output .h5 file.")],
    format: Annotated[str, typer.Option("--format", help="halp-legacy: the seeds' per-question groups.")] = (
        "halp-legacy"
    ),
) -> None:
    """Write a run in another layout (halp-legacy: what the HALP probe scripts read)."""
    from halp.legacy import export_legacy

    if format != "halp-legacy":
        _fail(f"unknown format {format!r}; available: halp-legacy")
    path = export_legacy(run_dir, output)
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def models(
    model: Annotated[str | None, typer.Option(help="Resolve the extraction points of this checkpoint.")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """List supported families, or show where halp reads a given checkpoint."""
    from halp.cli.render import checkpoint, families
    from halp.summary import describe_checkpoint, supported_families

    if model is None:
        families(console, supported_families())
    else:
        checkpoint(console, model, describe_checkpoint(model, trust_remote_code=trust_remote_code))


@app.command()
def label(
    run_dir: AnsweredRunArgument,
    labels: Annotated[
        Path | None, typer.Option(help="Import manual labels from this table (or Label Studio JSON export) instead.")
    ] = None,
    label_column: LabelColumnOption = None,
    judge: Annotated[str | None, typer.Option(help="Local causal LM asked a rubric for open answers.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the judge's own Python code to run.")] = False,
    resolve: Annotated[
        str, typer.Option(help="Reviewers' conflicts (reviews.jsonl): none leaves them unknown, latest takes the last.")
    ] = "none",
) -> None:
    """Label each answer hallucinated / not / unknown; write RUN_DIR/labels.csv and print the coverage.

    Manual decisions (`halp review`'s RUN_DIR/reviews.jsonl, or a Label Studio export as --labels) win over rules.
    """
    from halp.cli.render import label_coverage
    from halp.cli.review import print_review_summary
    from halp.label import Judge, label_run

    if labels is not None and judge is not None:
        _fail("--labels imports manual labels; --judge labels from answers. Use one of them.")
    chosen_judge = Judge.load(judge, trust_remote_code=trust_remote_code) if judge else None
    summary = label_run(run_dir, labels=labels, label_column=label_column, judge=chosen_judge, resolve=resolve)
    if summary.reviews is not None:
        print_review_summary(summary.reviews)
    label_coverage(console, summary)


@app.command()
def probe(
    run_dir: FinishedRunArgument,
    labels: Annotated[Path | None, typer.Option(help="Label table (default: RUN_DIR/labels.csv).")] = None,
    label_column: LabelColumnOption = None,
    features: Annotated[str | None, typer.Option(help="Comma-separated features (default: all stored).")] = None,
    probe: ProbeKindOption = "logreg",
    folds: FoldsOption = 5,
    split: Annotated[float | None, typer.Option(help="One stratified split with this test fraction (paper: 0.2).")] = (
        None
    ),
    group_by: Annotated[str | None, typer.Option(help="Per-group AUROC by this metadata column.")] = None,
    group_by_image: Annotated[
        bool, typer.Option("--group-by-image/--no-group-by-image", help="Keep each image's rows in one fold.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of splits, shuffled control, bootstrap and probes.")] = 42,
    bootstrap: BootstrapOption = 1000,
    device: Annotated[str, typer.Option(help="Device of the MLP probe: cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="Torch threads of the MLP on CPU (default: torch's).")] = None,
    jobs: Annotated[
        int,
        typer.Option(help="Processes evaluating feature x probe cells at once (results do not depend on it).", min=1),
    ] = 1,
) -> None:
    """Train and evaluate one probe per feature; write RUN_DIR/probes/ (results, predictions, models)."""
    options = dict(locals())
    from halp.cli.render import probe_results
    from halp.probe import train_probes

    setup_logging()
    chosen = [name.strip() for name in features.split(",") if name.strip()] if features else None
    results = from_options(
        train_probes,
        options,
        features=chosen,
        progress=lambda message: console.print(message, markup=False, highlight=False),
    )
    probe_results(console, results, run_dir)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory whose probes are trained (probes/results.csv).")],
    out: Annotated[Path | None, typer.Option(help="Where report.html and PNGs go (default RUN_DIR/report).")] = None,
) -> None:
    """Write report.html and PNGs: AUROC heatmap, ROC curves, per-group table, label balance."""
    from halp.cli.render import report_summary
    from halp.report import build_report

    report_summary(console, build_report(run_dir, out))


@app.command()
def predict(
    run: Annotated[Path, typer.Option(help="Run directory with trained probes.")],
    data: Annotated[Path, typer.Option(help="VQA table to score: CSV, JSONL, Parquet, Arrow or save_to_disk dir.")],
    images: TableImagesOption = None,
    feature: Annotated[str | None, typer.Option(help="Feature to score with (default: best AUROC).")] = None,
    probe: Annotated[str | None, typer.Option(help="logreg or mlp (default: best AUROC).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Flag risk >= T (default: the probe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output CSV (default RUN/risk/<data name>.csv).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per prefill pass.")] = 8,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto = the run's dtype, which the probe was trained on.")] = "auto",
    model: Annotated[str | None, typer.Option(help="The run's checkpoint, if it moved since extraction.")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Score (image, question) rows for hallucination risk from the prefill alone; write question_id,risk,flagged."""
    options = dict(locals())
    from halp.data import read_samples
    from halp.predict import RiskScorer, check_predict_output, predict_file

    setup_logging()
    destination = out or risk_file(run, data)
    check_predict_output(destination, run, data)
    read_samples(data)  # a bad or header-only table is refused before the model loads
    with interrupted_exits(f"interrupted; nothing was written to {destination}; rerun to score the table"):
        scorer = from_options(RiskScorer.from_run, options, run_dir=run)
        summary = predict_file(scorer, data, images, destination, progress=True)
    console.print(
        f"scored {summary.total - len(summary.failed)} of {summary.total} with {summary.feature} ({summary.probe}); "
        f"{summary.flagged} flagged at risk >= {summary.threshold:.3g}. wrote {summary.out}",
        markup=False,
        soft_wrap=True,
    )
    if summary.failed:
        console.print(f"{len(summary.failed)} row(s) could not be scored; see the error column.", markup=False)
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the checkpoint, data, runs and reports.")] = Path(
        "halp-demo"
    ),
    n_images: ImageCountOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the checkpoint, the data and the probes.")] = 0,
    world: Annotated[
        bool, typer.Option("--world", help="Instead: `halp world` (a model trained offline, its own mistakes).")
    ] = False,
) -> None:
    """Offline end-to-end run on planted labels (tiny model): extract, label, probe, report, and check."""
    options = options_set(locals())
    if world:
        # Imported here, not at the top: that would register `halp world` before this module's commands, first in help.
        from halp.cli.world import world as world_command

        world_command(out=out, n_images=n_images, seed=seed)
        return
    from halp.cli.render import demo_result
    from halp.demo import DemoConfig, run_demo

    setup_logging()
    result = run_demo(from_options(DemoConfig, options, progress=True), say=say)
    demo_result(console, result)
    if not result.passed:
        err_console.print("the planted check failed: see the FAIL lines above", markup=False)
        raise typer.Exit(1)


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="Output directory: <image stem>/*.npy + manifest.json per image.")],
    prompt: PromptOption = "Describe the image.",
    layers: LayersOption = "halp",
    save_tokens: Annotated[bool, typer.Option(help="Also save token-level arrays (large), not only mean pools.")] = (
        False
    ),
    batch_size: ImageBatchOption = 8,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Embed images: vision tokens before/after the projector, decoder states of image and text tokens, pools."""
    options = dict(locals())
    from halp.embed import Embedder, write_embeddings

    setup_logging()
    missing = [str(path) for path in images if not path.exists()]  # a FIFO or folder is named when it is read
    if missing:
        _fail(f"no such image file: {', '.join(missing)}")
    embedder = from_options(Embedder, options, tokens=save_tokens)
    manifest = from_options(write_embeddings, options, embedder=embedder, tokens=save_tokens, progress=say)
    console.print(f"embedded {len(images)} image(s); manifest: {manifest}", markup=False)


analyze_app = command_group("analyze", "Layer-wise analyses of the vision tokens: norms, neighbors.")


@analyze_app.command("norms")
def analyze_norms(
    model: ModelOption,
    images: ImagesToReadOption,
    out: Annotated[Path, typer.Option(help="Output directory: norms.json, norms.png (features/).")],
    layers: LayersOption = "all",
    prompt: PromptOption = "Describe the image.",
    save_features: Annotated[bool, typer.Option(help="Keep the token-level tensors (.npy) per image.")] = False,
    limit: ImageLimitOption = None,
    batch_size: ImageBatchOption = 4,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Per image and layer: L2-norm statistics of vision and text tokens (JSON) and a plot across layers."""
    from halp.analyze import analyze_norms as run_norms

    result = _analysis(run_norms, locals())
    console.print(f"wrote {result.summary_path} and {result.plot_path}", markup=False)
    if result.features_dir is not None:
        console.print(f"features: {result.features_dir}", markup=False)


@analyze_app.command("neighbors")
def analyze_neighbors(
    model: ModelOption,
    images: ImagesToReadOption,
    out: Annotated[Path, typer.Option(help="Output directory: neighbors.json and neighbors.html.")],
    layers: LayersOption = "halp",
    top_k: Annotated[int, typer.Option(help="Neighbours per vision token and lens.")] = 5,
    prompt: PromptOption = "Describe the image.",
    contextual_corpus: Annotated[
        Path | None, typer.Option(help="Text file (one sentence a line): adds LatentLens' contextual lens.")
    ] = None,
    contextual_layers: Annotated[
        str | None, typer.Option(help="Layers of the contextual index (default: --layers).")
    ] = None,
    limit: ImageLimitOption = None,
    batch_size: ImageBatchOption = 4,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Nearest vocabulary tokens of each vision token: input-embedding cosine and logit lens (optional LatentLens)."""
    from halp.analyze import analyze_neighbors as run_neighbors

    result = _analysis(run_neighbors, locals())
    console.print(f"wrote {result.json_path} and {result.html_path}", markup=False)


def _analysis(analysis: Callable[..., Analysis], options: dict[str, Any]) -> Analysis:
    """Run an analysis over the command's images with an `Embedder` made from its options."""
    from halp.embed import Embedder

    setup_logging()
    return from_options(analysis, options, embedder=from_options(Embedder, options), progress=say)

