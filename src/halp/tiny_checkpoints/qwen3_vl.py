"""Tiny Qwen3-VL and Qwen3-VL-MoE checkpoints, deepstack included.

The vision tower has three blocks and two deepstack taps (after vision blocks 0 and 1), so the
language model adds deepstack features at image positions after decoder blocks 0 and 1 and not
after blocks 2 and 3: both sides of the trap are exercised.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common
from halp.tiny_checkpoints.qwen_vl import CHAT_TEMPLATE, mrope_section, tokenizer_and_ids, vision_token_ids

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")

# Qwen3-VL keeps Qwen2-VL's special tokens and chat-template structure (images and text only here).

# Three vision blocks: two deepstack taps and a last block after them.
SIZES = common.ToySizes(vision_depth=3)


def build(
    path: Path,
    family: str = "qwen3_vl",
    sizes: common.ToySizes = SIZES,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1),
    min_pixels: int = 32 * 32 * 4,
    max_pixels: int = 32 * 32 * 16,
) -> Path:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    common.require_family(family, FAMILIES)
    tokenizer, ids = tokenizer_and_ids()
    # Interleaved M-RoPE; the sections are as [24, 20, 20] for head_dim 128.
    text = sizes.text(
        len(tokenizer),
        head_dim=sizes.head_dim(),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_section(sizes.head_dim()),
            "mrope_interleaved": True,
        },
        **common.chatml_token_ids(ids),
    )
    if family == "qwen3_vl_moe":
        text.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes.hidden_size, decoder_sparse_step=1
        )
    vision = {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_dim,
        "intermediate_size": sizes.vision_dim * 2,
        "num_heads": common.attention_heads(sizes.vision_dim),
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": sizes.hidden_size,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": list(deepstack_visual_indexes),
    }
    shared = {**vision_token_ids(ids), "vision_end_token_id": ids["<|vision_end|>"]}
    if family == "qwen3_vl":
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **shared))
    else:
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision, **shared))

    # Qwen3-VL uses 16 px patches merged 2x2: one <|image_pad|> per 32x32 pixels.
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(path, model, processor, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
