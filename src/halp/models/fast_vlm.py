"""FastVLM through its native transformers class (`fast_vlm`: timm FastViT-HD tower, Qwen2 decoder).

The remote-code FastVLM (a LLaVA-Qwen2 variant) puts ONE `-200` placeholder in `input_ids` and
expands it to the image features inside forward, so sequence positions there do not match
`input_ids`. The native class has the processor expand `<image>` to one token per tower output cell
before the model runs: positions come straight from `input_ids`, no remote code needed.

- Projector: `model.multi_modal_projector` (linear-GELU-linear). Its input is the tower's last
  feature map (after FastViT's final conv, before any pooling) flattened to one row per cell:
  the whole grid, nothing dropped (`vision_feature_select_strategy` is always "full").
- Image placeholder `<image>` (`config.image_token_index`, also readable as `image_token_id`);
  one per cell, a fixed count per image (the processor resizes and centre-crops every image).
"""

from halp.models.base import Adapter


class FastVlmAdapter(Adapter):
    model_types = ("fast_vlm",)
    notes = (
        "native class only (remote code expands one -200 placeholder inside forward); image placeholder <image>, "
        "one per FastViT-HD output cell; vision_only = flattened final feature map (projector input)"
    )
