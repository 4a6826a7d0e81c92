"""Gemma-3 (`gemma3`).

The projector is `multi_modal_projector`: it average-pools the SigLIP tower's final output (after its
post-layernorm; 64x64 patches for 896 px) to `mm_tokens_per_image` (256) rows, RMS-normalises them
and projects them to the LM width. `vision_only` is the mean of its input (the pooled-over patches;
rows are 16 per soft token, so the default proportional split holds), `vision_projected` the mean
of its output, which is exactly what replaces the soft tokens (text embeddings are scaled by
sqrt(hidden), image features are not).

Traps:
- The image placeholder is `<image_soft_token>` (config `image_token_index`, aliased to
  `image_token_id`): the processor expands the prompt's `<start_of_image>` into
  `\\n\\n<start_of_image>` + 256 soft tokens + `<end_of_image>\\n\\n`. `<start_of_image>` and
  `<end_of_image>` stay text tokens, so the last image token is the last soft token, the one just
  before `<end_of_image>`.
- Image tokens attend to each other bidirectionally, driven by the processor's `token_type_ids`;
  `generate` passes them to the prefill only, as deployment does.
- The chat template renders `<bos>` and the tokenizer adds one too; `Adapter.encode` follows
  transformers' `apply_chat_template(tokenize=True)` and does not add a second one.
- Pan-and-scan (off by default) would add crops, each with its own soft-token block; the last image
  token is then the last crop's.
"""

from halp.models.base import Adapter


class Gemma3Adapter(Adapter):
    model_types = ("gemma3",)
    notes = (
        "image placeholder <image_soft_token> (mm_tokens_per_image per image, between <start_of_image> and "
        "<end_of_image>); vision_only = SigLIP last_hidden_state before the 4x4 average pool; bidirectional "
        "attention over image tokens via token_type_ids"
    )
    # Gemma3Processor reads a flat image list as one sample with many images.
    image_list_per_prompt = True
