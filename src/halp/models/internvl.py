"""InternVL (transformers-native `-hf` checkpoints: InternVL2.5/3/3.5-*-hf).

The projector is `model.multi_modal_projector` (LayerNorm + 2-layer MLP). Its input is not the
vision tower's output as such: the tower's `vision_feature_layer` (-1 for InternVL3) without CLS,
pixel-shuffled 2x2 (0.5 downsample), so each input row concatenates four neighbouring patches.
`vision_only` is the mean of those rows, which is the 4-way concatenation of patch means.
Each image is tiled dynamically (up to `max_patches` 448 px tiles plus a thumbnail), every tile
yields `image_seq_length` `<IMG_CONTEXT>` tokens between `<img>` and `</img>`, so projector rows
are proportional to placeholder tokens and the default per-image split holds. The last image
token is the thumbnail's last `<IMG_CONTEXT>` (the thumbnail tile comes last when there are
several tiles), never `</img>`.

Original (remote-code) InternVL checkpoints have `model_type` `internvl_chat` and another module
layout; they are not served here.
"""

from halp.models.base import Adapter


class InternVLAdapter(Adapter):
    model_types = ("internvl",)
    notes = (
        "image placeholder <IMG_CONTEXT> (image_seq_length per tile, tiles + thumbnail); vision_only = "
        "pixel-shuffled tower features (CLS dropped) entering the MLP projector"
    )
