"""Tiny Qwen2-VL and Qwen2.5-VL checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from halp.testing.checkpoints import train_tokenizer

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
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(
    path: Path,
    family: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 4,
    vision_dim: int = 32,
    vision_depth: int = 2,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    tokenizer_corpus: Sequence[str] | None = None,
    vocab_size: int = 400,
) -> Path:
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

    # A caller with its own vocabulary (halp.world) passes the sentences the BPE should learn.
    tokenizer = train_tokenizer(
        SPECIAL, vocab_size=vocab_size, corpus=tokenizer_corpus, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    heads = max(2, hidden_size // 16)
    head_dim = hidden_size // heads
    # temporal/height/width rotary sections; they must sum to head_dim / 2
    mrope_section = [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_heads = max(2, vision_dim // 16)
    if family == "qwen2_vl":
        vision = {
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": hidden_size,
            "num_heads": vision_heads,
            "mlp_ratio": 2,
        }
        config = Qwen2VLConfig(text_config=text_config, vision_config=vision, **common)
        model = Qwen2VLForConditionalGeneration(config)
        processor_class = Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        # Window attention in every block but the last, as in the real model (full attention every 8th).
        vision = {
            "depth": vision_depth,
            "hidden_size": vision_dim,
            "intermediate_size": vision_dim * 2,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
        }
        config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, **common)
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor_class = Qwen2_5_VLProcessor
    else:
        raise ValueError(f"unknown Qwen-VL family {family!r}")

    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
