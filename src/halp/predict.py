"""`halp predict` and `RiskScorer`: score (image, question) pairs before a single answer token exists.

This is the deployment use of a trained run: the run's model is loaded with the run's dtype, one
prefill pass reads the probe's feature (the same hooks and token positions as `halp extract`), and
the probe saved by `halp probe` for that feature turns it into a risk (the probe's probability of
hallucination). Nothing is generated.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from halp.capture import FeatureExtractor
from halp.data import ImageError, Sample, load_image, open_table, to_rgb
from halp.errors import ParameterError, ScorerError
from halp.features import PRE_LM_REPRESENTATIONS, REPRESENTATIONS, split_feature
from halp.inputs import special_tokens_of
from halp.layout import RESULTS_FILE, atomic_write, features_path, probe_file, probes_dir, run_file
from halp.results import best_result, read_results
from halp.rows import open_run_file


def choose_probe(run_dir: str | Path, feature: str | None = None, probe: str | None = None) -> tuple[str, str]:
    """The (feature, probe) to score with: the given ones, else the best by auroc_mean in results.csv."""
    run_dir = Path(run_dir)
    if feature is not None and probe is not None:
        return feature, probe
    results_path = probe_file(run_dir, RESULTS_FILE)
    if not results_path.is_file():
        raise ScorerError(
            f"{run_dir} has no trained probes ({results_path} does not exist): run `halp probe {run_dir}` first"
        )
    results = read_results(results_path)
    if feature is not None:
        results = results[results["feature"] == feature]
    if probe is not None:
        results = results[results["probe"] == probe]
    best = best_result(results)
    if best is None:
        wanted = ", ".join(f"{k}={v!r}" for k, v in (("feature", feature), ("probe", probe)) if v is not None)
        raise ScorerError(
            f"{results_path} has no scored probe{' with ' + wanted if wanted else ''}; {_trained_probes(run_dir)}"
        )
    return str(best["feature"]), str(best["probe"])


def _trained_probes(run_dir: Path) -> str:
    """"choose one of the trained probes (...) with feature= and probe=", from results.csv and the saved models."""
    from halp.probe import probe_stem

    results_path = probe_file(run_dir, RESULTS_FILE)
    if not results_path.is_file():
        return f"the run has no trained probes (run `halp probe {run_dir}`)"
    results = read_results(results_path).dropna(subset=["auroc_mean"])
    results = results.sort_values("auroc_mean", ascending=False, kind="stable")  # the best first
    stems = {(f, p): probe_stem(run_dir, f, p) for f, p in zip(results["feature"], results["probe"], strict=True)}
    saved = [key for key, stem in stems.items() if stem.with_name(stem.name + ".safetensors").is_file()]
    if not saved:
        return "it has no other saved probe either"
    shown = ", ".join(f"{feature} ({probe})" for feature, probe in saved[:6]) + (" ..." if len(saved) > 6 else "")
    return f"choose one of its trained probes with feature= and probe= ({shown})"


def run_attributes(run_dir: str | Path) -> dict[str, Any]:
    """Root attributes of RUN_DIR/features.h5, plus `model_ref`: the model as `halp extract` resolved it."""
    from halp.layout import features_file

    run_dir = Path(run_dir)
    with open_run_file(features_file(run_dir)) as handle:  # a damaged file is named, with what to do
        raw = dict(handle.attrs.items())
    attrs = {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in raw.items()}
    # run.json holds the model as an absolute path for local checkpoints (attrs keep what was typed,
    # which may be relative to another working directory).
    identity_path = run_file(run_dir)
    identity = json.loads(identity_path.read_text()) if identity_path.is_file() else {}
    attrs["model_ref"] = identity.get("model") or attrs.get("model_id")
    if not attrs["model_ref"]:
        raise ScorerError(f"{run_dir} records no model (neither run.json nor features.h5 attrs)")
    return attrs


def as_image(image: Image.Image | str | Path, exif_orientation: bool = True) -> Image.Image:
    """A PIL image as RGB; a path is opened with the same rules as `halp extract`."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    return load_image(path.parent, path.name, exif_orientation)


@dataclass
class RiskScorer:
    """A run's model, one feature's extraction point and that feature's trained probe."""

    extractor: FeatureExtractor
    probe: Any
    feature: str
    probe_name: str
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    #: The run's image policy (features of upright and of sideways photos differ): the run's, not a new default.
    exif_orientation: bool = True

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        feature: str | None = None,
        probe: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        threshold: float | None = None,
        model: str | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> RiskScorer:
        """Load the run's model and the saved probe of `feature` (default: the best by auroc_mean).

        dtype "auto" is the run's dtype: the probe was fitted on features of that precision. `model`
        overrides where the checkpoint is (a run moved to another machine).
        """
        from halp.loading import load_model
        from halp.models import adapter_for
        from halp.probe import load_probe, probe_stem

        run_dir = Path(run_dir)
        feature, probe = choose_probe(run_dir, feature, probe)
        attrs = run_attributes(run_dir)
        layers = _layers_for(feature, attrs)
        stem = probe_stem(run_dir, feature, probe)
        if not stem.with_name(stem.name + ".safetensors").is_file():
            raise ScorerError(
                f"{run_dir} has no trained {probe} probe on {feature} (no saved probe {stem}.safetensors); "
                f"{_trained_probes(run_dir)}, or train this one with `halp probe {run_dir} --features {feature} "
                f"--probe {probe}`"
            )
        fitted, meta = load_probe(stem)
        chosen_threshold = threshold if threshold is not None else meta.get("threshold")
        if chosen_threshold is None:
            raise ScorerError(f"{stem}.json has no threshold; pass one as threshold=")

        run_dtype = str(attrs.get("dtype", "float32"))
        loaded, processor = load_model(
            model or str(attrs["model_ref"]), device, run_dtype if dtype == "auto" else dtype, trust_remote_code
        )
        _check_same_model(loaded, attrs)
        extractor = FeatureExtractor(adapter_for(loaded, processor), layers)
        exif = bool(attrs.get("exif_orientation", True))
        return cls(extractor, fitted, feature, probe, float(chosen_threshold), meta, batch_size, exif)

    def score(self, image: Image.Image | str | Path, question: str) -> float:
        """Risk of hallucination in [0, 1] for one (image, question), from the prefill alone."""
        return float(self.score_batch([image], [question])[0])

    def score_batch(self, images: Sequence[Image.Image | str | Path], questions: Sequence[str]) -> np.ndarray:
        """Risks for aligned lists of images and questions, `batch_size` prefill passes at a time."""
        if len(images) != len(questions):
            raise ParameterError("questions", f": {len(images)} images but {len(questions)} questions")
        risks = np.empty(len(questions), dtype=np.float64)
        for start in range(0, len(questions), self.batch_size):
            stop = start + self.batch_size
            batch_images = [as_image(image, self.exif_orientation) for image in images[start:stop]]
            result = self.extractor(batch_images, list(questions[start:stop]), max_new_tokens=0)
            risks[start:stop] = self.risks(result.features)
        return risks

    def risks(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The probe's P(hallucinated) for each row of a prefill's features (`FeatureExtractor` names)."""
        return self.probe.predict_proba(features[self.feature])[:, 1]

    def flagged(self, risks: np.ndarray) -> np.ndarray:
        return np.asarray(risks) >= self.threshold


def _layers_for(feature: str, attrs: dict[str, Any]) -> list[int]:
    """The decoder layer the feature needs (none for projector features); it must be one the run extracted."""
    representation, layer = split_feature(feature)
    if representation not in REPRESENTATIONS:
        raise ScorerError(f"feature {feature!r} is not a halp feature name")
    if layer is None:
        if representation not in PRE_LM_REPRESENTATIONS:
            raise ScorerError(f"feature {feature!r} needs a layer (e.g. {representation}/layer_0)")
        return []
    run_layers = [int(value) for value in np.atleast_1d(attrs.get("layers", []))]
    if run_layers and layer not in run_layers:
        raise ScorerError(f"feature {feature!r}: the run extracted layers {run_layers}, not {layer}")
    return [layer]


def _check_same_model(model: Any, attrs: dict[str, Any]) -> None:
    """A probe only means something on the model it was trained on; catch a wrong --model early."""
    expected_type = attrs.get("model_type")
    if expected_type and model.config.model_type != expected_type:
        raise ScorerError(f"the run was extracted from a {expected_type} model, this is {model.config.model_type}")
    expected_hidden = attrs.get("hidden_size")
    text_config = getattr(model.config, "text_config", model.config)
    hidden = getattr(text_config, "hidden_size", None)
    if expected_hidden and hidden and int(expected_hidden) != int(hidden):
        raise ScorerError(f"the run's model has hidden size {expected_hidden}, this one {hidden}")


# ----- halp predict ------------------------------------------------------------------------


def check_predict_output(out: str | Path, run_dir: str | Path, data: str | Path) -> None:
    """Refuse an output path that is one of predict's inputs: the table, or a file of the run it reads."""
    target = Path(out).resolve()
    run_dir = Path(run_dir).resolve()
    inputs = [Path(data).resolve(), features_path(run_dir), run_file(run_dir)]
    if target in inputs or target.is_relative_to(probes_dir(run_dir)) or target.is_dir():
        raise ParameterError(
            "out", f"{out} is one of the inputs of `halp predict` (or a directory); choose another file"
        )



@dataclass
class PredictSummary:
    out: Path
    total: int
    flagged: int
    failed: list[tuple[str, str]]
    feature: str
    probe: str
    threshold: float


def predict_file(
    scorer: RiskScorer, data: str | Path, images_dir: str | Path | None, out: str | Path, progress: bool = False
) -> PredictSummary:
    """Score every row of a VQA table; write `question_id,risk,flagged,error` to `out` (atomically).

    A row whose image cannot be read gets an empty risk and the reason in `error`; the others are scored.
    """
    from tqdm.auto import tqdm

    table = open_table(data)
    samples = table.samples
    source = table.image_source(images_dir)  # files under images_dir, or the images the table embeds
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    specials = special_tokens_of(scorer.extractor)
    risks: dict[str, float] = {}
    failed: list[tuple[str, str]] = []
    with tqdm(total=len(samples), unit="sample", disable=not progress, desc="predict") as bar:
        for start in range(0, len(samples), scorer.batch_size):
            batch = samples[start : start + scorer.batch_size]
            good: list[Sample] = []
            images: list[Image.Image] = []
            asked = []
            for sample in batch:
                present = sorted(token for token in specials if token in sample.question)
                if present:
                    failed.append((sample.question_id, f"the question contains the model's special token(s) "
                                                       f"{', '.join(map(repr, present[:3]))}"))
                    continue
                asked.append(sample)
            for sample, image in zip(asked, source.load(asked, scorer.exif_orientation), strict=True):
                if isinstance(image, ImageError):
                    failed.append((sample.question_id, str(image)))
                else:
                    images.append(image)
                    good.append(sample)
            risks.update(_score_isolating_failures(scorer, good, images, failed))
            bar.update(len(batch))
    errors = dict(failed)
    with atomic_write(out, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "risk", "flagged", "error"])
        for sample in samples:
            risk = risks.get(sample.question_id, math.nan)
            if math.isnan(risk):
                writer.writerow([sample.question_id, "", "", errors.get(sample.question_id, "not scored")])
            else:
                writer.writerow([sample.question_id, format(risk, ".10g"), int(risk >= scorer.threshold), ""])
    flagged = sum(risk >= scorer.threshold for risk in risks.values())
    return PredictSummary(out, len(samples), flagged, failed, scorer.feature, scorer.probe_name, scorer.threshold)


def _score_isolating_failures(
    scorer: RiskScorer, samples: list[Sample], images: list[Image.Image], failed: list[tuple[str, str]]
) -> dict[str, float]:
    """Risks of a batch; if the batch fails (one row's image or prompt), each row alone, so only that row fails."""
    if not samples:
        return {}
    try:
        scores = scorer.score_batch(images, [sample.question for sample in samples])
        return dict(zip((sample.question_id for sample in samples), scores.tolist(), strict=True))
    except Exception as err:
        if len(samples) == 1:
            failed.append((samples[0].question_id, f"{type(err).__name__}: {' '.join(str(err).split())}"))
            return {}
    risks: dict[str, float] = {}
    for index in range(len(samples)):
        risks.update(_score_isolating_failures(scorer, samples[index : index + 1], images[index : index + 1], failed))
    return risks
