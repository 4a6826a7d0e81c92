"""A small `halp world` run to serve (tests/test_serve*.py, benchmarks/bench_serve.py): the world model halp ships,
a study set, its extraction with answers, the exact labels of those answers and logistic probes.

Nothing is trained but the probes: the shipped weights are used as `halp world` uses them. The run's layout is
what `halp world` writes (RUN/probes/results.csv, predictions.csv with out-of-fold scores, saved probes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from halp.errors import WorldError
from halp.extract import ExtractConfig, run_extraction
from halp.label import label_run
from halp.layout import atomic_write
from halp.probe import train_probes
from halp.world.model import WorldModelConfig, train
from halp.world.study import LABELS_TABLE, exact_labels, make_study_set, read_answers

#: The feature the served runs' probes are trained on: the query token at the middle of the 4 decoder blocks.
SERVED_FEATURES = ("query_token/layer_2", "vision_only")


@dataclass(frozen=True)
class WorldRun:
    run_dir: Path
    table: Path
    images: Path
    checkpoint: Path


def make_world_run(
    out: Path,
    n_images: int = 24,
    seed: int = 0,
    features: Sequence[str] = SERVED_FEATURES,
    folds: int = 3,
    max_new_tokens: int = 4,
    batch_size: int = 8,
    workers: int = 0,
) -> WorldRun:
    """Extract `2 * n_images` questions of a new study set with the shipped world model into OUT/run, label each
    answer exactly and train a logistic probe per feature (`folds`-fold out-of-fold scores, no bootstrap)."""
    training = train(WorldModelConfig(), progress=False, shipped=True)
    if not training.shipped:
        raise WorldError("halp ships no world model for the default recipe; a served run needs its weights")
    table, images = make_study_set(out / "data", n_images, 2, seed)
    run_dir = out / "run"
    summary = run_extraction(
        ExtractConfig(
            model=str(training.checkpoint), data=table, images=images, out=run_dir, batch_size=batch_size,
            max_new_tokens=max_new_tokens, device="cpu", dtype="float32", progress=False, workers=workers,
        )
    )  # fmt: skip
    if not summary.finished:
        raise WorldError(f"the extraction did not finish: {summary.failed[:3]}")
    labels = exact_labels(read_answers(run_dir))
    labels_path = out / "data" / LABELS_TABLE
    with atomic_write(labels_path, newline="") as handle:
        labels.to_csv(handle, index=False)
    label_run(run_dir, labels=labels_path, label_column="label")
    train_probes(run_dir, features=list(features), probe="logreg", folds=folds, bootstrap=0, seed=seed)
    return WorldRun(run_dir, table, images, training.checkpoint)
