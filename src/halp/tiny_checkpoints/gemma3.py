"""A tiny Gemma-3 checkpoint (SigLIP tower, average-pooling projector, Gemma-3 text decoder).

As in google/gemma-3-*-it: the tokenizer prepends `<bos>` itself *and* the chat template renders
`{{ bos_token }}`; the processor expands `<start_of_image>` in the prompt to
`\\n\\n<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image + `<end_of_image>\\n\\n`;
local (sliding-window) and global attention layers alternate; image tokens attend bidirectionally
(`token_type_ids`). Scaled down: 32 px images, 4 px patches (8x8) pooled 2x2 to 16 soft tokens.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "gemma3"

SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# The structure of Gemma-3's own template (system text folded into the first user turn, "model" role).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = common.TOY,
    image_size: int = 32,
    patch_size: int = 4,
    mm_tokens_per_image: int = 16,
    sliding_window: int = 16,
) -> Path:
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(
        SPECIAL,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Gemma's tokenizer adds <bos> itself (add_bos_token), although the template renders it too.
    common.prepend_bos(tokenizer, "<bos>")
    # Gemma-3 alternates 5 local layers with 1 global one; keep both kinds with the last one global.
    layer_types = ["sliding_attention"] * (sizes.num_layers - 1) + ["full_attention"]
    text = sizes.text(
        len(tokenizer),
        head_dim=sizes.head_dim(),
        query_pre_attn_scalar=sizes.head_dim(),
        sliding_window=sliding_window,
        layer_types=layer_types,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
    )
    vision = sizes.vision(
        model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size, vision_use_head=False
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros (it is loaded from a trained checkpoint); a zero
    # projection would make every image feature 0 and the vision checks vacuous.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=sizes.vision_dim**-0.5)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    # As the real generation config: stop at <eos> or at the end of the model turn.
    stops = [ids["<eos>"], ids["<end_of_turn>"]]
    return common.save_checkpoint(path, model, processor, eos=stops, pad=ids["<pad>"], bos=ids["<bos>"])
