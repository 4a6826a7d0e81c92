"""What `halp serve` is asked to do: the run and probe, the policy, the batching and the limits of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from halp.errors import ParameterError

POLICIES = ("annotate", "abstain")
DEFAULT_REFUSAL = (
    "I cannot answer this reliably: the predicted risk of a wrong answer is too high, so no answer was generated."
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is answered 400 (or 413 for the body) and never truncated."""

    #: The largest `max_tokens` a request may ask for.
    max_tokens: int = 512
    #: `max_tokens` of a request that gives none; None: the run's answer length (what `halp extract` decoded).
    default_max_tokens: int | None = None
    #: Bytes of a request body (a data: URL image is about 4/3 of the file).
    max_body_bytes: int = 20 * 1024 * 1024
    #: Pixels (width x height) of a request's image, checked before it is decoded.
    max_image_pixels: int = 4096 * 4096
    #: Characters of a question.
    max_question_chars: int = 8000
    #: Items of one POST /v1/risk.
    max_risk_items: int = 64

    def validate(self) -> None:
        for name in ("max_tokens", "max_body_bytes", "max_image_pixels", "max_question_chars", "max_risk_items"):
            if getattr(self, name) < 1:
                raise ParameterError(name, "must be at least 1")
        if self.default_max_tokens is not None and not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ParameterError("default_max_tokens", f"must be between 1 and max_tokens ({self.max_tokens})")


@dataclass(frozen=True)
class ServeSettings:
    run_dir: Path
    #: The probe to score with; None: the best by auroc_mean in the run's results.csv.
    feature: str | None = None
    probe: str | None = None
    #: At most one of the two; neither: the probe's saved threshold.
    threshold: float | None = None
    target_coverage: float | None = None
    policy: str = "annotate"
    #: The answer of an abstained request.
    refusal: str = DEFAULT_REFUSAL
    #: Where plain image file names of requests are looked up (confined to it); None: only data: URLs.
    images: Path | None = None
    device: str = "auto"
    #: "auto": the run's dtype, which the probe was trained on.
    dtype: str = "auto"
    #: The run's checkpoint, if it moved since extraction.
    model: str | None = None
    trust_remote_code: bool = False
    #: Rows per prefill pass, and how long the first request of a batch waits for others.
    max_batch: int = 8
    max_wait_ms: float = 5.0
    #: Requests (or /v1/risk items) waiting for a batch; one more is answered 503 with Retry-After.
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    #: The model name clients pass and /v1/models lists; None: the run directory's name.
    name: str | None = None

    @property
    def model_name(self) -> str:
        return self.name or Path(self.run_dir).resolve().name

    def validate(self) -> None:
        """Option errors surface before the model loads."""
        if self.policy not in POLICIES:
            raise ParameterError("policy", f"{self.policy!r}: choose {' or '.join(POLICIES)}")
        if self.threshold is not None and self.target_coverage is not None:
            raise ParameterError("target_coverage", "and --threshold choose the same thing: give one of them")
        if self.target_coverage is not None and not 0 < self.target_coverage <= 1:
            raise ParameterError("target_coverage", f"{self.target_coverage}: a fraction of answers kept, in (0, 1]")
        if self.max_batch < 1:
            raise ParameterError("max_batch", "must be at least 1")
        if self.max_wait_ms < 0:
            raise ParameterError("max_wait_ms", "must be 0 or more")
        if self.max_queue < 1:
            raise ParameterError("max_queue", "must be at least 1")
        if not self.refusal.strip():
            raise ParameterError("refusal", "must not be empty")
        if self.images is not None and not Path(self.images).is_dir():
            raise ParameterError("images", f"{self.images} is not a directory")
        self.limits.validate()
