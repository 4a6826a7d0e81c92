"""LLaVA-1.5 (`llava`), LLaVA-NeXT (`llava_next`) and LLaVA-OneVision (`llava_onevision`).

All three call `multi_modal_projector` (linear-GELU-linear) once per prefill on the selected vision
features, and the image placeholder is `<image>` (config `image_token_index`, aliased to
`image_token_id`), expanded by the processor to one token per feature row that enters the LM.

Traps:
- The projector input is not the vision tower's last output: the model selects
  `config.vision_feature_layer` (-2 for LLaVA-1.5 and LLaVA-NeXT, the penultimate CLIP block) and,
  with `vision_feature_select_strategy="default"`, drops CLS. OneVision takes SigLIP's last block
  (-1) with "full" (SigLIP has no CLS), i.e. `hidden_states[-1]`, which is *before* SigLIP's
  post-layernorm, so it is not `last_hidden_state` either. A hook on the projector input sees
  exactly the selected states, so `vision_only` is their mean.
- LLaVA-NeXT / OneVision ("any resolution"): the projector runs on whole tiles (a base tile of the
  resized image plus a grid of crops). Only after it are the crops stitched, unpadded to the image's
  aspect ratio, (OneVision, `anyres_max_9`) bilinearly down-sampled when larger than 9 tiles, and
  interleaved with a learned `image_newline` row per feature row. So the placeholders are neither
  the projector's rows nor proportional to them. `vision_only` / `vision_projected` are defined as
  the mean over all projector rows of the sample's tiles (base + crops, padding regions included);
  the per-sample split is by tile count, computed from `image_sizes` with transformers' own rule.
  The LM-side image states (`vision_token*`) are read at the `<image>` positions as usual; the last
  one is the newline row closing the last feature row of the crop grid.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from halp.models.base import Adapter, ExtractionPointError


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    notes = (
        "image placeholder <image> (one per patch, CLS dropped); vision_only = projector input = CLIP "
        "hidden_states[vision_feature_layer] (-2) without CLS, not the tower's last output"
    )


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    notes = (
        "image placeholder <image> (base tile + unpadded crop grid + one image_newline per row); "
        "vision_only/vision_projected = mean over all rows of the sample's tiles at the projector "
        "(before unpadding and newlines); projector input = CLIP hidden_states[-2] without CLS"
    )
    #: transformers module whose `image_size_to_num_patches` the model itself uses to count tiles.
    tiling_module: ClassVar[str] = "transformers.models.llava_next.modeling_llava_next"

    def projector_units_per_sample(
        self, inputs: dict[str, torch.Tensor], image_tokens_per_sample: list[int]
    ) -> list[int]:
        import importlib

        image_sizes = inputs.get("image_sizes")
        if image_sizes is None or len(image_sizes) != len(image_tokens_per_sample):
            raise ExtractionPointError(
                f"{type(self).__name__} needs one image_sizes row per sample to split the projector's tiles "
                f"per sample; got {None if image_sizes is None else len(image_sizes)} for "
                f"{len(image_tokens_per_sample)} samples"
            )
        count_tiles = importlib.import_module(self.tiling_module).image_size_to_num_patches
        config = self.model.config
        return [
            count_tiles(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes.tolist()
        ]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    notes = (
        "image placeholder <image> (base tile + unpadded, anyres_max_9-downsampled crop grid + newline "
        "rows); vision_only/vision_projected = mean over all rows of the sample's tiles at the projector; "
        "projector input = SigLIP hidden_states[-1] (before its post-layernorm)"
    )
    tiling_module = "transformers.models.llava_onevision.modeling_llava_onevision"
