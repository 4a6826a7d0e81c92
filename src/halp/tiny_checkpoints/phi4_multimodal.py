"""Tiny Phi-4-multimodal checkpoint (`Phi4MultimodalForCausalLM`) with a `vision-lora` PEFT adapter.

Layout as the transformers-native checkpoint: base model, processor and tokenizer at the top, the
vision LoRA (LoRA on every decoder block's qkv/o/gate_up/down projections) in `vision-lora/`.

Trap: the image processor counts the image tokens with constants of the real model (256 per crop and
16 newline rows, i.e. a 16x16 grid after the 2x2 pool), so a tiny tower must keep crop / patch = 32:
64 px crops of 2 px patches. At most 4 crops (`dynamic_hd`) plus the global crop keep it small.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "phi4_multimodal"
VISION_LORA = "vision-lora"

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>"]

# Phi-4-mini's template: string contents; images are `<|image|>` placeholders inside the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
)

# The real vision LoRA's targets: attention and MLP projections of every decoder block.
LORA_TARGETS = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = common.TOY,
    crop_size: int = 64,
    max_crops: int = 4,
    lora_rank: int = 4,
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(
        SPECIAL,
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    patch_size = crop_size // 32
    # One config holds the decoder's sizes (no text_config) next to the towers'.
    decoder = sizes.text(
        len(tokenizer),
        max_position_embeddings=8192,
        original_max_position_embeddings=8192,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Phi4MultimodalConfig(
        **decoder,
        vision_config=sizes.vision(
            image_size=crop_size,
            patch_size=patch_size,
            crop_size=crop_size,
            image_token_id=ids["<|image|>"],
        ),
        # The audio encoder is built with the model; tiny, and never run by halp.
        audio_config={
            "num_blocks": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "depthwise_separable_out_channel": 32,
            "ext_pw_out_channel": 32,
            "nemo_conv_channels": 32,
            "audio_token_id": ids["<|audio|>"],
        },
    )
    model = Phi4MultimodalForCausalLM(config)
    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(
            size={"height": crop_size, "width": crop_size}, patch_size=patch_size, dynamic_hd=max_crops
        ),
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
    )
    common.save_checkpoint(path, model, processor, eos=ids["<|end|>"], pad=ids["<|endoftext|>"])
    # Random A and B (PEFT's default B = 0 would make the adapter a no-op and its checks vacuous).
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(path / VISION_LORA)
    return path
