"""The threshold a service flags or abstains at, and what a request's risk decides.

`--target-coverage C` reads the run's out-of-fold scores of the served probe (probes/predictions.csv) and takes the
threshold whose risk-coverage point keeps the largest fraction of answers not above C (`halp.report.risk_coverage`,
the curve of the report's deployment section); the error rate among those kept answers is what the service can
expect to answer wrongly, as far as the run's questions are like the served ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from halp.errors import ServeError
from halp.layout import PREDICTIONS_FILE, probe_file
from halp.metrics import pooled_scores, risk_coverage
from halp.results import read_predictions

#: Decisions of a chat request: answered (risk below the threshold), flagged (annotate: answered, risk at or above),
#: abstained (abstain: the refusal instead of an answer, nothing decoded).
DECISIONS = ("answered", "flagged", "abstained")


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    #: How it was chosen: "--threshold", "--target-coverage" or "the probe's saved threshold".
    source: str
    #: With --target-coverage: the out-of-fold coverage reached, the error rate among those answers, the rows.
    coverage: float | None = None
    expected_error: float | None = None
    rows: int | None = None


def threshold_for_coverage(run_dir: str | Path, feature: str, probe: str, target: float) -> ThresholdChoice:
    """The threshold keeping the largest out-of-fold coverage not above `target` for the probe of `feature`."""
    path = probe_file(Path(run_dir), PREDICTIONS_FILE)
    if not path.is_file():
        raise ServeError(f"--target-coverage needs the out-of-fold scores in {path}; run `halp probe {run_dir}`")
    labels, scores = pooled_scores(read_predictions(path), feature, probe)
    if len(labels) == 0:
        raise ServeError(f"{path} has no out-of-fold scores of {feature} ({probe}); run `halp probe {run_dir}`")
    found = risk_coverage(labels, scores).threshold_at_coverage(target)
    if found is None:
        raise ServeError(
            f"--target-coverage {target}: the lowest-risk tie of the out-of-fold scores is already more than that; "
            "choose a larger coverage or a --threshold"
        )
    threshold, coverage, accuracy = found
    return ThresholdChoice(threshold, "--target-coverage", coverage, 1.0 - accuracy, len(labels))


@dataclass(frozen=True)
class Policy:
    """annotate: every request is answered and its risk reported; abstain: at or above the threshold, the refusal."""

    mode: str
    threshold: float
    refusal: str

    def flagged(self, risk: float) -> bool:
        return risk >= self.threshold

    def decision(self, risk: float) -> str:
        if not self.flagged(risk):
            return "answered"
        return "abstained" if self.mode == "abstain" else "flagged"
