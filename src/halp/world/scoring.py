"""How a world model is fed and scored: `prompt + answer + end` batches written as halp's adapter prompts
(`Encoder`), the answer tokens' loss with teacher-forced exact match (`answer_loss`), and per-item greedy
correctness (`evaluate`). Training (`halp.world.model`) and the comparison of shipped weights
(`halp.world.shipped`) share them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from halp.errors import WorldError
from halp.models import adapter_class_for
from halp.world.questions import Question
from halp.world.scene import Scene


class Encoder:
    """Batches of `prompt + answer + end` with the answer tokens marked, as halp's adapter prompts.

    Needs the processor only (the adapter's prompt is the processor's chat template), so that a data-loading
    worker process can build it from the checkpoint directory without the model.
    """

    def __init__(self, processor: Any, model_type: str) -> None:
        # Prompting reads only the processor: the adapter is made without a model for it.
        self.prompting = adapter_class_for(model_type)(None, processor)
        self.processor = processor
        self.tokenizer = self.prompting.tokenizer()
        self.end = self.tokenizer.eos_token

    def __call__(self, images: list[Any], questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        texts = [self.prompting.prompt(q) + a + self.end for q, a in zip(questions, answers, strict=True)]
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

    def batch(self, examples: list[tuple[Any, Question, str]]) -> dict[str, torch.Tensor]:
        images, questions, _ = zip(*examples, strict=True)
        return self(list(images), [q.question for q in questions], [q.answer for q in questions])

    def scene_batch(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        """The vision stage's inputs: the images' pixels and grid, and every merged token's targets."""
        inputs = dict(self.processor.image_processor(images=[scene.image for scene in scenes], return_tensors="pt"))
        inputs["targets"] = torch.from_numpy(np.concatenate([scene.token_targets() for scene in scenes]))
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


@torch.no_grad()
def evaluate(model: Any, encoder: Encoder, items: list[tuple[Any, Question, str]], batch_size: int = 32) -> np.ndarray:
    """Per-item greedy correctness (teacher-forced exact match, see `answer_loss`)."""
    model.eval()
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = encoder.batch(chunk)
        correct.append(answer_loss(model, inputs)[1].numpy())
    return np.concatenate(correct) if correct else np.zeros(0, dtype=bool)
