"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints.

Each mirrors its usual checkpoint at toy scale: LLaVA-1.5 = CLIP tower (feature layer -2, CLS
dropped) + Llama; LLaVA-NeXT = the same tower with any-resolution tiles + Mistral; LLaVA-OneVision =
SigLIP tower (last layer, no CLS) with up to 6x6 tiles and `anyres_max_9` down-sampling + Qwen2.
Tiles are 28 px with 7 px patches, so a 48-200 px image gives 16 (LLaVA-1.5) to under 200 image tokens.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILIES = ("llava", "llava_next", "llava_onevision")

LLAMA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# llava-hf/llava-1.5-7b-hf: "USER: <image>\n<question> ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n<question> [/INST]"
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML with the image first in the user turn.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _llama_tokenizer():
    """A Llama-style tokenizer: <s> prepended by the tokenizer itself, as the real one does."""
    tokenizer, _ = common.family_tokenizer(
        LLAMA_SPECIAL,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return common.prepend_bos(tokenizer, "<s>")


def _text_config(model_type: str, tokenizer, sizes: common.ToySizes) -> dict:
    config = sizes.text(
        len(tokenizer),
        model_type=model_type,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if model_type == "mistral":
        config["sliding_window"] = None  # Mistral-7B-v0.2, the LLaVA-NeXT base, has none
    return config


SIZES = common.ToySizes(vision_depth=3)
# 28 px tiles of 7 px patches: 16 patches + CLS, like 336 / 14 -> 576 + CLS.
TILE, PATCH = 28, 7


def build(path: Path, family: str = "llava", sizes: common.ToySizes = SIZES) -> Path:
    common.require_family(family, FAMILIES)
    if family == "llava_onevision":
        _build_llava_onevision(path, sizes)
    else:
        _build_clip_llava(path, family, sizes)
    return path


def _save(path: Path, model, processor, tokenizer) -> None:
    common.save_checkpoint(path, model, processor, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)


def _build_clip_llava(path: Path, family: str, sizes: common.ToySizes) -> None:
    """LLaVA-1.5 (Llama decoder) or LLaVA-NeXT (Mistral decoder, any-resolution tiles): CLIP tower read at its
    feature layer -2 with CLS dropped, Llama's tokenizer."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    size = {"size": {"shortest_edge": TILE}, "crop_size": {"height": TILE, "width": TILE}}
    if family == "llava":
        config_class, model_class, processor_class, decoder, template = (
            LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, "llama", LLAVA_TEMPLATE
        )
        tiling: dict = {}
        image_processor = CLIPImageProcessor(**size)
    else:
        config_class, model_class, processor_class, decoder, template = (
            LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, "mistral", LLAVA_NEXT_TEMPLATE
        )
        # The real pinpoints (multiples of the 336 px tile) scaled to the 28 px tile.
        tiling = {"image_grid_pinpoints": [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]}
        image_processor = LlavaNextImageProcessor(**size, **tiling)
    tokenizer = _llama_tokenizer()
    config = config_class(
        vision_config=sizes.vision(model_type="clip_vision_model", image_size=TILE, patch_size=PATCH),
        text_config=_text_config(decoder, tokenizer, sizes),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        **tiling,
        image_seq_length=(TILE // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = model_class(config)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    _save(path, model, processor, tokenizer)


def _build_llava_onevision(path: Path, sizes: common.ToySizes) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    # 28 px tiles of 7 px patches = 4x4 features per tile (the real one: 384 / 14 = 27x27), and tile
    # grids up to 6x6 as in the real pinpoints, so a large image exceeds anyres_max_9 and is down-sampled.
    pinpoints = [[TILE * rows, TILE * cols] for rows in range(1, 7) for cols in range(1, 7)]
    tokenizer, _ = common.family_tokenizer(
        QWEN_SPECIAL,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    vision = sizes.vision(model_type="siglip_vision_model", image_size=TILE, patch_size=PATCH)
    vision["vision_use_head"] = False
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config("qwen2", tokenizer, sizes),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    siglip_norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints, **siglip_norm
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}, **siglip_norm),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_TEMPLATE,
    )
    _save(path, model, processor, tokenizer)
