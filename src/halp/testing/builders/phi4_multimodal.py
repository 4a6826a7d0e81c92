"""Tiny Phi-4-multimodal checkpoint (`Phi4MultimodalForCausalLM`) with a `vision-lora` PEFT adapter.

Layout as the transformers-native checkpoint: base model, processor and tokenizer at the top, the
vision LoRA (LoRA on every decoder block's qkv/o/gate_up/down projections) in `vision-lora/`.

Trap: the image processor counts the image tokens with constants of the real model (256 per crop and
16 newline rows, i.e. a 16x16 grid after the 2x2 pool), so a tiny tower must keep crop / patch = 32:
64 px crops of 2 px patches. At most 4 crops (`dynamic_hd`) plus the global crop keep it small.
"""

from __future__ import annotations

from pathlib import Path

from halp.testing.checkpoints import train_tokenizer

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
    hidden_size: int = 64,
    num_layers: int = 4,
    vision_dim: int = 32,
    vision_depth: int = 2,
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

    if family != FAMILY:
        raise ValueError(f"this builder makes {FAMILY!r}, not {family!r}")
    tokenizer = train_tokenizer(
        SPECIAL,
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    patch_size = crop_size // 32
    heads = max(2, hidden_size // 16)
    config = Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=8192,
        original_max_position_embeddings=8192,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_config={
            "hidden_size": vision_dim,
            "intermediate_size": vision_dim * 2,
            "num_hidden_layers": vision_depth,
            "num_attention_heads": max(2, vision_dim // 16),
            "image_size": crop_size,
            "patch_size": patch_size,
            "crop_size": crop_size,
            "image_token_id": ids["<|image|>"],
        },
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
    model.generation_config.eos_token_id = ids["<|end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    # Random A and B (PEFT's default B = 0 would make the adapter a no-op and its checks vacuous).
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(path / VISION_LORA)
    return path
