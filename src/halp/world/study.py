"""The HALP study on the world model's own mistakes: train (or reuse) → study set → extract → label → probe → report.

Nothing is planted: the label of a row is whether the trained model's own greedy answer (decoded by
`halp extract` from the same prefill whose states are probed) differs from the exact ground truth.
The labels go through `halp.label` as an imported table; halp's rule labeller is run on the same rows as
an independent cross-check (wherever a rule decides, it must agree; `RuleCheck`).

Besides the per-question-type groups of `halp probe` (`--group-by question_type`), the study computes, from
the probes' pooled out-of-fold scores, the AUROC with a bootstrap interval of every feature x probe within
every question type and every difficulty, and a paired bootstrap of the AUROC difference between the best
query-token state and the vision-only state (the study's main claim), all with `halp.metrics`; `halp.findings`
says in words what the numbers show (`StudyResult.finding`).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from halp.errors import WorldError
from halp.features import is_vision_feature, split_feature
from halp.findings import Finding, state_finding
from halp.label_rules import label_answer
from halp.layout import PREDICTIONS_FILE, atomic_write, features_file, probe_file, write_text_atomic
from halp.metrics import group_aurocs, paired_difference
from halp.results import read_predictions
from halp.rows import read_row_texts
from halp.world.model import STUDY_STREAM, TrainingResult, WorldModelConfig, train
from halp.world.questions import QUESTION_TYPES, ask, is_wrong
from halp.world.scene import DIFFICULTIES, make_scene

SUMMARY_FILE = "world.json"
GROUPS_FILE = "world_groups.csv"
LABELS_TABLE = "exact_labels.csv"
#: Metadata columns of the study table that results are broken down by.
GROUP_COLUMNS = ("question_type", "difficulty")


@dataclass
class StudyConfig:
    out: Path
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    n_images: int = 750
    questions_per_image: int = 2
    probe: str = "both"
    folds: int = 5
    bootstrap: int = 1000
    batch_size: int = 32
    max_new_tokens: int = 4
    seed: int = 0
    cache_dir: Path | None = None
    threads: int | None = 1
    #: Processes training the probes, a feature x probe type each at a time (None: the usable CPU cores). Results do
    #: not depend on it.
    probe_jobs: int | None = None
    progress: bool = True
    #: Probe constructor overrides per type (tests shorten the MLP), as `halp.probe.train_probes` takes them.
    probe_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Use the weights halp ships for the model's config when there are some (see `halp.world.model.train`).
    shipped: bool = True


@dataclass
class RuleCheck:
    """halp's rule labeller on the same rows: how many it decides, and whether it ever disagrees."""

    decided: int
    agreed: int
    undecided_by_type: dict[str, int]

    @property
    def disagreed(self) -> int:
        return self.decided - self.agreed


@dataclass
class StudyResult:
    out: Path
    run_dir: Path
    training: TrainingResult
    accuracy: dict[str, Any]
    rules: RuleCheck
    results: pd.DataFrame
    groups: pd.DataFrame
    claim: list[dict[str, Any]]
    report: Path
    seconds: dict[str, float]
    #: "What this says": the best feature vs vision_only, and both within each difficulty and question type.
    finding: Finding | None = None


# ----- the study set -------------------------------------------------------------------------


def make_study_set(directory: Path, n_images: int, questions_per_image: int, seed: int) -> tuple[Path, Path]:
    """Write `vqa.csv` and `images/`: difficulties in turn, questions of distinct types per image.

    Columns: question_id, image_id, question, answer, and the metadata question_type, subtype, difficulty,
    objects (the number of objects in the scene).
    """
    if questions_per_image > len(QUESTION_TYPES):
        raise WorldError(f"at most {len(QUESTION_TYPES)} questions per image (one per type)")
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, STUDY_STREAM])
    levels = tuple(DIFFICULTIES)
    table = directory / "vqa.csv"
    with atomic_write(table, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["question_id", "image_id", "question", "answer", *GROUP_COLUMNS[:1], "subtype", "difficulty", "objects"]
        )
        for index in range(n_images):
            difficulty = levels[index % len(levels)]
            scene = make_scene(rng, difficulty)
            image_id = f"img_{index:05d}.png"
            scene.image.save(images_dir / image_id)
            asked: set[str] = set()
            for number in range(questions_per_image):
                # Distinct types per image: draw among those not asked yet that the scene allows.
                for kind in rng.permutation(len(QUESTION_TYPES)):
                    question_type = QUESTION_TYPES[int(kind)]
                    if question_type in asked:
                        continue
                    try:
                        question = ask(rng, scene, question_type)
                    except ValueError:
                        continue
                    break
                asked.add(question.question_type)
                writer.writerow(
                    [
                        f"q{index:05d}_{number}",
                        image_id,
                        question.question,
                        question.answer,
                        question.question_type,
                        question.subtype,
                        difficulty,
                        len(scene.objects),
                    ]
                )
    return table, images_dir


# ----- labels --------------------------------------------------------------------------------


def read_answers(run_dir: Path) -> pd.DataFrame:
    """question_id, question, ground_truth, answer and the metadata columns of a run's features.h5."""
    texts = read_row_texts(features_file(run_dir), ("question_id", "question", "ground_truth", "answer"))
    return pd.DataFrame({**texts.columns, **texts.meta})


def exact_labels(rows: pd.DataFrame) -> pd.DataFrame:
    """question_id, label (1: the model's greedy answer is wrong) and the group columns."""
    labels = [
        is_wrong(answer, truth, question)
        for question, answer, truth in zip(rows["question"], rows["answer"], rows["ground_truth"], strict=True)
    ]
    return pd.DataFrame({"question_id": rows["question_id"], "label": labels})


def rule_check(rows: pd.DataFrame, labels: pd.DataFrame) -> RuleCheck:
    decided = agreed = 0
    undecided: dict[str, int] = {}
    for (_, row), exact in zip(rows.iterrows(), labels["label"], strict=True):
        verdict = label_answer(row["question"], row["ground_truth"], row["answer"]).label
        if verdict is None:
            undecided[row["question_type"]] = undecided.get(row["question_type"], 0) + 1
            continue
        decided += 1
        agreed += int(verdict == exact)
    return RuleCheck(decided, agreed, dict(sorted(undecided.items())))


def accuracy_table(rows: pd.DataFrame, labels: pd.DataFrame) -> dict[str, Any]:
    """The model's greedy accuracy overall and per question type and difficulty."""
    correct = 1 - labels["label"].to_numpy()
    out: dict[str, Any] = {"overall": float(correct.mean()), "n": len(correct)}
    for column in GROUP_COLUMNS:
        out[column] = {
            str(value): float(correct[(rows[column] == value).to_numpy()].mean())
            for value in sorted(rows[column].unique())
        }
    return out


# ----- group AUROCs and the claim ------------------------------------------------------------


def claim_rows(results: pd.DataFrame, predictions: pd.DataFrame, resamples: int, seed: int) -> list[dict[str, Any]]:
    """Per probe type: best query-token state vs vision_only, and vs the best vision-derived state."""
    out = []
    for probe, frame in results.groupby("probe", sort=True):
        frame = frame.dropna(subset=["auroc_mean"])
        query = frame[[split_feature(f)[0] == "query_token" for f in frame["feature"]]]
        vision = frame[[is_vision_feature(f) for f in frame["feature"]]]
        if query.empty or vision.empty:
            continue
        best_query = query.loc[query["auroc_mean"].idxmax(), "feature"]
        best_vision = vision.loc[vision["auroc_mean"].idxmax(), "feature"]
        for other in dict.fromkeys(["vision_only", best_vision]):
            if other in set(frame["feature"]):
                paired = paired_difference(predictions, (best_query, probe), (other, probe), resamples, seed)
                out.append({"probe": probe, **paired.as_dict()})
    return out


# ----- the run -------------------------------------------------------------------------------


def run_study(config: StudyConfig, say: Callable[[str], None] | None = None) -> StudyResult:
    say = say or (lambda message: None)
    from threadpoolctl import threadpool_limits

    from halp.extract import ExtractConfig, run_extraction
    from halp.label import label_run
    from halp.pipeline import usable_cores
    from halp.probe import probe_workers, train_probes
    from halp.report import build_report

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    training = train(config.model, config.cache_dir, config.threads, config.progress, say, shipped=config.shipped)
    origin = "shipped model" if training.shipped else "cached model" if training.cached else "train"
    seconds[origin] = time.perf_counter() - start

    jobs = config.probe_jobs or usable_cores()
    # The probe processes start now (each imports torch and scikit-learn, seconds on a small machine) and wait
    # while the study set is drawn and extracted, instead of starting after.
    with probe_workers(jobs) as workers:
        start = time.perf_counter()
        table, images = make_study_set(out / "data", config.n_images, config.questions_per_image, config.seed)
        seconds["study set"] = time.perf_counter() - start
        say(f"wrote {table} ({config.n_images} images, {config.n_images * config.questions_per_image} questions)")

        start = time.perf_counter()
        run_dir = out / "run"
        summary = run_extraction(
            ExtractConfig(
                model=str(training.checkpoint),
                data=table,
                images=images,
                out=run_dir,
                layers="all",
                batch_size=config.batch_size,
                max_new_tokens=config.max_new_tokens,
                device="cpu",
                dtype="float32",
                overwrite=True,
                progress=config.progress,
            )
        )
        if not summary.finished:
            raise WorldError(f"extraction of the study set did not finish: {summary.failed[:3]}")
        seconds["extract"] = time.perf_counter() - start
        say(f"extracted {summary.processed} rows into {run_dir} in {seconds['extract']:.0f}s")

        start = time.perf_counter()
        rows = read_answers(run_dir)
        labels = exact_labels(rows)
        labels_path = out / "data" / LABELS_TABLE
        with atomic_write(labels_path, newline="") as handle:
            labels.to_csv(handle, index=False)
        coverage = label_run(run_dir, labels=labels_path, label_column="label")
        if coverage.labelled != len(rows):
            raise WorldError(
                f"only {coverage.labelled} of {len(rows)} rows were labelled; every row has an exact answer"
            )
        rules = rule_check(rows, labels)
        if rules.disagreed:
            raise WorldError(f"halp's rule labeller disagrees with the exact labels on {rules.disagreed} row(s)")
        accuracy = accuracy_table(rows, labels)
        say(
            f"greedy accuracy of the model on the study set: {accuracy['overall']:.3f}; "
            f"rules decide {rules.decided} of {len(rows)} rows and agree on all of them"
        )
        if labels["label"].nunique() < 2:
            raise WorldError("every answer is right (or every one wrong): there is nothing to predict")

        with threadpool_limits(limits=1):
            results = train_probes(
                run_dir,
                probe=config.probe,
                folds=config.folds,
                group_by="question_type",
                seed=config.seed,
                bootstrap=config.bootstrap,
                threads=1,
                jobs=jobs,
                workers=workers,
                probe_params=config.probe_params,
                progress=say,
            )
        seconds["label + probe"] = time.perf_counter() - start

    start = time.perf_counter()
    predictions = read_predictions(probe_file(run_dir, PREDICTIONS_FILE))
    meta = rows[["question_id", *GROUP_COLUMNS]]
    groups = group_aurocs(predictions, meta, GROUP_COLUMNS, config.bootstrap, config.seed)
    with atomic_write(out / GROUPS_FILE, newline="") as handle:
        groups.to_csv(handle, index=False)
    claim = claim_rows(results, predictions, config.bootstrap, config.seed)
    finding = state_finding(results, predictions, meta, GROUP_COLUMNS, config.bootstrap, config.seed)
    report = build_report(
        run_dir, title="halp world: a trained tiny Qwen2-VL's own mistakes", finding=finding
    ).html_path
    seconds["groups + report"] = time.perf_counter() - start

    record = {
        "training": training.as_dict() | {"losses": None, "train_accuracy": None, "vision_losses": None},
        "study": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(config).items()
            if key != "model"
        },
        "accuracy": accuracy,
        "rules": asdict(rules),
        "claim": claim,
        "finding": finding.sentences if finding is not None else [],
        "seconds": seconds,
        "report": str(report),
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(record, indent=2, default=str))
    return StudyResult(out, run_dir, training, accuracy, rules, results, groups, claim, report, seconds, finding)
