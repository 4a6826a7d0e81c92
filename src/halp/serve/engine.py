"""The one place `halp serve` runs the model: a batch of requests -> one prefill with halp's hooks -> risk from the
probe -> greedy decoding from the same KV cache, only for the rows that need it.

The prefill is `generate` with one new token and the capture armed (halp.capture: the same hooks and positions as
`halp extract`); its features give each row's risk through the run's probe (halp.predict.RiskScorer), so the risk
of a request is `halp predict`'s. Rows that decode no further (abstained by the policy, /v1/risk items, an end of
turn or a max_tokens of 1 at the first token, a failed row) are dropped from the KV cache
(`Cache.batch_select_indices`) and from what the model keeps of the batch (`Adapter.select_rows`), and a second
`generate` goes on greedily for the rest from that cache: the answers are plain greedy `generate`'s (tested for
every family with a tiny fixture). Each row stops at its own max_tokens or end of turn (`RowDecoding`).

Per-row input rules are halp.extract's (special tokens in a question); failures are isolated as in `halp extract`:
if a batch fails, its rows are retried one by one, so only the guilty request fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from halp.capture import FeatureExtractor, Positions, PrefillCapture
from halp.errors import ServeError, ServeRequestError
from halp.extract import special_token_message, special_tokens_of
from halp.predict import RiskScorer, choose_probe, run_attributes
from halp.serve.policy import Policy, ThresholdChoice, threshold_for_coverage
from halp.serve.settings import ServeSettings

log = logging.getLogger(__name__)

#: max_tokens of a request that gives none, where the run decoded nothing (`halp extract --no-generate`).
FALLBACK_MAX_TOKENS = 32

#: A job's events for a streaming client, called from the engine's thread: ("scored", Outcome), ("text", delta).
EventSink = Callable[[str, Any], None]


@dataclass
class Outcome:
    """What one row got: its risk and decision, and for a chat request the answer."""

    risk: float
    flagged: bool
    #: answered, flagged or abstained (halp.serve.policy.DECISIONS); "scored" for a /v1/risk item.
    decision: str
    prompt_tokens: int
    answer: str = ""
    #: "stop" (end of turn, or the refusal), "length" (max_tokens reached); None for a /v1/risk item.
    finish_reason: str | None = None
    completion_tokens: int = 0
    #: Decode steps not run because the request abstained: its max_tokens.
    decode_tokens_saved: int = 0


@dataclass
class Job:
    """One row of a batch: a chat completion (max_tokens >= 1) or a /v1/risk item (max_tokens 0)."""

    image: Image.Image
    question: str
    max_tokens: int
    #: Streaming: the engine reports the score before any token, then the answer's text as it grows.
    on_event: EventSink | None = None
    outcome: Outcome | None = None
    error: ServeRequestError | None = None
    #: Something was reported to the client already, so the row cannot be run again after a batch failure.
    emitted: bool = False
    _sent: str = field(default="", repr=False)

    def emit(self, kind: str, value: Any) -> None:
        if self.on_event is not None:
            self.emitted = True
            self.on_event(kind, value)

    def stream_text(self, text: str, final: bool = False) -> None:
        """Send what `text` (the answer so far) adds to what was sent; an incomplete character waits for more."""
        if self.on_event is None or (not final and text.endswith("\ufffd")) or not text.startswith(self._sent):
            return
        delta, self._sent = text[len(self._sent) :], text
        if delta:
            self.emit("text", delta)


@dataclass
class BatchStats:
    rows: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: Rows decoded past the first token, and the decoding steps run for them.
    decoded_rows: int = 0
    decode_steps: int = 0


class RowDecoding(StoppingCriteria):
    """Per-row bookkeeping while `generate` goes on (a transformers stopping criterion, so it sees every new token):
    each row's tokens, its own max_tokens and end of turn, and its streaming. A finished row is padded by generate
    from then on, and its later tokens are not its answer."""

    def __init__(self, limits: Sequence[int], eos: frozenset[int], on_tokens: Sequence[Callable | None]) -> None:
        self.limits = list(limits)
        self.eos = eos
        self.on_tokens = list(on_tokens)
        self.tokens: list[list[int]] = [[] for _ in self.limits]
        self.finished = [limit == 0 for limit in self.limits]
        self.ended_by_eos = [False] * len(self.limits)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.finished[row]:
                continue
            self.tokens[row].append(token)
            if token in self.eos:
                self.finished[row] = self.ended_by_eos[row] = True
            elif len(self.tokens[row]) >= self.limits[row]:
                self.finished[row] = True
            callback = self.on_tokens[row]
            if callback is not None:
                callback(self.tokens[row])
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The run's model, the served probe and the policy; `run_batch` is called from one thread at a time."""

    def __init__(self, scorer: RiskScorer, policy: Policy, default_max_tokens: int, run_dir: Path,
                 choice: ThresholdChoice | None = None) -> None:  # fmt: skip
        self.scorer = scorer
        self.extractor: FeatureExtractor = scorer.extractor
        self.adapter = self.extractor.adapter
        self.model = self.adapter.model
        self.policy = policy
        self.default_max_tokens = default_max_tokens
        self.run_dir = run_dir
        self.choice = choice or ThresholdChoice(policy.threshold, "the probe's saved threshold")
        self.specials = frozenset(special_tokens_of(self.extractor))
        eos = self.model.generation_config.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._static = {
            "run": run_dir.name,
            "feature": scorer.feature,
            "probe": scorer.probe_name,
            "adapter": type(self.adapter).__name__,
            "device": str(self.extractor.input_device()),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        }

    @classmethod
    def load(cls, settings: ServeSettings) -> Engine:
        """Choose the probe and threshold (before the model loads, so a wrong option costs nothing), then load."""
        settings.validate()
        run_dir = Path(settings.run_dir)
        feature, probe = choose_probe(run_dir, settings.feature, settings.probe)
        choice = None
        if settings.target_coverage is not None:
            choice = threshold_for_coverage(run_dir, feature, probe, settings.target_coverage)
        elif settings.threshold is not None:
            choice = ThresholdChoice(settings.threshold, "--threshold")
        attrs = run_attributes(run_dir)
        scorer = RiskScorer.from_run(
            run_dir, feature, probe, settings.device, settings.dtype,
            threshold=choice.threshold if choice else None, model=settings.model,
            trust_remote_code=settings.trust_remote_code,
        )  # fmt: skip
        run_answer_length = int(attrs.get("max_new_tokens", 0) or 0)
        default = settings.limits.default_max_tokens or min(run_answer_length or FALLBACK_MAX_TOKENS,
                                                            settings.limits.max_tokens)  # fmt: skip
        policy = Policy(settings.policy, scorer.threshold, settings.refusal)
        engine = cls(scorer, policy, default, run_dir, choice)
        if policy.mode == "abstain" and settings.max_batch > 1 and not engine.adapter.resumes_row_subsets:
            raise ServeError(
                f"--policy abstain with --max-batch {settings.max_batch}: {type(engine.adapter).__name__} is not "
                "verified to go on decoding a subset of a batch's rows, so abstained rows could not skip their "
                "decoding; use --max-batch 1 (or --policy annotate)"
            )
        return engine

    def describe(self) -> dict[str, Any]:
        """What is served: run, probe, threshold and policy, where the model runs."""
        return {
            **self._static,
            "threshold": self.policy.threshold,
            "threshold_source": self.choice.source,
            "policy": self.policy.mode,
            "default_max_tokens": self.default_max_tokens,
        }

    @property
    def exif_orientation(self) -> bool:
        return self.scorer.exif_orientation

    def check_question(self, question: str, param: str = "messages") -> None:
        """A question holding one of the model's special tokens would change the prompt's shape: refused."""
        message = special_token_message(question, self.specials)
        if message:
            raise ServeRequestError(message, 400, param, "special_token_in_question")

    # ----- one batch --------------------------------------------------------------------------------------------

    def run_batch(self, jobs: list[Job]) -> list[BatchStats]:
        """Score (and answer) every job, setting its outcome or its error; a failing batch is retried row by row."""
        try:
            return [self._run(jobs)]
        except Exception as err:  # any failure of a batch: isolate the guilty row, as `halp extract` does
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                jobs[0].outcome, jobs[0].error = None, _row_error(err)
                return []
            log.warning("a batch of %d failed (%s: %s); retrying its rows one by one", len(jobs),
                        type(err).__name__, err)  # fmt: skip
            stats = []
            for job in jobs:
                if job.error is None and job.outcome is not None and job.outcome.decision in ("abstained", "scored"):
                    continue  # finished at the prefill, before the failure
                if job.emitted:  # its client has its score already: it cannot be run again
                    job.outcome, job.error = None, _row_error(err)
                    continue
                job.outcome = job.error = None
                stats += self.run_batch([job])
            return stats

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> BatchStats:
        stats = BatchStats(rows=len(jobs))
        inputs = self._encode(jobs)
        positions = self.extractor.locate(inputs)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        answering = any(job.max_tokens > 0 for job in jobs)
        inputs = self.extractor.device_inputs(inputs)
        start = time.perf_counter()
        prefill, features = run_prefill(self.extractor, inputs, positions, keep_cache=answering)
        stats.prefill_seconds = time.perf_counter() - start

        values = features[self.scorer.feature]
        finite = np.isfinite(values).all(axis=1)
        risks = np.full(len(jobs), np.nan)
        if finite.any():
            risks[finite] = self.scorer.risks({self.scorer.feature: values[finite]})
        first_tokens = prefill.sequences[:, -1].tolist()
        answers: dict[int, list[int]] = {}
        going_on: list[int] = []
        for row, job in enumerate(jobs):
            if not finite[row]:
                job.error = ServeRequestError(
                    f"the prefill gave non-finite features for {self.scorer.feature} (dtype "
                    f"{self.describe()['dtype']}); check the model and input", 500, None, "non_finite_features",
                    "server_error",
                )  # fmt: skip
                continue
            risk = float(risks[row])
            flagged = self.policy.flagged(risk)
            if job.max_tokens == 0:
                job.outcome = Outcome(risk, flagged, "scored", int(prompt_tokens[row]))
                continue
            decision = self.policy.decision(risk)
            job.outcome = outcome = Outcome(risk, flagged, decision, int(prompt_tokens[row]))
            if decision == "abstained":
                outcome.answer, outcome.finish_reason = self.policy.refusal, "stop"
                outcome.decode_tokens_saved = job.max_tokens
                job.emit("scored", outcome)
                job.stream_text(outcome.answer, final=True)
                continue
            job.emit("scored", outcome)
            answers[row] = [first_tokens[row]]
            self._stream(job, answers[row])
            if first_tokens[row] not in self.eos and job.max_tokens > 1:
                going_on.append(row)

        if going_on:
            start = time.perf_counter()
            limits = [jobs[row].max_tokens - 1 for row in going_on]
            callbacks = [self._token_callback(jobs[row], first_tokens[row]) for row in going_on]
            tracker = decode_rows(self.extractor, prefill, inputs, going_on, limits, self.eos, callbacks)
            stats.decode_seconds = time.perf_counter() - start
            stats.decoded_rows, stats.decode_steps = len(going_on), tracker.steps
            for position, row in enumerate(going_on):
                answers[row] += tracker.tokens[position]
        for row, tokens in answers.items():
            job = jobs[row]
            assert job.outcome is not None
            job.outcome.answer = self.extractor.decode([tokens])[0]
            job.outcome.completion_tokens = len(tokens)
            ended = tokens[-1] in self.eos
            job.outcome.finish_reason = "stop" if ended else "length"
            job.stream_text(job.outcome.answer, final=True)
        return stats

    def _encode(self, jobs: list[Job]) -> dict[str, Any]:
        try:
            return self.adapter.encode([job.image for job in jobs], [job.question for job in jobs])
        except Exception as err:  # the processor refusing an input (an extreme aspect ratio, say) is that input's
            raise ServeRequestError(f"the model's processor cannot take this input: {_one_line(err)}", 400,
                                    "messages", "invalid_input") from err  # fmt: skip

    def _stream(self, job: Job, tokens: list[int]) -> None:
        if job.on_event is not None:
            job.stream_text(self.extractor.decode([tokens])[0])

    def _token_callback(self, job: Job, first: int) -> Callable[[list[int]], None] | None:
        if job.on_event is None:
            return None
        return lambda tokens: self._stream(job, [first, *tokens])


def run_prefill(
    extractor: FeatureExtractor, inputs: dict[str, Any], positions: Positions, keep_cache: bool
) -> tuple[Any, dict[str, np.ndarray]]:
    """One prefill pass with halp's capture armed, as `halp extract`'s: `generate` with one new token. Returns its
    output (`sequences` ends with each row's first answer token; its KV cache when `keep_cache`) and the features.
    `inputs` are on the model's device (`FeatureExtractor.device_inputs`)."""
    with PrefillCapture(extractor.adapter, extractor.layers) as capture:
        capture.arm(positions)
        prefill = extractor.model.generate(
            **inputs, max_new_tokens=1, use_cache=keep_cache, return_dict_in_generate=True,
            **extractor.greedy_settings(),
        )  # fmt: skip
        return prefill, extractor.captured_features(capture)


def decode_rows(
    extractor: FeatureExtractor,
    prefill: Any,
    inputs: dict[str, Any],
    rows: list[int],
    limits: Sequence[int],
    eos: frozenset[int],
    on_tokens: Sequence[Callable | None] | None = None,
) -> RowDecoding:
    """Greedy decoding of the batch rows `rows` from the prefill's KV cache, row i for at most `limits[i]` tokens
    after the prefill's first one (or to its end of turn). The other rows leave the cache and the batch, where the
    family is verified to allow it (`Adapter.resumes_row_subsets`); elsewhere they stay, finished, and are padded.
    Returns the bookkeeping, whose `tokens[i]` are row `rows[i]`'s new tokens."""
    adapter, model = extractor.adapter, extractor.model
    sequences = prefill.sequences
    cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
    batch, prompt_length = inputs["input_ids"].shape
    # Inputs with one value per row and prompt position (attention mask, token types, Mllama's cross-attention mask)
    # go on with the sequence, extended by the family's own rule for a new token; the image inputs are in the cache
    # already and are not given again.
    carried = {
        name: value for name, value in inputs.items()
        if name != "input_ids" and isinstance(value, torch.Tensor) and value.dim() >= 2
        and tuple(value.shape[:2]) == (batch, prompt_length)
    }  # fmt: skip
    carried = model._update_model_kwargs_for_generation({}, carried, is_encoder_decoder=False)
    kept = list(range(batch))
    if len(rows) < batch and adapter.resumes_row_subsets:
        index = torch.tensor(rows)  # on the host: it indexes tensors on any device (a model split over GPUs too)
        cache.batch_select_indices(index)
        adapter.select_rows(index)
        carried = {name: value[index] for name, value in carried.items()}
        sequences = sequences[index]
        kept = list(rows)
    row_limit = dict(zip(rows, limits, strict=True))
    row_callback = dict(zip(rows, on_tokens or [None] * len(rows), strict=True))
    tracker = RowDecoding([row_limit.get(row, 0) for row in kept], eos, [row_callback.get(row) for row in kept])
    model.generate(
        input_ids=sequences, **carried, **{_cache_argument(prefill): cache}, max_new_tokens=max(limits),
        stopping_criteria=StoppingCriteriaList([tracker]), **extractor.greedy_settings(),
    )  # fmt: skip
    if kept != list(rows):  # every row stayed in the batch: keep the bookkeeping of those that went on
        wanted = {row: position for position, row in enumerate(kept)}
        tracker.tokens = [tracker.tokens[wanted[row]] for row in rows]
        tracker.ended_by_eos = [tracker.ended_by_eos[wanted[row]] for row in rows]
    return tracker


def _cache_argument(prefill: Any) -> str:
    """The name `generate` takes the cache by: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if hasattr(prefill, "cache") else "past_key_values"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _row_error(err: Exception) -> ServeRequestError:
    """The error one request gets when its row fails alone."""
    if isinstance(err, ServeRequestError):
        return err
    if isinstance(err, torch.OutOfMemoryError):
        return ServeRequestError("this request does not fit in the device's memory even alone", 503, None,
                                 "out_of_memory", "server_error")  # fmt: skip
    return ServeRequestError(f"the model failed on this request: {type(err).__name__}: {_one_line(err)}", 500, None,
                             "model_error", "server_error")  # fmt: skip
