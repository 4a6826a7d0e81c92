"""A tiny Qwen2-VL trained from scratch on the world, on CPU, with a plain torch loop.

The architecture and the offline tokenizer/processor are those of `halp.testing`'s Qwen2-VL builder (a
real `Qwen2VLForConditionalGeneration`, halp's BPE tokenizer, the real `Qwen2VLImageProcessor`, Qwen's chat
template). Training draws fresh scenes and questions every step from a seeded stream (so there is no fixed
training set to memorise). It starts with a grounding curriculum: for `grounding_steps` steps every example is
an easy scene with a single object and a colour or shape question about it (`attribute_colour` /
`attribute_shape`), whose answer cannot come from the words' prior; without it the model settles on each
question type's answer prior at once. Then the full mix (docs/world.md: in the default budget, the one-object
skill does not yet carry over to scenes of several objects). It feeds
`prompt + answer + <|im_end|>` exactly as halp's adapter writes the prompt, and puts only the answer
tokens (and the end token, so that greedy decoding stops) in the loss.

The result is saved with `save_pretrained` into `~/.cache/halp/world/<config hash>/checkpoint` (written in a
temporary directory, renamed when complete) and loaded back through `from_pretrained` like any checkpoint.
The config hash covers every setting that changes the weights, and halp's world version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halp.errors import ParameterError, WorldError
from halp.layout import write_text_atomic
from halp.world.questions import ANSWERS, Question, ask
from halp.world.scene import DIFFICULTIES, IMAGE_SIZE, make_scene

#: Bumped whenever the world or the training recipe changes what a config hash stands for.
WORLD_VERSION = 2
CHECKPOINT_DIR = "checkpoint"
TRAINING_FILE = "training.json"
#: Seed offsets of the independent streams (training, held-out evaluation, the study set).
TRAIN_STREAM, HELDOUT_STREAM, STUDY_STREAM, TOKENIZER_STREAM, GROUNDING_STREAM, GROUNDED_STREAM = 0, 1, 2, 3, 4, 5
#: The grounding curriculum's question types: one object, its colour or its shape.
GROUNDING_TYPES = ("attribute_colour", "attribute_shape")
#: Question types whose answer has to be read from the pixels (no answer prior gets far on them): the share of
#: them that the training mix keeps after the curriculum (`grounded_share`) is drawn from these.
GROUNDED_TYPES = ("attribute_colour", "attribute_shape", "multiple_choice")
#: The world tokenizer's vocabulary size (bytes, special tokens, merges).
VOCAB_SIZE = 600


@dataclass
class WorldModelConfig:
    """Everything that decides the trained weights."""

    hidden_size: int = 128
    num_layers: int = 4
    vision_dim: int = 64
    vision_depth: int = 2
    #: Training steps in all, the first `grounding_steps` of them on the grounding curriculum.
    steps: int = 700
    grounding_steps: int = 250
    #: After the curriculum, this share of every batch asks a question of GROUNDED_TYPES, the rest the uniform mix.
    grounded_share: float = 0.0
    batch_size: int = 48
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    difficulties: tuple[str, ...] = ("easy", "medium", "hard")
    heldout: int = 384
    seed: int = 0

    def digest(self) -> str:
        settings = {**asdict(self), "world_version": WORLD_VERSION, "image_size": IMAGE_SIZE}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainingResult:
    checkpoint: Path
    config: WorldModelConfig
    cached: bool
    seconds: float
    losses: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    heldout_accuracy: float = float("nan")
    heldout_by_type: dict[str, float] = field(default_factory=dict)
    threads: int = 0
    cpu_seconds: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "config": asdict(self.config),
            "config_hash": self.config.digest(),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "threads": self.threads,
            "losses": self.losses,
            "train_accuracy": self.train_accuracy,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_by_type": self.heldout_by_type,
        }


def default_cache_dir() -> Path:
    """`$HALP_CACHE/world`, else `~/.cache/halp/world`."""
    root = os.environ.get("HALP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "halp") / "world"


def examples(seed: int, stream: int, difficulties: tuple[str, ...]) -> Iterator[tuple[Any, Question, str]]:
    """An endless seeded stream of (image, question, difficulty): one fresh scene per example."""
    rng = np.random.default_rng([seed, stream])
    while True:
        difficulty = difficulties[int(rng.integers(len(difficulties)))]
        scene = make_scene(rng, difficulty)
        yield scene.image, ask(rng, scene), difficulty


def grounding_examples(seed: int) -> Iterator[tuple[Any, Question, str]]:
    """The grounding curriculum's stream: an easy scene with one object, and its colour or its shape asked."""
    rng = np.random.default_rng([seed, GROUNDING_STREAM])
    while True:
        scene = make_scene(rng, "easy", objects=1)
        question_type = GROUNDING_TYPES[int(rng.integers(len(GROUNDING_TYPES)))]
        yield scene.image, ask(rng, scene, question_type), "easy"


def grounded_examples(seed: int, difficulties: tuple[str, ...]) -> Iterator[tuple[Any, Question, str]]:
    """Scenes of every difficulty with a question of GROUNDED_TYPES (the first, in a random order, that fits)."""
    rng = np.random.default_rng([seed, GROUNDED_STREAM])
    while True:
        difficulty = difficulties[int(rng.integers(len(difficulties)))]
        scene = make_scene(rng, difficulty)
        for index in rng.permutation(len(GROUNDED_TYPES)):
            try:
                question = ask(rng, scene, GROUNDED_TYPES[int(index)])
            except ValueError:  # no object with a unique colour or shape: try the next type, else a new scene
                continue
            yield scene.image, question, difficulty
            break


def training_batches(config: WorldModelConfig) -> Iterator[list[tuple[Any, Question, str]]]:
    """The training batches: `grounding_steps` of the grounding curriculum, then the mix of `difficulties`, of
    which the first round(grounded_share * batch_size) examples of every batch ask a question of GROUNDED_TYPES."""
    grounding = grounding_examples(config.seed)
    grounded = grounded_examples(config.seed, config.difficulties)
    mix = examples(config.seed, TRAIN_STREAM, config.difficulties)
    kept = round(config.grounded_share * config.batch_size)
    for step in range(config.steps):
        if step < config.grounding_steps:
            yield [next(grounding) for _ in range(config.batch_size)]
        else:
            yield [next(grounded) for _ in range(kept)] + [next(mix) for _ in range(config.batch_size - kept)]


def tokenizer_corpus(size: int = 600) -> list[str]:
    """Sentences the world's BPE is trained on: the chat roles, every answer word and sample questions.

    Fixed (seed 0, independent of the model seed), so that every world model shares one tokenizer.
    """
    stream = examples(0, TOKENIZER_STREAM, tuple(DIFFICULTIES))
    lines = ["user\nassistant\n" * 4, " ".join(ANSWERS)]
    for _ in range(size):
        _, question, _ = next(stream)
        lines.append(f"{question.question} {question.answer}")
    return lines


class Encoder:
    """Batches of `prompt + answer + end` with the answer tokens marked, as halp's adapter prompts."""

    def __init__(self, model: Any, processor: Any) -> None:
        from halp.models import adapter_for

        self.adapter = adapter_for(model, processor)
        self.processor = processor
        self.tokenizer = self.adapter.tokenizer()
        self.end = self.tokenizer.eos_token

    def __call__(self, images: list[Any], questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        texts = [self.adapter.prompt(q) + a + self.end for q, a in zip(questions, answers, strict=True)]
        inputs = dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))
        targets = torch.full_like(inputs["input_ids"], -100)
        for row, answer in enumerate(answers):
            answer_ids = self.tokenizer(answer + self.end, add_special_tokens=False)["input_ids"]
            tail = inputs["input_ids"][row, -len(answer_ids) :].tolist()
            if tail != answer_ids:
                # Tokens merged across the prompt/answer boundary: the answer would not be what is scored.
                raise WorldError(
                    f"answer {answer!r} does not tokenize the same after the prompt: {tail} != {answer_ids}"
                )
            targets[row, -len(answer_ids) :] = torch.tensor(answer_ids)
        inputs["targets"] = targets
        return inputs


def answer_loss(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over answer tokens, per-row exact match under teacher forcing).

    A row matches when the argmax at every answer position is the answer token, which is exactly when greedy
    decoding would produce the answer and stop, so the match rate is the greedy accuracy.
    """
    targets = inputs["targets"]
    model_inputs = {key: value for key, value in inputs.items() if key != "targets"}
    logits = model(**model_inputs).logits[:, :-1]
    shifted = targets[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100
    )
    scored = shifted != -100
    hits = (logits.argmax(-1) == shifted) | ~scored
    return loss, hits.all(dim=1)


def _schedule(step: int, config: WorldModelConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def heldout_set(config: WorldModelConfig, size: int) -> list[tuple[Any, Question, str]]:
    stream = examples(config.seed, HELDOUT_STREAM, config.difficulties)
    return [next(stream) for _ in range(size)]


@torch.no_grad()
def evaluate(model: Any, encoder: Encoder, items: list[tuple[Any, Question, str]], batch_size: int = 32) -> np.ndarray:
    """Per-item greedy correctness (teacher-forced exact match, see `answer_loss`)."""
    model.eval()
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = encoder([i for i, _, _ in chunk], [q.question for _, q, _ in chunk], [q.answer for _, q, _ in chunk])
        correct.append(answer_loss(model, inputs)[1].numpy())
    return np.concatenate(correct) if correct else np.zeros(0, dtype=bool)


def train(
    config: WorldModelConfig,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Train (or reuse the cached) world model; return where its checkpoint is and how training went."""
    say = say or (lambda message: None)
    unknown = [d for d in config.difficulties if d not in DIFFICULTIES]
    if unknown:
        raise WorldError(f"unknown difficulty {', '.join(unknown)}; choose from {', '.join(DIFFICULTIES)}")
    if not 0 <= config.grounded_share <= 1:
        raise ParameterError("grounded_share", f"is a share of the batch, between 0 and 1, not {config.grounded_share}")
    if not 0 <= config.grounding_steps <= config.steps:
        steps, asked = config.steps, config.grounding_steps
        raise ParameterError("grounding_steps", f"must be between 0 and steps ({steps}), not {asked}")
    home = (cache_dir or default_cache_dir()) / config.digest()
    checkpoint = home / CHECKPOINT_DIR
    record = home / TRAINING_FILE
    if checkpoint.is_dir() and record.is_file():
        saved = json.loads(record.read_text())
        say(f"using the cached world model {checkpoint}")
        return TrainingResult(
            checkpoint,
            config,
            True,
            saved["seconds"],
            saved["losses"],
            saved["train_accuracy"],
            saved["heldout_accuracy"],
            saved["heldout_by_type"],
            saved["threads"],
            saved["cpu_seconds"],
        )
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from halp.testing import build_checkpoint

    home.mkdir(parents=True, exist_ok=True)
    staging = home / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        # The builder's random initialisation, saved and loaded back: the real loading path from step 0.
        build_checkpoint(
            "qwen2_vl",
            staging,
            seed=config.seed,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            vision_dim=config.vision_dim,
            vision_depth=config.vision_depth,
            min_pixels=IMAGE_SIZE * IMAGE_SIZE,
            max_pixels=IMAGE_SIZE * IMAGE_SIZE,
            tokenizer_corpus=tokenizer_corpus(),
            vocab_size=VOCAB_SIZE,
        )
        processor = AutoProcessor.from_pretrained(staging)
        model = AutoModelForImageTextToText.from_pretrained(staging, dtype=torch.float32)
        encoder = Encoder(model, processor)
        torch.manual_seed(config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, config))
        batches = training_batches(config)
        losses: list[float] = []
        accuracy: list[float] = []
        bar = tqdm(
            batches, total=config.steps, desc="training the world model", disable=not progress, dynamic_ncols=True
        )
        smooth_loss, smooth_acc = float("nan"), float("nan")
        for step, batch in enumerate(bar):
            model.train()
            inputs = encoder(
                [i for i, _, _ in batch], [q.question for _, q, _ in batch], [q.answer for _, q, _ in batch]
            )
            loss, hits = answer_loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            accuracy.append(float(hits.float().mean()))
            smooth_loss = losses[-1] if step == 0 else 0.95 * smooth_loss + 0.05 * losses[-1]
            smooth_acc = accuracy[-1] if step == 0 else 0.95 * smooth_acc + 0.05 * accuracy[-1]
            bar.set_postfix(loss=f"{smooth_loss:.3f}", acc=f"{smooth_acc:.2f}")
        bar.close()
        heldout = heldout_set(config, config.heldout)
        correct = evaluate(model, encoder, heldout)
        by_type: dict[str, list[bool]] = {}
        for (_, question, _), hit in zip(heldout, correct, strict=True):
            by_type.setdefault(question.question_type, []).append(bool(hit))
        seconds = time.perf_counter() - started
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        result = TrainingResult(
            checkpoint,
            config,
            False,
            seconds,
            losses,
            accuracy,
            float(correct.mean()) if len(correct) else float("nan"),
            {kind: float(np.mean(hits)) for kind, hits in sorted(by_type.items())},
            torch.get_num_threads(),
            time.process_time() - cpu_started,
        )
        shutil.rmtree(checkpoint, ignore_errors=True)
        os.replace(staging, checkpoint)
        write_text_atomic(record, json.dumps(result.as_dict(), indent=2))
        say(
            f"trained {checkpoint} in {seconds:.0f}s ({result.cpu_seconds:.0f} CPU-s) on {result.threads} thread(s): "
            f"held-out greedy accuracy "
            f"{result.heldout_accuracy:.3f}"
        )
        return result
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(staging, ignore_errors=True)
