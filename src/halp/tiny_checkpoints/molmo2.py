"""Tiny Molmo2 (transformers-native): SigLIP-like ViT, attention-pooling adapter, Qwen3-like LM.

Crops are 28 px with 4 px patches (7x7 patches per crop) and 1-patch overlap margins, up to 4
high-res crops plus the low-res global crop; 2x2 attention pooling gives the `<im_patch>` tokens.
Images of different sizes get different crop counts and token grids, so the per-image split of
the projector input (by crops) and output (by tokens) is exercised.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "molmo2"

IMAGE_TOKENS = [
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS]

# Molmo2's template reduced to one image and text: the image comes first, before the first turn.
CHAT_TEMPLATE = (
    "{% set images = namespace(count=0) %}{% for message in messages %}{% if message['content'] is not string %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set images.count = images.count + 1 %}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if images.count == 1 %}<|image|>{% elif images.count > 1 %}{% for i in range(images.count) %}"
    "Image {{ i + 1 }}<|image|>{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set parts = namespace(text='') %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% set parts.text = parts.text ~ ('' if not parts.text else ' ') ~ part['text'] %}{% endif %}{% endfor %}"
    "{% set text = parts.text %}{% endif %}"
    "{% if message['role'] == 'user' %}<|im_start|>user\n{{ text }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ text }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Three ViT blocks: the adapter concatenates the last two.
SIZES = common.ToySizes(vision_depth=3)


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = SIZES,
    crop_size: int = 28,
    vision_patch: int = 4,
    max_crops: int = 4,
) -> Path:
    from transformers import (
        Molmo2Config,
        Molmo2ForConditionalGeneration,
        Molmo2ImageProcessor,
        Molmo2Processor,
        Molmo2VideoProcessor,
    )

    common.require_family(family, (FAMILY,))
    # As in Molmo2's tokenizer, <|im_end|> doubles as BOS (the processor prepends it).
    tokenizer, ids = common.family_tokenizer(
        SPECIAL, bos_token="<|im_end|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    vision_dim = sizes.vision_dim
    vision_heads = common.attention_heads(vision_dim)
    text = sizes.text(
        len(tokenizer),
        additional_vocab_size=0,
        head_dim=sizes.head_dim(),
        qk_norm_type="qwen3",
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0},
    )
    vision = sizes.vision(
        num_key_value_heads=vision_heads,
        head_dim=vision_dim // vision_heads,
        image_size=[crop_size, crop_size],
        patch_size=vision_patch,
    )
    # Two ViT layers concatenated, as Molmo2's vit_layers [-3, -9].
    adapter_config = {
        "vision_feature_layer": [-1, -2],
        "hidden_size": vision_dim,
        "num_attention_heads": vision_heads,
        "num_key_value_heads": vision_heads,
        "head_dim": vision_dim // vision_heads,
        "intermediate_size": sizes.hidden_size * 2,
        "text_hidden_size": sizes.hidden_size,
    }
    config = Molmo2Config(
        text_config=text,
        vision_config=vision,
        adapter_config=adapter_config,
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )
    model = Molmo2ForConditionalGeneration(config)
    image_processor = Molmo2ImageProcessor(
        size={"height": crop_size, "width": crop_size},
        patch_size=vision_patch,
        max_crops=max_crops,
        overlap_margins=[1, 1],
        pooling_size=[2, 2],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Molmo2VideoProcessor(size={"height": crop_size, "width": crop_size}, patch_size=vision_patch)
    processor = Molmo2Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(
        path, model, processor, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"], bos=ids["<|im_end|>"]
    )
