"""Tiny Mistral3 (Mistral-Small-3.1 layout: Pixtral tower, patch-merger projector, Mistral LM).

No dedicated halp adapter serves `mistral3`: this fixture exercises the generic fallback adapter
(`halp.models.generic`). Pixtral keeps each image's aspect ratio (longest edge 64 px here) and the
projector merges 2x2 patches of 8 px, one `[IMG]` per 16x16 px, rows closed by `[IMG_BREAK]` and the
image by `[IMG_END]` (neither is an image token). The config calls the image token `image_token_index`.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILY = "mistral3"

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]

# Mistral-Small-3.1's template reduced to user turns with an image and text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}"
)


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = common.TOY,
    vision_patch: int = 8,
    longest_edge: int = 64,
) -> Path:
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(
        SPECIAL, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    text = sizes.text(
        len(tokenizer),
        model_type="mistral",
        head_dim=sizes.head_dim(),
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    vision = sizes.vision(
        model_type="pixtral",
        head_dim=sizes.vision_dim // common.attention_heads(sizes.vision_dim),
        image_size=longest_edge,
        patch_size=vision_patch,
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = Mistral3ForConditionalGeneration(config)
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(
            size={"longest_edge": longest_edge}, patch_size={"height": vision_patch, "width": vision_patch}
        ),
        tokenizer=tokenizer,
        patch_size=vision_patch,
        spatial_merge_size=2,
        chat_template=CHAT_TEMPLATE,
    )
    return common.save_checkpoint(path, model, processor, eos=ids["</s>"], pad=ids["<pad>"], bos=ids["<s>"])
