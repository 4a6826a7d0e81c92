"""Idefics3 and SmolVLM / SmolVLM2 (SigLIP tower, pixel-shuffle connector, Llama decoder).

The processor resizes an image, splits it into square tiles and appends a downscaled copy of the
whole image (the global thumbnail) as a last tile; each tile becomes `image_seq_len` `<image>`
tokens, framed by `<fake_token_around_image>` and a `<row_i_col_j>` or `<global-img>` tag. Images
small enough for one tile get only the global tile.

- Projector: `model.connector` (pixel shuffle + linear). Its input is the SigLIP tower's per-patch
  output of every tile (after the post-layernorm, before the shuffle), so `vision_only` averages
  over all tiles' patches, the global tile included; its output rows are exactly the `<image>`
  embeddings, in sequence order, so the per-sample split by placeholder counts holds.
- Last image token: the last `<image>` in `input_ids`, which is the last token of the GLOBAL
  thumbnail (the global tile always comes after the sub-image tiles), not of the last crop.
- Padding tiles (all-zero pixel tensors added to even out tile counts in a batch) are dropped by
  the model before the tower, so they never reach the projector.
"""

from halp.models.base import Adapter


class Idefics3Adapter(Adapter):
    model_types = ("idefics3", "smolvlm")
    projector = "model.connector"
    decoder_layers = "model.text_model.layers"
    final_norm = "model.text_model.norm"
    notes = (
        "image placeholder <image> (image_seq_len per tile: sub-image tiles, then the global thumbnail); "
        "the last image token is the global thumbnail's last <image>; vision_only = SigLIP per-patch output "
        "of all tiles (connector input, before the pixel shuffle)"
    )
    # SmolVLM's processor reads a flat image list as all images of ONE prompt; nesting one image per
    # prompt is unambiguous for both processors.
    image_list_per_prompt = True
