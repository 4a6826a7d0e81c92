"""A tiny Qwen2-VL trained from scratch on the world, on CPU, with a plain torch loop.

The architecture and the offline tokenizer/processor are those of `halp.tiny_checkpoints`' Qwen2-VL builder (a
real `Qwen2VLForConditionalGeneration`, halp's BPE tokenizer, the real `Qwen2VLImageProcessor`, Qwen's chat
template). Training draws fresh scenes and questions every step from seeded streams (so there is no fixed
training set to memorise), in three stages:

1. `pretrain_vision`: the vision tower alone learns what each merged token's square shows
   (`Scene.token_targets`), as real VLMs start from a pretrained encoder; then its patch embedding and blocks
   stay fixed (`freeze_vision`).
2. A grounding curriculum: for `grounding_steps` steps every example is an easy scene with a single object
   and a colour or shape question about it, whose answer cannot come from the words' prior; without it the
   model settles on each question type's answer prior at once.
3. The full mix, a `grounded_share` of every batch kept on the colour, shape and multiple-choice types.

The batches are drawn and encoded in a DataLoader worker process (`TrainingStream`). The VLM stages feed
`prompt + answer + <|im_end|>` exactly as halp's adapter writes the prompt, and put only the answer tokens (and
the end token, so that greedy decoding stops) in the loss.

The result is saved with `save_pretrained` into `~/.cache/halp/world/<config hash>/checkpoint` (written in a
temporary directory, renamed when complete) and loaded back through `from_pretrained` like any checkpoint.
The config hash covers every setting that changes the weights, and halp's world version. The default recipe's
weights ship with halp (`halp.world.shipped`) and are used, checked against their manifest, instead of 20-60 minutes
of training.
"""

from __future__ import annotations

import json
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halp.errors import ParameterError, WorldError
from halp.layout import atomic_directory, write_text_atomic
from halp.world.recipe import (
    CHECKPOINT_DIR,
    GROUNDED_TYPES,
    GROUNDING_TYPES,
    STUDY_STREAM,
    TRAINING_FILE,
    VOCAB_SIZE,
    WORLD_VERSION,
    WorldModelConfig,
    grounding_examples,
    heldout_set,
    tokenizer_corpus,
    training_batches,
    vision_batches,
)
from halp.world.scene import DIFFICULTIES, IMAGE_SIZE, TARGET_GROUPS, TOKEN_TARGETS
from halp.world.scoring import Encoder, answer_loss, evaluate
from halp.world.shipped import shipped_home, shipped_record

# The world model's recipe (halp.world.recipe) and scoring (halp.world.scoring) are part of this module's interface:
# `from halp.world.model import WorldModelConfig, heldout_set, ...` keeps working.
__all__ = [
    "CHECKPOINT_DIR",
    "GROUNDED_TYPES",
    "GROUNDING_TYPES",
    "STUDY_STREAM",
    "TRAINING_FILE",
    "VOCAB_SIZE",
    "WORLD_VERSION",
    "Encoder",
    "EndWithTrainer",
    "TrainingResult",
    "TrainingStream",
    "WorldModelConfig",
    "answer_loss",
    "default_cache_dir",
    "evaluate",
    "freeze_vision_tower",
    "grounding_examples",
    "heldout_set",
    "pretrain_vision",
    "tokenizer_corpus",
    "train",
    "training_batches",
    "vision_batches",
    "vision_tower",
]

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
    vision_losses: list[float] = field(default_factory=list)
    vision_scores: dict[str, float] = field(default_factory=dict)
    #: The weights came with halp (`halp.world.shipped`); `seconds`, `threads` are those of their training.
    shipped: bool = False

    @classmethod
    def from_record(cls, checkpoint: Path, config: WorldModelConfig, saved: dict[str, Any], shipped: bool = False):
        """A model trained before, from the `training.json` its training wrote."""
        return cls(
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
            saved["vision_losses"],
            saved["vision_scores"],
            shipped,
        )

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
            "vision_losses": self.vision_losses,
            "vision_scores": self.vision_scores,
            "shipped": self.shipped,
        }


def default_cache_dir() -> Path:
    """`$HALP_CACHE/world`, else `~/.cache/halp/world`."""
    root = os.environ.get("HALP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "halp") / "world"


class TrainingStream(torch.utils.data.IterableDataset):
    """Every training batch, encoded: `vision_steps + 1` scene batches (the last one scores the vision stage),
    then `steps` question batches.

    Iterated in a `torch.utils.data.DataLoader` worker, drawing scenes and running the processor overlap the
    model's steps; the worker builds its processor from the checkpoint directory. One worker keeps the order.
    """

    def __init__(self, config: WorldModelConfig, checkpoint: Path, model_type: str) -> None:
        self.config, self.checkpoint, self.model_type = config, checkpoint, model_type

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from transformers import AutoProcessor

        encoder = Encoder(AutoProcessor.from_pretrained(self.checkpoint), self.model_type)
        if self.config.vision_steps:
            scenes = vision_batches(self.config)
            for _ in range(self.config.vision_steps + 1):
                yield encoder.scene_batch(next(scenes))
        for batch in training_batches(self.config):
            yield encoder.batch(batch)


class EndWithTrainer:
    """The DataLoader's `worker_init_fn`: the worker ends as soon as the training process does, however it ends
    (SIGTERM, SIGKILL, a crash). A forkserver worker's parent is the fork server, not the trainer, so torch's own
    check of the parent never fires: without this the worker, and the fork server and resource tracker that wait
    for it, outlive a killed training. The trainer is watched through a pidfd (Linux), else polled."""

    def __init__(self, trainer: int) -> None:
        self.trainer = trainer

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=self._watch, name="halp-trainer-watch", daemon=True).start()

    def _watch(self) -> None:
        try:
            handle = os.pidfd_open(self.trainer)
        except ProcessLookupError:  # already gone
            os._exit(0)
        except (AttributeError, OSError):  # no pidfd here: poll
            while True:
                try:
                    os.kill(self.trainer, 0)
                except ProcessLookupError:
                    os._exit(0)
                except PermissionError:
                    pass
                time.sleep(0.5)
        select.select([handle], [], [])  # readable once the trainer has exited
        os._exit(0)


def vision_tower(model: Any) -> torch.nn.Module:
    """The vision tower: the module that holds the projector (Qwen2-VL: `model.visual`, the merger inside)."""
    from halp.models import adapter_class_for
    from halp.models.base import get_submodule

    return get_submodule(model, adapter_class_for(model.config.model_type).projector.rsplit(".", 1)[0])


def _schedule(step: int, config: WorldModelConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain_vision(
    model: Any, batches: Iterator[dict[str, torch.Tensor]], config: WorldModelConfig, progress: bool = True
) -> tuple[list[float], dict[str, float]]:
    """Pretrain the vision tower alone on exact per-token labels; return (losses, held-out token scores).

    Real VLMs start from a pretrained vision encoder (CLIP, SigLIP) and LLaVA keeps it frozen; none can be
    downloaded here, so the tower (patch embedding, blocks and merger) learns `Scene.token_targets` (which
    colours and shapes each merged token's square shows, and whether an object's centre lies there) through a
    linear head that is then thrown away: binary cross-entropy, AdamW, `vision_steps` batches of
    `Encoder.scene_batch` from `batches`. The scores, on the next batch: the precision and recall of those bits
    at a logit threshold of 0, the loss, and `blind_loss`, that of the best predictor that ignores the pixels
    (each bit at its rate in that batch): the tower reads the scenes where `loss` is below it; and per group of
    bits (`scene.TARGET_GROUPS`: colour, shape, centre), `ap_<group>`, the mean average precision of its bits
    (chance: the bits' rates), which tells what the tower has learnt to see and what not yet.
    """
    from tqdm.auto import tqdm

    tower = vision_tower(model)
    # The merger's output is one decoder embedding per merged token.
    head = torch.nn.Linear(model.config.text_config.hidden_size, TOKEN_TARGETS)
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.vision_learning_rate, weight_decay=config.weight_decay)

    def logits_and_targets(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        targets = inputs["targets"]
        if tokens.shape[0] != targets.shape[0]:
            raise WorldError(
                f"the vision tower gives {tokens.shape[0]} merged tokens for {len(inputs['image_grid_thw'])} "
                f"scenes, which have {targets.shape[0]} token targets: the tower's token grid is not the world's"
            )
        return head(tokens), targets

    tower.train()
    losses: list[float] = []
    bar = tqdm(total=config.vision_steps, desc="pretraining the vision tower", disable=not progress, dynamic_ncols=True)
    for _ in range(config.vision_steps):
        logits, targets = logits_and_targets(next(batches))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    tower.eval()
    with torch.no_grad():
        logits, targets = logits_and_targets(next(batches))
    said, truth = logits > 0, targets > 0.5
    hits = float((said & truth).sum())
    # The best a tower blind to the pixels could do on this batch: each bit at its own rate in the batch.
    rates = targets.mean(dim=0, keepdim=True).clamp(1e-6, 1 - 1e-6).expand_as(targets)
    scores = {
        "precision": hits / max(1.0, float(said.sum())),
        "recall": hits / max(1.0, float(truth.sum())),
        "loss": float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)),
        "blind_loss": float(torch.nn.functional.binary_cross_entropy(rates, targets)),
    }
    for group, columns in TARGET_GROUPS.items():
        scores[f"ap_{group}"] = _mean_average_precision(targets[:, columns].numpy(), logits[:, columns].numpy())
    return losses, scores


def _mean_average_precision(targets: np.ndarray, logits: np.ndarray) -> float:
    """The mean over columns with a positive of each column's average precision (NaN when none has one)."""
    from sklearn.metrics import average_precision_score

    values = [
        average_precision_score(targets[:, column], logits[:, column])
        for column in range(targets.shape[1])
        if targets[:, column].any()
    ]
    return float(np.mean(values)) if values else float("nan")


def freeze_vision_tower(model: Any) -> list[str]:
    """Fix the vision tower's parameters except the projector's; return the names of those fixed."""
    from halp.models import adapter_class_for
    from halp.models.base import get_submodule

    projector = get_submodule(model, adapter_class_for(model.config.model_type).projector)
    kept = {id(parameter) for parameter in projector.parameters()}
    fixed = []
    for name, parameter in vision_tower(model).named_parameters():
        if id(parameter) not in kept:
            parameter.requires_grad_(False)
            fixed.append(name)
    return fixed


def train(
    config: WorldModelConfig,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    workers: int = 1,
    shipped: bool = True,
) -> TrainingResult:
    """Train (or reuse the cached) world model; return where its checkpoint is and how training went.

    `shipped`: use the weights halp ships for this exact config when there are some (`halp.world.shipped`), before
    the cache; False trains (or reuses) a model of this machine's own.
    `workers`: data-loading processes (0: draw and encode the batches in this process; 1, the default, overlaps
    that with the model's steps; more would not keep the stream's order).
    """
    say = say or (lambda message: None)
    unknown = [d for d in config.difficulties if d not in DIFFICULTIES]
    if unknown:
        raise WorldError(f"unknown difficulty {', '.join(unknown)}; choose from {', '.join(DIFFICULTIES)}")
    if not 0 <= config.grounded_share <= 1:
        raise ParameterError("grounded_share", f"is a share of the batch, between 0 and 1, not {config.grounded_share}")
    if workers not in (0, 1):
        raise ParameterError("workers", f"is 0 or 1 (one worker keeps the stream's order), not {workers}")
    if config.vision_steps < 0:
        raise ParameterError("vision_steps", f"is a number of steps, 0 or more, not {config.vision_steps}")
    if not 0 <= config.grounding_steps <= config.steps:
        steps, asked = config.steps, config.grounding_steps
        raise ParameterError("grounding_steps", f"must be between 0 and steps ({steps}), not {asked}")
    home = (cache_dir or default_cache_dir()) / config.digest()
    checkpoint = home / CHECKPOINT_DIR
    record = home / TRAINING_FILE
    packaged = shipped_home(config) if shipped else None
    if packaged is not None:
        say(f"using the world model shipped with halp {packaged / CHECKPOINT_DIR} (config {config.digest()})")
        return TrainingResult.from_record(packaged / CHECKPOINT_DIR, config, shipped_record(packaged), shipped=True)
    if checkpoint.is_dir() and record.is_file():
        say(f"using the cached world model {checkpoint}")
        return TrainingResult.from_record(checkpoint, config, json.loads(record.read_text()))
    say(
        f"training the world model {config.digest()} from scratch (halp ships no weights for this config; "
        "the default recipe takes 20 minutes on 2 quiet CPU cores, an hour under load)"
        if shipped
        else f"training the world model {config.digest()} from scratch"
    )
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from halp.models import adapter_for
    from halp.tiny_checkpoints import build_checkpoint

    home.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # Trained in a staging folder beside the cache entry, renamed into place once saved (halp.layout).
        with atomic_directory(checkpoint, replace=True) as staging:
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
                rope_theta=config.rope_theta,
                min_pixels=IMAGE_SIZE * IMAGE_SIZE,
                max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                tokenizer_corpus=tokenizer_corpus(),
                vocab_size=VOCAB_SIZE,
            )
            processor = AutoProcessor.from_pretrained(staging)
            model = AutoModelForImageTextToText.from_pretrained(staging, dtype=torch.float32)
            adapter_for(model, processor)  # the modules and the image token resolve before any training
            encoder = Encoder(processor, model.config.model_type)
            loader = torch.utils.data.DataLoader(
                TrainingStream(config, staging, model.config.model_type),
                batch_size=None,
                num_workers=workers,
                multiprocessing_context="forkserver" if workers else None,
                prefetch_factor=4 if workers else None,
                worker_init_fn=EndWithTrainer(os.getpid()) if workers else None,
            )
            batches = iter(loader)
            torch.manual_seed(config.seed)
            vision_losses, vision_scores = (
                pretrain_vision(model, batches, config, progress) if config.vision_steps else ([], {})
            )
            if config.freeze_vision and config.vision_steps:
                freeze_vision_tower(model)
            trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, config))
            losses: list[float] = []
            accuracy: list[float] = []
            bar = tqdm(
                batches, total=config.steps, desc="training the world model", disable=not progress, dynamic_ncols=True
            )
            smooth_loss, smooth_acc = float("nan"), float("nan")
            for step, inputs in enumerate(bar):
                model.train()
                loss, hits = answer_loss(model, inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
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
                vision_losses,
                vision_scores,
            )
        write_text_atomic(record, json.dumps(result.as_dict(), indent=2))
        say(
            f"trained {checkpoint} in {seconds:.0f}s ({result.cpu_seconds:.0f} CPU-s) on {result.threads} thread(s): "
            f"held-out greedy accuracy "
            f"{result.heldout_accuracy:.3f}"
        )
        return result
    finally:
        torch.set_num_threads(previous_threads)
