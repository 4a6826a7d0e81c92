"""Tiny Qwen2-VL and Qwen2.5-VL checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from halp.tiny_checkpoints import common

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The structure of Qwen's own template, reduced to images and text.
CHAT_TEMPLATE = common.chatml_template("<|vision_start|><|image_pad|><|vision_end|>")


def tokenizer_and_ids(corpus: Sequence[str] | None = None, vocab_size: int = 400) -> tuple[Any, dict[str, int]]:
    """The toy tokenizer with Qwen's special tokens, and their ids; `corpus`: other sentences to train it on."""
    return common.family_tokenizer(
        SPECIAL, vocab_size=vocab_size, corpus=corpus, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def mrope_section(head_dim: int) -> list[int]:
    """The decoder's M-RoPE temporal/height/width sections, which must sum to head_dim / 2."""
    return [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8]


def vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The config's ids of the image and video placeholders and of the token opening a vision block."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def build(
    path: Path,
    family: str = "qwen2_vl",
    sizes: common.ToySizes = common.TOY,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    tokenizer_corpus: Sequence[str] | None = None,
    vocab_size: int = 400,
    rope_theta: float = 1_000_000.0,
) -> Path:
    """`rope_theta`: the decoder's RoPE base (the real models' 1e6 by default). With a toy head_dim, M-RoPE's
    height and width sections get its lowest frequencies, which barely turn over a few image rows at 1e6."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    common.require_family(family, FAMILIES)
    # A caller with its own vocabulary (halp.world) passes the sentences the BPE should learn.
    tokenizer, ids = tokenizer_and_ids(tokenizer_corpus, vocab_size)
    text = sizes.text(
        len(tokenizer),
        rope_scaling={"type": "mrope", "mrope_section": mrope_section(sizes.head_dim())},
        rope_theta=rope_theta,
        **common.chatml_token_ids(ids),
    )
    shared = {**vision_token_ids(ids), "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    vision_heads = common.attention_heads(sizes.vision_dim)
    if family == "qwen2_vl":
        vision = {
            "depth": sizes.vision_depth,
            "embed_dim": sizes.vision_dim,
            "hidden_size": sizes.hidden_size,
            "num_heads": vision_heads,
            "mlp_ratio": 2,
        }
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **shared)
        model = Qwen2VLForConditionalGeneration(config)
        processor_class = Qwen2VLProcessor
    else:
        # Window attention in every block but the last, as in the real model (full attention every 8th).
        vision = {
            "depth": sizes.vision_depth,
            "hidden_size": sizes.vision_dim,
            "intermediate_size": sizes.vision_dim * 2,
            "num_heads": vision_heads,
            "out_hidden_size": sizes.hidden_size,
            "window_size": 56,
            "fullatt_block_indexes": [sizes.vision_depth - 1],
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **shared)
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor_class = Qwen2_5_VLProcessor
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(path, model, processor, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
