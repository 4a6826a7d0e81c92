"""What every tiny-checkpoint builder shares: the toy decoder and tower sizes, the tokenizer, the save steps.

A builder module states only what is specific to its family (special tokens, chat template, config
class, processor, weight fixes); the sizes that make a checkpoint tiny and the steps that turn it
into a `save_pretrained` directory are here, so all fixtures scale and save alike.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
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


#: Position table of every toy decoder: long enough for the largest test prompt with its image tokens.
MAX_POSITIONS = 4096


def require_family(family: str, families: Collection[str]) -> None:
    """Refuse a family the builder does not make (the registry routes by family, a direct call may not)."""
    if family not in families:
        raise ValueError(f"this builder makes {', '.join(map(repr, families))}, not {family!r}")


def attention_heads(width: int) -> int:
    """Heads of a toy attention layer: one per 16 channels, at least 2 (so GQA and head splits are exercised)."""
    return max(2, width // 16)


def family_tokenizer(special_tokens: Sequence[str], **fast_kwargs: Any) -> tuple[Any, dict[str, int]]:
    """The toy BPE with the family's special tokens, and each special token's id."""
    tokenizer = train_tokenizer(special_tokens, **fast_kwargs)
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens}


def prepend_bos(tokenizer: Any, bos: str) -> Any:
    """Make the tokenizer put `bos` before every text itself, as Llama's and Gemma's real tokenizers do."""
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tokenizer


@dataclass(frozen=True)
class ToySizes:
    """The sizes that make a checkpoint tiny: the decoder's width and blocks, the vision tower's width and blocks.

    A builder's `sizes` parameter defaults to these or to its family's own (more decoder blocks for Mllama's
    cross-attention pattern, a third vision block for deepstack taps); `build_checkpoint(family, path, **sizes)`
    overrides any of them by name.
    """

    hidden_size: int = 64
    num_layers: int = 4
    vision_dim: int = 32
    vision_depth: int = 2

    def text(self, vocab_size: int, **specific: Any) -> dict[str, Any]:
        """The toy decoder: MLP twice as wide as the residual stream, GQA with half as many KV heads.

        `specific` adds or overrides keys (model_type, head_dim, token ids, rope settings, ...).
        """
        heads = attention_heads(self.hidden_size)
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.hidden_size * 2,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": MAX_POSITIONS,
            **specific,
        }

    def vision(self, **specific: Any) -> dict[str, Any]:
        """The toy ViT tower (keys as in the CLIP/SigLIP-style configs); `specific` adds image and patch sizes."""
        return {
            "hidden_size": self.vision_dim,
            "intermediate_size": self.vision_dim * 2,
            "num_hidden_layers": self.vision_depth,
            "num_attention_heads": attention_heads(self.vision_dim),
            **specific,
        }

    def head_dim(self) -> int:
        """The decoder's per-head width."""
        return self.hidden_size // attention_heads(self.hidden_size)


#: The sizes of every family that states no others.
TOY = ToySizes()


def chatml_template(image_markup: str, default_system: str | None = None) -> str:
    """A ChatML chat template (Qwen, InternVL, FastVLM) reduced to images and text.

    `image_markup` is what an image part renders to; with `default_system`, a conversation that does
    not open with a system turn gets that one, as the real templates do.
    """
    system = (
        f"{{% if messages[0]['role'] != 'system' %}}<|im_start|>system\n{default_system}<|im_end|>\n{{% endif %}}"
        if default_system is not None
        else ""
    )
    return (
        f"{system}{{% for message in messages %}}<|im_start|>{{{{ message['role'] }}}}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image_markup}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def chatml_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The decoder's BOS/EOS/pad ids in ChatML families (Qwen, InternVL, FastVLM).

    `<|endoftext|>` is BOS and padding, `<|im_end|>` ends a turn.
    """
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def save_checkpoint(
    path: Path, model: Any, processor: Any, *, eos: int | list[int], pad: int, bos: int | None = None
) -> Path:
    """Set the generation config's stop/pad(/bos) ids as the real checkpoint does and save model and processor."""
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    if bos is not None:
        model.generation_config.bos_token_id = bos
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
