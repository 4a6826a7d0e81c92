"""What decides a world model: its config, the seeded example streams it learns and is evaluated on, its tokenizer's
sentences, and the names of what training writes.

`halp.world.model` trains from this, `halp.world.shipped` checks shipped weights against it; neither is needed to
read it. A config's hash (`WorldModelConfig.digest`) covers every setting that changes the weights, and halp's world
version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from halp.world.questions import ANSWERS, Question, ask
from halp.world.scene import DIFFICULTIES, IMAGE_SIZE, Scene, make_scene

#: Bumped whenever the world or the training recipe changes what a config hash stands for.
WORLD_VERSION = 3
CHECKPOINT_DIR = "checkpoint"
TRAINING_FILE = "training.json"
#: Seed offsets of the independent streams (training, held-out evaluation, the study set, ...).
TRAIN_STREAM, HELDOUT_STREAM, STUDY_STREAM, TOKENIZER_STREAM, GROUNDING_STREAM, GROUNDED_STREAM = 0, 1, 2, 3, 4, 5
VISION_STREAM = 6
#: The grounding curriculum's question types: one object, its colour or its shape.
GROUNDING_TYPES = ("attribute_colour", "attribute_shape")
#: Question types whose answer has to be read from the pixels (no answer prior gets far on them): the share of
#: them that the training mix keeps after the curriculum (`grounded_share`) is drawn from these.
GROUNDED_TYPES = ("attribute_colour", "attribute_shape", "multiple_choice")
#: The world tokenizer's vocabulary size (bytes, special tokens, merges).
VOCAB_SIZE = 600


@dataclass
class WorldModelConfig:
    """Everything that decides the trained weights. The defaults are the recipe whose weights halp ships.

    That recipe takes 20 minutes on 2 quiet CPU cores, an hour under load (docs/benchmarks.md), so `train` uses
    the shipped weights for it (`halp.world.shipped`); any other config trains from scratch, once, into the cache.
    """

    hidden_size: int = 128
    num_layers: int = 4
    vision_dim: int = 128
    vision_depth: int = 3
    #: The decoder's RoPE base (see `halp.tiny_checkpoints.qwen_vl.build`).
    rope_theta: float = 1_000_000.0
    #: The vision pretraining stage (`pretrain_vision`): steps, scenes per step, learning rate. 0 steps: none.
    #: A tower that has not learnt to see shapes caps the VLM near 0.4 held-out accuracy (docs/world.md).
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_learning_rate: float = 3e-3
    #: After a vision stage, keep the tower's patch embedding and blocks fixed while the VLM trains (the merger and
    #: the decoder learn). Without one, the whole model learns.
    freeze_vision: bool = True
    #: Training steps in all, the first `grounding_steps` of them on the grounding curriculum.
    steps: int = 2500
    grounding_steps: int = 100
    #: After the curriculum, this share of every batch asks a question of GROUNDED_TYPES, the rest the uniform mix.
    grounded_share: float = 0.3
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


def vision_batches(config: WorldModelConfig) -> Iterator[list[Scene]]:
    """The vision pretraining stage's batches: `vision_batch_size` fresh scenes of `difficulties` per step."""
    rng = np.random.default_rng([config.seed, VISION_STREAM])
    while True:
        yield [
            make_scene(rng, config.difficulties[int(rng.integers(len(config.difficulties)))])
            for _ in range(config.vision_batch_size)
        ]


def heldout_set(config: WorldModelConfig, size: int) -> list[tuple[Any, Question, str]]:
    stream = examples(config.seed, HELDOUT_STREAM, config.difficulties)
    return [next(stream) for _ in range(size)]
