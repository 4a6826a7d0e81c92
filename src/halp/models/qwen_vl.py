"""Qwen2-VL and Qwen2.5-VL.

The projector is `visual.merger`: its input is the vision tower's per-patch output (before the 2x2
spatial merge), its output the merged tokens that replace `<|image_pad|>` in the sequence. Qwen2.5-VL
runs its vision blocks and merger in window order; means are order-invariant and the windows never
cross images, so per-image splitting by token counts holds.
"""

from halp.models.base import Adapter


class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    projector = "model.visual.merger"
    decoder_layers = "model.language_model.layers"
    final_norm = "model.language_model.norm"
    image_token_id_attr = "image_token_id"
    notes = (
        "image placeholder <|image_pad|> (one per merged 2x2 patch group); vision_only = merger input "
        "(per patch, before the merge); 3-D M-RoPE positions built by generate from mm_token_type_ids"
    )
