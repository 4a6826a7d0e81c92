"""`halp demo`: the whole pipeline, offline, on a VQA set whose hallucination labels are planted.

A tiny random-weight Qwen2-VL checkpoint (8 decoder blocks) is built by `halp.tiny_checkpoints`, a VQA set of
small synthetic images and templated questions is generated, and two labels are planted:

- `image_label`: 1 for low-light images (dark background), whatever the question; it depends only on
  the pixels.
- `question_label`: 1 for counting questions ("How many ...", "Count ..."), whatever the image; it
  depends only on the wording.

Both are drawn independently of each other and of every nuisance factor (shape, colour, image size).
The demo then runs what a user runs: `halp extract` (prefill only), `halp label --labels` (manual
import, once per planted label, each into its own run directory sharing the same features),
`halp probe` and `halp report`.

Because the labels are planted, the outcome is known, so the demo is also a check (`planted_checks`).
What holds even with random weights, and is therefore asserted:

- The vision tower sees the pixels, so brightness survives into `vision_only` and every later vision
  feature: the best vision-derived probe on `image_label` reaches AUROC >= 0.9 while the same probe
  on shuffled labels stays near chance.
- The prompt's last token attends to the question, so the wording reaches `query_token`: the best
  query-token probe on `question_label` reaches AUROC >= 0.9.
- Vision features cannot see the question: the vision tower never reads text, and the image tokens
  come before the question in the prompt, so causal attention keeps the question out of
  `vision_token*` as well. Every vision-derived probe on `question_label` stays near chance (<= 0.7).

Not asserted: whether `query_token` finds `image_label` (it attends to the image tokens too, so with
random weights it usually does, but nothing guarantees how much).
"""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from halp.features import QUERY_TOKEN, is_vision_feature, split_feature
from halp.layout import FEATURES_FILE, RUN_FILE
from halp.report import Report

#: Planted label name -> what it depends on.
PLANTED = {"image_label": "image content: low-light images", "question_label": "question wording: counting questions"}

IMAGE_SIZES = [(56, 56), (84, 56), (56, 84)]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle")
#: Counting questions: question_label = 1. `{colour}` / `{shape}` vary so that no single word decides.
COUNTING = (
    "How many shapes are there in the image?",
    "How many {colour} objects can you count?",
    "Count the {shape}s in the picture.",
    "How many {shape}s are shown?",
)
#: Other questions: question_label = 0.
OTHER = (
    "What color is the {shape}?",
    "Is there a {colour} shape in the image?",
    "Is the picture bright or dark?",
    "Describe the image.",
    "Where is the {colour} {shape}?",
    "What shape is shown?",
)

# Thresholds of the planted check (see the module docstring for why each is guaranteed).
FOUND_AUROC = 0.9
CHANCE_BAND = 0.15
BLIND_MAX_AUROC = 0.7


@dataclass
class DemoConfig:
    out: Path
    n_images: int = 150
    questions_per_image: int = 2
    num_layers: int = 8
    dark_fraction: float = 0.4
    counting_fraction: float = 0.4
    unknown_fraction: float = 0.03
    probe: str = "logreg"
    folds: int = 5
    bootstrap: int = 200
    seed: int = 0
    progress: bool = False


@dataclass
class Check:
    label: str
    claim: str
    passed: bool
    detail: str


@dataclass
class DemoResult:
    out: Path
    results: dict[str, pd.DataFrame]
    reports: dict[str, Report]
    checks: list[Check]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


# ----- the planted VQA set -----------------------------------------------------------------


def draw_image(rng: np.random.Generator, dark: bool) -> tuple[Image.Image, str, str]:
    """Noisy background (dark or bright), one shape of a random colour; returns (image, shape, colour)."""
    width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    base = rng.uniform(20, 90) if dark else rng.uniform(150, 235)
    pixels = (base + rng.normal(0, 18, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = int(rng.integers(14, 30))
    x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
    box = [x0, y0, x0 + size, y0 + size]
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x0, y0 + size), (x0 + size, y0 + size), (x0 + size // 2, y0)], fill=COLOURS[colour])
    return image, shape, colour


def _ground_truth(question: str, shape: str, colour: str, dark: bool) -> str:
    text = question.lower()
    if text.startswith(("how many", "count")):
        asked_colour = next((c for c in COLOURS if c in text), None)
        return "0" if asked_colour and asked_colour != colour else "1"
    if text.startswith("is there a"):
        return "yes" if colour in text else "no"
    if "bright or dark" in text:
        return "dark" if dark else "bright"
    if text.startswith("what color"):
        return colour
    if text.startswith("what shape"):
        return shape
    return f"a {colour} {shape}"


def make_planted_set(
    directory: str | Path,
    n_images: int = 150,
    questions_per_image: int = 2,
    dark_fraction: float = 0.4,
    counting_fraction: float = 0.4,
    unknown_fraction: float = 0.03,
    seed: int = 0,
) -> tuple[Path, Path, Path]:
    """Write `vqa.csv`, `images/` and `planted_labels.csv` (question_id,image_label,question_label).

    The VQA table carries `shape`, `colour` and `lighting` as metadata (for per-group results); the
    labels live in their own table, as manual labels would. A few labels are left empty (unknown).
    """
    directory = Path(directory)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table, labels = directory / "vqa.csv", directory / "planted_labels.csv"
    with table.open("w", newline="") as vqa_handle, labels.open("w", newline="") as label_handle:
        vqa = csv.writer(vqa_handle)
        planted = csv.writer(label_handle)
        vqa.writerow(["question_id", "image_id", "question", "answer", "shape", "colour", "lighting"])
        planted.writerow(["question_id", "image_label", "question_label"])
        for image_index in range(n_images):
            dark = bool(rng.random() < dark_fraction)
            image, shape, colour = draw_image(rng, dark)
            image_id = f"img_{image_index:04d}.png"
            image.save(images_dir / image_id)
            for question_index in range(questions_per_image):
                counting = bool(rng.random() < counting_fraction)
                templates = COUNTING if counting else OTHER
                template = templates[int(rng.integers(len(templates)))]
                question = template.format(
                    colour=list(COLOURS)[int(rng.integers(len(COLOURS)))], shape=SHAPES[int(rng.integers(3))]
                )
                qid = f"q{image_index:04d}_{question_index}"
                vqa.writerow(
                    [
                        qid,
                        image_id,
                        question,
                        _ground_truth(question, shape, colour, dark),
                        shape,
                        colour,
                        "dark" if dark else "bright",
                    ]
                )
                unknown = rng.random(2) < unknown_fraction
                planted.writerow([qid, "" if unknown[0] else int(dark), "" if unknown[1] else int(counting)])
    return table, images_dir, labels


# ----- the planted check -------------------------------------------------------------------


def _best(results: pd.DataFrame, keep) -> pd.Series | None:
    rows = results[[keep(feature) for feature in results["feature"]]].dropna(subset=["auroc_mean"])
    return None if rows.empty else rows.loc[rows["auroc_mean"].idxmax()]


def _is_query(feature: str) -> bool:
    return split_feature(feature)[0] == QUERY_TOKEN


def planted_checks(image_results: pd.DataFrame, question_results: pd.DataFrame) -> list[Check]:
    """The outcomes the planted design guarantees (module docstring), checked on probe results."""
    checks = []
    vision = _best(image_results, is_vision_feature)
    if vision is None:
        checks.append(Check("image_label", "vision features find it", False, "no vision-derived feature scored"))
    else:
        checks.append(
            Check(
                "image_label",
                f"best vision-derived AUROC >= {FOUND_AUROC}",
                bool(vision["auroc_mean"] >= FOUND_AUROC),
                f"{vision['feature']} ({vision['probe']}): {vision['auroc_mean']:.3f}",
            )
        )
        control = vision.get("control_auroc_mean", np.nan)
        checks.append(
            Check(
                "image_label",
                f"same probe on shuffled labels within 0.5 ± {CHANCE_BAND}",
                bool(np.isfinite(control) and abs(control - 0.5) <= CHANCE_BAND),
                f"control AUROC {control:.3f}",
            )
        )
    query = _best(question_results, _is_query)
    checks.append(
        Check(
            "question_label",
            f"best query-token AUROC >= {FOUND_AUROC}",
            bool(query is not None and query["auroc_mean"] >= FOUND_AUROC),
            "no query-token feature scored"
            if query is None
            else f"{query['feature']} ({query['probe']}): {query['auroc_mean']:.3f}",
        )
    )
    blind = _best(question_results, is_vision_feature)
    checks.append(
        Check(
            "question_label",
            f"every vision-derived AUROC <= {BLIND_MAX_AUROC} (they cannot see the question)",
            bool(blind is not None and blind["auroc_mean"] <= BLIND_MAX_AUROC),
            "no vision-derived feature scored"
            if blind is None
            else f"highest: {blind['feature']} ({blind['probe']}): {blind['auroc_mean']:.3f}",
        )
    )
    return checks


# ----- the run -----------------------------------------------------------------------------


def run_demo(config: DemoConfig, say: Callable[[str], None] | None = None) -> DemoResult:
    """Build, generate, extract once, then label, probe and report each planted label.

    `say` receives one line per step and per trained probe (default: nothing is printed).
    """
    say = say or (lambda message: None)
    from threadpoolctl import threadpool_limits

    from halp.extract import ExtractConfig, run_extraction
    from halp.label import label_run
    from halp.probe import train_probes
    from halp.report import build_report
    from halp.tiny_checkpoints import build_checkpoint

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    checkpoint = build_checkpoint("qwen2_vl", out / "checkpoint", seed=config.seed, num_layers=config.num_layers)
    table, images, planted = make_planted_set(
        out / "data",
        n_images=config.n_images,
        questions_per_image=config.questions_per_image,
        dark_fraction=config.dark_fraction,
        counting_fraction=config.counting_fraction,
        unknown_fraction=config.unknown_fraction,
        seed=config.seed,
    )
    seconds["build"] = time.perf_counter() - start
    say(f"built {checkpoint} and {table} ({config.n_images} images) in {seconds['build']:.1f}s")

    start = time.perf_counter()
    features_run = out / "run"
    summary = run_extraction(
        ExtractConfig(
            model=str(checkpoint),
            data=table,
            images=images,
            out=features_run,
            layers="halp",
            batch_size=16,
            generate=False,
            device="cpu",
            dtype="float32",
            overwrite=True,
            progress=config.progress,
        )
    )
    if not summary.finished:
        raise RuntimeError(f"demo extraction did not finish: {summary.failed[:3]}")
    seconds["extract"] = time.perf_counter() - start
    say(f"extracted {summary.processed} samples into {features_run} in {seconds['extract']:.1f}s")

    results: dict[str, pd.DataFrame] = {}
    reports: dict[str, Report] = {}
    for label, depends_on in PLANTED.items():
        start = time.perf_counter()
        run_dir = out / label
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        # Each planted label gets its own run directory (probes/ and report/ are per run) over the
        # same extracted features.
        for name in (FEATURES_FILE, RUN_FILE):
            shutil.copy2(features_run / name, run_dir / name)
        label_run(run_dir, labels=planted, label_column=label)
        # One BLAS thread for these 300 x 64 fits: extra threads only synchronise, and on a loaded
        # machine OpenBLAS's spinning threads made the probes over ten times slower (measured).
        with threadpool_limits(limits=1):
            results[label] = train_probes(
                run_dir,
                probe=config.probe,
                folds=config.folds,
                group_by="shape",
                seed=config.seed,
                bootstrap=config.bootstrap,
                progress=lambda message, label=label: say(f"{label}: {message}"),
            )
        reports[label] = build_report(run_dir, title=f"halp demo: {label} (planted on {depends_on})")
        seconds[label] = time.perf_counter() - start
    checks = planted_checks(results["image_label"], results["question_label"])
    return DemoResult(out, results, reports, checks, seconds)
