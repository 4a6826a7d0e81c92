"""Tiny Idefics3 and SmolVLM checkpoints (SigLIP tower, pixel-shuffle connector, Llama decoder).

The image processor is configured so that every image is resized to a longest edge of 64 px and
split into 32 px tiles plus a 32 px global thumbnail; with 8 px patches and a pixel-shuffle factor of
2 each tile is 4 `<image>` tokens, so a test image becomes 12 to 20 placeholder tokens.
"""

from __future__ import annotations

from pathlib import Path

from halp.tiny_checkpoints import common

FAMILIES = ("idefics3", "smolvlm")

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
# The real tokenizers hold one added token per tile position of the (up to 6x6) split grid.
ROW_COL_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
TEXT_SPECIAL = {
    "idefics3": ["<|begin_of_text|>", "<|end_of_text|>"],
    "smolvlm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>"],
}
# Opening token of the real chat templates: Idefics3-8B-Llama3 and SmolVLM(2)-Instruct.
TEMPLATE_START = {"idefics3": "<|begin_of_text|>", "smolvlm": "<|im_start|>"}

CHAT_TEMPLATE = (
    "{start}{{% for message in messages %}}{{{{ message['role'] | capitalize }}}}"
    "{{% if message['content'] is string %}}{{{{ ': ' + message['content'] }}}}{{% else %}}"
    "{{% if message['content'][0]['type'] == 'image' %}}{{{{ ':' }}}}{{% else %}}{{{{ ': ' }}}}{{% endif %}}"
    "{{% for part in message['content'] %}}{{% if part['type'] == 'text' %}}{{{{ part['text'] }}}}"
    "{{% elif part['type'] == 'image' %}}{{{{ '<image>' }}}}{{% endif %}}{{% endfor %}}{{% endif %}}"
    "<end_of_utterance>\n{{% endfor %}}{{% if add_generation_prompt %}}{{{{ 'Assistant:' }}}}{{% endif %}}"
)


def build(
    path: Path,
    family: str = "idefics3",
    sizes: common.ToySizes = common.TOY,
    tile_size: int = 32,
    patch_size: int = 8,
    longest_edge: int = 64,
) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    common.require_family(family, FAMILIES)
    special = TEXT_SPECIAL[family] + IMAGE_TOKENS + ROW_COL_TOKENS
    pad_token = special[0]
    tokenizer, ids = common.family_tokenizer(special, eos_token="<end_of_utterance>", pad_token=pad_token)
    scale_factor = 2
    text = sizes.text(
        len(tokenizer),
        model_type="llama",
        bos_token_id=ids[special[0]],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids[pad_token],
    )
    # The tower's position table covers one tile; the processor's tile size must match it.
    vision = sizes.vision(image_size=tile_size, patch_size=patch_size)
    image_seq_len = (tile_size // patch_size) ** 2 // scale_factor**2
    image_kwargs = {"size": {"longest_edge": longest_edge}, "max_image_size": {"longest_edge": tile_size}}
    shared = {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<image>"],
        "scale_factor": scale_factor,
    }
    template = CHAT_TEMPLATE.format(start=TEMPLATE_START[family])
    if family == "idefics3":
        model = Idefics3ForConditionalGeneration(Idefics3Config(**shared))
        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    else:
        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**shared))
        processor = SmolVLMProcessor(
            image_processor=SmolVLMImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            video_processor=SmolVLMVideoProcessor(**image_kwargs),
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    return common.save_checkpoint(path, model, processor, eos=ids["<end_of_utterance>"], pad=ids[pad_token])
