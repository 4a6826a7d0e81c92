"""Molmo2 (transformers-native `molmo2`: Molmo2-4B, Molmo2-8B, Molmo2-O-7B).

Traps:
- The projector `model.multi_modal_projector` (`Molmo2Adapter`) is attention pooling + MLP. Its
  input is every patch of every crop (the low-res global crop first, then the overlapping high-res
  crops, `image_num_crops` per image), as the concatenation of two ViT layers (`vit_layers`, e.g.
  [-3, -9]); its output is one row per pooled 2x2 window, i.e. per `<im_patch>`. Input rows are
  proportional to crops, output rows to tokens, and crops per image vary: the per-sample split uses
  `image_num_crops` for the input and the `<im_patch>` counts for the output. `vision_only` thus
  includes the overlap-margin patches that pooling ignores.
- Molmo2 *adds* the projected features to the `<im_patch>` embeddings (a residual), so
  hidden_states[0] at image positions is embed(<im_patch>) + projector output, not the output alone.
- The placeholder is `<im_patch>` (`config.image_patch_id`, aliased `image_token_id`); `<im_col>`,
  `<im_start>`, `<low_res_im_start>` and `<im_end>` frame the grids and are not image tokens. The
  low-res grid comes first, so the last `<im_patch>` is the last cell of the high-res grid.
- Image tokens attend to each other bidirectionally in the prefill (`mm_token_type_ids`), which
  `generate` passes on its first step as the plain forward does.
"""

from __future__ import annotations

import torch

from halp.models.base import Adapter, ExtractionPointError, Positions


class Molmo2Adapter(Adapter):
    model_types = ("molmo2",)
    notes = (
        "image placeholder <im_patch> (low-res grid, then high-res grid); vision_only = concatenated ViT layers "
        "of every crop entering the pooling adapter; features are added to the <im_patch> embeddings"
    )

    def projector_groups(self, tensor: torch.Tensor, positions: Positions, output: bool) -> list[torch.Tensor]:
        if output:
            # One pooled row per <im_patch>, images in batch order.
            return self.split_per_sample(tensor, positions.image_tokens_per_sample)
        crops = positions.inputs.get("image_num_crops")
        if crops is None:
            raise ExtractionPointError("Molmo2 inputs have no image_num_crops: cannot split the crops per sample")
        crops_per_sample = crops.reshape(-1).tolist()
        if len(crops_per_sample) != len(positions.image_tokens_per_sample):
            raise ExtractionPointError(
                f"{len(crops_per_sample)} images for {len(positions.image_tokens_per_sample)} prompts: halp "
                "extracts one image per prompt"
            )
        if tensor.dim() != 3 or tensor.shape[0] != sum(crops_per_sample):
            raise ExtractionPointError(
                f"{self.projector} input of shape {tuple(tensor.shape)} is not (crops={sum(crops_per_sample)}, "
                "patches, dim)"
            )
        return [group.reshape(-1, tensor.shape[-1]) for group in torch.split(tensor, crops_per_sample)]
