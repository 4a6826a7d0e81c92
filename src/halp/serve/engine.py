"""The one place `halp serve` runs the model: a batch of requests -> one prefill with halp's hooks -> risk from the
probe -> greedy decoding from the same KV cache, only for the rows that need it.

`prefill_and_decode` is `halp extract`'s call: one `generate` with the capture armed for its prefill (halp.capture:
the same hooks and positions), greedy. A stopping criterion (`RowDecoding`) is called once the prefill has produced
every row's first token: there the features give each row's risk through the run's probe (halp.predict.RiskScorer,
so a request's risk is `halp predict`'s) and the policy decides which rows decode no further (abstained, /v1/risk
items, a failed row). When none does, decoding goes on in the same call, each row stopping at its own max_tokens or
end of turn: plain greedy `generate` with hooks. When some do, the call ends there and the others go on from its
KV cache in a second `generate` (`decode_rows`), the leaving rows dropped from the cache
(`Cache.batch_select_indices`) and from what the model keeps of the batch (`Adapter.select_rows`): their decoding
never runs. Both paths give plain greedy `generate`'s answers (tested for every family with a tiny fixture).

Per-row input rules are halp.inputs' (special tokens in a question); failures are isolated as in `halp extract`:
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
from halp.inputs import special_token_message, special_tokens_of
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
    #: Rows in the batch of the decoding steps after the prefill, and the steps run.
    decoded_rows: int = 0
    decode_steps: int = 0


#: After the prefill, given each row's first token: the rows that decode no further.
Decide = Callable[[list[int]], set[int]]


class RowDecoding(StoppingCriteria):
    """Per-row bookkeeping while `generate` runs (a transformers stopping criterion, called after every new token):
    each row's tokens, its own limit and end of turn, its streaming. A finished row is padded by generate from then
    on, and its later tokens are not its answer.

    With `decide`, its first call (the prefill has just produced each row's first token) asks which rows decode no
    further; with `split`, the call then ends for every row, so that the others go on without them (`decode_rows`);
    without it they are marked finished and the others go on in the same call."""

    def __init__(
        self,
        limits: Sequence[int],
        eos: frozenset[int],
        on_tokens: Sequence[Callable | None] | None = None,
        decide: Decide | None = None,
        split: bool = False,
    ) -> None:
        self.limits = list(limits)
        self.eos = eos
        self.on_tokens = list(on_tokens or [None] * len(self.limits))
        self.decide = decide
        self.split = split
        self.tokens: list[list[int]] = [[] for _ in self.limits]
        self.finished = [limit == 0 for limit in self.limits]
        self.leaving: set[int] = set()
        self.first_tokens: list[int] = []
        #: When the first call came (the end of the prefill), and how many calls there were.
        self.prefill_done = 0.0
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        tokens = input_ids[:, -1].tolist()
        if self.steps == 1:
            self.prefill_done = time.perf_counter()
            self.first_tokens = tokens
            if self.decide is not None:
                self.leaving = self.decide(tokens)
                if self.leaving and self.split:
                    return torch.ones(len(tokens), dtype=torch.bool, device=input_ids.device)
                for row in self.leaving:
                    self.finished[row] = True
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            self.tokens[row].append(token)
            if token in self.eos or len(self.tokens[row]) >= self.limits[row]:
                self.finished[row] = True
            callback = self.on_tokens[row]
            if callback is not None:
                callback(self.tokens[row])
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


@dataclass
class Decoded:
    """What `prefill_and_decode` gives: each row's answer tokens (its first token and its end of turn included; none
    for a row that decoded nothing), the prefill's features, and where the time went."""

    tokens: list[list[int]]
    features: dict[str, np.ndarray]
    #: Rows left after the prefill and a second `generate` went on for the others from its cache.
    split: bool = False
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: Rows in the batch of the decoding steps after the prefill (finished rows padded there included), and steps.
    decoded_rows: int = 0
    decode_steps: int = 0


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
        inputs = self._encode(jobs)
        positions = self.extractor.locate(inputs)
        prompt_tokens = [int(count) for count in inputs["attention_mask"].sum(dim=1).tolist()]
        inputs = self.extractor.device_inputs(inputs)

        def score(features: dict[str, np.ndarray], first_tokens: list[int]) -> set[int]:
            """Risks and decisions, before any decoding step: the rows that decode no further."""
            return self._score(jobs, features, prompt_tokens, first_tokens)

        callbacks = [self._token_callback(job) for job in jobs]
        decoded = prefill_and_decode(self.extractor, inputs, positions, [job.max_tokens for job in jobs], self.eos,
                                     score, callbacks)  # fmt: skip
        for row, job in enumerate(jobs):
            outcome = job.outcome
            if job.error is not None or outcome is None or outcome.decision in ("abstained", "scored"):
                continue
            tokens = decoded.tokens[row]
            outcome.answer = self.extractor.decode([tokens])[0]
            outcome.completion_tokens = len(tokens)
            outcome.finish_reason = "stop" if tokens and tokens[-1] in self.eos else "length"
            job.stream_text(outcome.answer, final=True)
        return BatchStats(len(jobs), decoded.prefill_seconds, decoded.decode_seconds, decoded.decoded_rows,
                          decoded.decode_steps)  # fmt: skip

    def _score(
        self, jobs: list[Job], features: dict[str, np.ndarray], prompt_tokens: list[int], first_tokens: list[int]
    ) -> set[int]:
        """Each row's risk and decision from the prefill's features; the scored event and first token of a stream.
        Returns the rows that decode no further (abstained, risk-only, failed)."""
        values = features[self.scorer.feature]
        finite = np.isfinite(values).all(axis=1)
        risks = np.full(len(jobs), np.nan)
        if finite.any():
            risks[finite] = self.scorer.risks({self.scorer.feature: values[finite]})
        leaving = set()
        for row, job in enumerate(jobs):
            if not finite[row]:
                job.error = ServeRequestError(
                    f"the prefill gave non-finite features for {self.scorer.feature} (dtype {self._static['dtype']}); "
                    "check the model and input", 500, None, "non_finite_features", "server_error",
                )  # fmt: skip
                leaving.add(row)
                continue
            risk = float(risks[row])
            flagged = self.policy.flagged(risk)
            if job.max_tokens == 0:
                job.outcome = Outcome(risk, flagged, "scored", prompt_tokens[row])
                leaving.add(row)
                continue
            decision = self.policy.decision(risk)
            job.outcome = outcome = Outcome(risk, flagged, decision, prompt_tokens[row])
            if decision == "abstained":
                # Complete before it is emitted: the first streamed event is built from it in another thread.
                outcome.decode_tokens_saved = job.max_tokens
            job.emit("scored", outcome)
            if decision == "abstained":
                outcome.answer, outcome.finish_reason = self.policy.refusal, "stop"
                job.stream_text(outcome.answer, final=True)
                leaving.add(row)
            else:
                self._stream(job, [first_tokens[row]])
        return leaving

    def _encode(self, jobs: list[Job]) -> dict[str, Any]:
        try:
            return self.adapter.encode([job.image for job in jobs], [job.question for job in jobs])
        except Exception as err:  # the processor refusing an input (an extreme aspect ratio, say) is that input's
            raise ServeRequestError(f"the model's processor cannot take this input: {_one_line(err)}", 400,
                                    "messages", "invalid_input") from err  # fmt: skip

    def _stream(self, job: Job, tokens: list[int]) -> None:
        if job.on_event is not None:
            job.stream_text(self.extractor.decode([tokens])[0])

    def _token_callback(self, job: Job) -> Callable[[list[int]], None] | None:
        """Streams the answer as it grows (its tokens so far, the first included)."""
        if job.on_event is None:
            return None
        return lambda tokens: self._stream(job, tokens)


def run_prefill(
    extractor: FeatureExtractor, inputs: dict[str, Any], positions: Positions, keep_cache: bool
) -> tuple[Any, dict[str, np.ndarray]]:
    """One prefill pass with halp's capture armed, as `halp extract --no-generate`: `generate` with one new token.
    Returns its output (`sequences` ends with each row's first token; its KV cache when `keep_cache`) and the
    features. `inputs` are on the model's device (`FeatureExtractor.device_inputs`)."""
    with PrefillCapture(extractor.adapter, extractor.layers) as capture:
        capture.arm(positions)
        prefill = extractor.model.generate(
            **inputs, max_new_tokens=1, use_cache=keep_cache, return_dict_in_generate=True,
            **extractor.greedy_settings(),
        )  # fmt: skip
        return prefill, extractor.captured_features(capture)


def prefill_and_decode(
    extractor: FeatureExtractor,
    inputs: dict[str, Any],
    positions: Positions,
    limits: Sequence[int],
    eos: frozenset[int],
    decide: Callable[[dict[str, np.ndarray], list[int]], set[int]],
    on_tokens: Sequence[Callable | None] | None = None,
) -> Decoded:
    """One prefill with the capture armed, then greedy decoding of each row for at most `limits[row]` tokens (0: the
    row decodes nothing). Right after the prefill, `decide(features, first_tokens)` names the rows that decode no
    further; where the family allows (`Adapter.resumes_row_subsets`) they leave and the others go on from the
    prefill's cache (`decode_rows`), elsewhere they stay, finished and padded. `on_tokens[row]` gets a row's tokens
    as they grow. `inputs` are on the model's device (`FeatureExtractor.device_inputs`)."""
    start = time.perf_counter()
    if max(limits) == 0:  # nothing to decode: the prefill alone, as `halp predict`'s
        prefill, features = run_prefill(extractor, inputs, positions, keep_cache=False)
        decide(features, prefill.sequences[:, -1].tolist())
        return Decoded([[] for _ in limits], features, prefill_seconds=time.perf_counter() - start)
    resumes = extractor.adapter.resumes_row_subsets
    with PrefillCapture(extractor.adapter, extractor.layers) as capture:
        capture.arm(positions)
        found: dict[str, dict[str, np.ndarray]] = {}

        def after_prefill(first_tokens: list[int]) -> set[int]:
            found["features"] = extractor.captured_features(capture)
            return decide(found["features"], first_tokens)

        tracker = RowDecoding(limits, eos, on_tokens, after_prefill, split=resumes)
        output = extractor.model.generate(
            **inputs, max_new_tokens=max(limits), return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([tracker]), **extractor.greedy_settings(),
        )  # fmt: skip
    decoded = Decoded(tracker.tokens, found["features"], prefill_seconds=tracker.prefill_done - start)
    if not (tracker.leaving and resumes):  # one call: every row stayed in the batch of the decoding steps
        decoded.decode_steps = tracker.steps - 1
        decoded.decoded_rows = len(limits) if decoded.decode_steps else 0
        decoded.decode_seconds = time.perf_counter() - tracker.prefill_done
        return decoded
    # Rows left after the prefill: the others go on from its cache, without them.
    first = tracker.first_tokens
    decoded.split = True
    decoded.tokens = [[] if row in tracker.leaving else [first[row]] for row in range(len(limits))]
    going = [row for row, limit in enumerate(limits)
             if row not in tracker.leaving and limit > 1 and first[row] not in eos]  # fmt: skip
    if going:
        callbacks = on_tokens or [None] * len(limits)
        rest = decode_rows(
            extractor, output, inputs, going, [limits[row] - 1 for row in going], eos,
            [None if callbacks[row] is None else _after(first[row], callbacks[row]) for row in going],
        )  # fmt: skip
        for position, row in enumerate(going):
            decoded.tokens[row] += rest.tokens[position]
        decoded.decoded_rows, decoded.decode_steps = len(going), rest.steps
    decoded.decode_seconds = time.perf_counter() - tracker.prefill_done
    return decoded


def _after(first: int, callback: Callable[[list[int]], None]) -> Callable[[list[int]], None]:
    """A row's streaming callback for tokens decoded after its first one."""
    return lambda tokens: callback([first, *tokens])


def decode_rows(
    extractor: FeatureExtractor,
    prefill: Any,
    inputs: dict[str, Any],
    rows: list[int],
    limits: Sequence[int],
    eos: frozenset[int],
    on_tokens: Sequence[Callable | None] | None = None,
) -> RowDecoding:
    """Greedy decoding of the batch rows `rows` from the prefill's KV cache (`prefill`: a `generate` output with its
    cache, after one new token), row i for at most `limits[i]` tokens after that one (or to its end of turn). The
    other rows leave the cache and the batch (the family must allow it: `Adapter.resumes_row_subsets`). Returns the
    bookkeeping, whose `tokens[i]` are row `rows[i]`'s new tokens."""
    adapter, model = extractor.adapter, extractor.model
    if len(rows) < prefill.sequences.shape[0] and not adapter.resumes_row_subsets:
        raise ServeError(f"{type(adapter).__name__} is not verified to go on decoding a subset of a batch's rows")
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
    if len(rows) < batch:
        index = torch.tensor(rows)  # on the host: it indexes tensors on any device (a model split over GPUs too)
        cache.batch_select_indices(index)
        adapter.select_rows(index)
        carried = {name: value[index] for name, value in carried.items()}
        sequences = sequences[index]
    tracker = RowDecoding(limits, eos, on_tokens)
    model.generate(
        input_ids=sequences, **carried, **{_cache_argument(prefill): cache}, max_new_tokens=max(limits),
        stopping_criteria=StoppingCriteriaList([tracker]), **extractor.greedy_settings(),
    )  # fmt: skip
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
