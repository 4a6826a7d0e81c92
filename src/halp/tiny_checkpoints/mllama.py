"""Tiny Llama-3.2-Vision (`mllama`) checkpoint: tiled ViT with a global encoder, cross-attention decoder.

Tiles are 32 px with 8 px patches (16 patches + CLS per tile), at most 4 tiles per image as in the
real model. The decoder has 5 blocks, blocks 1 and 3 being cross-attention blocks (Llama-3.2-11B:
40 blocks, cross-attention at 3, 8, ..., 38).
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "mllama"

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]

# The structure of Llama-3.2-Vision-Instruct's template for image turns (no default system turn).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Parameters that transformers initialises to zero, which a trained model has learnt away from: with
# them at zero the cross-attention blocks pass text through untouched and the image never reaches
# the decoder, so no check on it could fail.
GATES = {"cross_attn_attn_gate", "cross_attn_mlp_gate", "gate", "gate_attn", "gate_ffn"}


# Five decoder blocks: self-attention blocks around the two cross-attention blocks.
SIZES = common.ToySizes(num_layers=5)


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = SIZES,
    cross_attention_layers: tuple[int, ...] = (1, 3),
    tile_size: int = 32,
    patch_size: int = 8,
) -> Path:
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(
        SPECIAL, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    intermediate_layers = [0, sizes.vision_depth - 1]
    vision_config = {
        "hidden_size": sizes.vision_dim,
        "intermediate_size": sizes.vision_dim * 2,
        "num_hidden_layers": sizes.vision_depth,
        "num_global_layers": 1,
        "attention_heads": common.attention_heads(sizes.vision_dim),
        "image_size": tile_size,
        "patch_size": patch_size,
        "max_num_tiles": 4,
        "intermediate_layers_indices": intermediate_layers,
        # The projector input: the global encoder's output concatenated with the intermediate layers.
        "vision_output_dim": sizes.vision_dim * (1 + len(intermediate_layers)),
    }
    text = sizes.text(
        len(tokenizer),
        cross_attention_layers=list(cross_attention_layers),
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    config = MllamaConfig(vision_config=vision_config, text_config=text, image_token_index=ids["<|image|>"])
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in GATES:
                parameter.uniform_(0.5, 1.5)
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": tile_size, "width": tile_size}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(path, model, processor, eos=ids["<|eot_id|>"], pad=ids["<|finetune_right_pad_id|>"])
