"""Tiny InternVL (the transformers-native `-hf` layout: InternViT tower, pixel-shuffle MLP projector, Qwen2 LM).

Tiles are 28 px with 7 px patches: 16 patches + CLS per tile, pixel shuffle 0.5 -> 4 `<IMG_CONTEXT>`
tokens per tile. Dynamic tiling (up to 4 tiles plus a thumbnail) gives images of different sizes
different tile counts, so per-image splitting is exercised.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "internvl"

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

# InternVL3's template: a system turn, and "<IMG_CONTEXT>\n" before the text for each image part
# (the processor expands it to <img><IMG_CONTEXT>*N</img>).
CHAT_TEMPLATE = common.chatml_template("<IMG_CONTEXT>\n", default_system="You are a helpful assistant.")


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = common.TOY,
    tile_size: int = 28,
    vision_patch: int = 7,
    max_tiles: int = 4,
) -> Path:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(
        SPECIAL,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # The processor reads these names off the tokenizer, as from InternVL's tokenizer_config.json.
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    text = sizes.text(len(tokenizer), model_type="qwen2", **common.chatml_token_ids(ids))
    vision = sizes.vision(image_size=tile_size, patch_size=vision_patch)
    downsample_ratio = 0.5
    image_seq_length = int((tile_size // vision_patch) ** 2 * downsample_ratio**2)
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(path, model, processor, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
