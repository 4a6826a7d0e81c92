"""Registry of tiny-checkpoint builders and the shared tokenizer recipe."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

#: Sentences the toy BPE is trained on: enough to tokenize VQA-like questions and answers.
CORPUS = [
    "Is there a cat in the image? Yes, there is a cat on the sofa.",
    "How many dogs are there in the picture? There are two dogs.",
    "What color is the car? The car is red.",
    "Is the forest lit by a full moonlight? No, it is dark.",
    "Describe the image. A beach with people, a boat and the blue sea.",
    "Which option is correct? A, B, C or D. The answer is B.",
    "Is the statue on water or a platform? On a platform.",
    "Are there any red squares? Is the picture bright or dark? What shape is shown?",
    "0 1 2 3 4 5 6 7 8 9 10 yes no maybe left right top bottom",
]


def train_tokenizer(
    special_tokens: Sequence[str], vocab_size: int = 400, corpus: Sequence[str] | None = None, **fast_kwargs: Any
) -> Any:
    """A byte-level BPE trained on `corpus` (default CORPUS) with the family's special tokens, as a transformers
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **fast_kwargs)


@cache
def _builders() -> dict[str, Callable[..., Path]]:
    from halp.testing import builders

    found: dict[str, Callable[..., Path]] = {}
    for info in pkgutil.iter_modules(builders.__path__):
        module = importlib.import_module(f"{builders.__name__}.{info.name}")
        for family in getattr(module, "FAMILIES", (getattr(module, "FAMILY", None),)):
            if family:
                found[family] = module.build
    return found


def available_fixtures() -> list[str]:
    """Family names (transformers model_type) that have a tiny-checkpoint builder."""
    return sorted(_builders())


def build_checkpoint(family: str, path: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """Build a tiny random checkpoint of `family` into `path` (a save_pretrained directory)."""
    import torch

    builders = _builders()
    if family not in builders:
        raise KeyError(f"no tiny-checkpoint builder for {family!r}; have {', '.join(sorted(builders))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return builders[family](path, family=family, **sizes)
