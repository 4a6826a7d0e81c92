"""Llama-3.2-Vision (`mllama`): the image reaches the decoder through cross-attention blocks only.

- Image placeholder: ONE `<|image|>` token per image; its embedding is NOT replaced by image
  features (it stays a text embedding), so it is a position, not a carrier: the "vision token" is
  the decoder state at `<|image|>`, and `vision_token_mean` over one token equals it. Text after
  `<|image|>` reads the image through the cross-attention blocks (the processor's
  `cross_attention_mask`); text before it never sees the image.
- Layers: `model.language_model.layers` interleaves self-attention and cross-attention blocks
  (11B: 40 blocks, cross-attention at 3, 8, ..., 38; 90B: 100 blocks, every 5th from 3); the
  cross-attention blocks are decoder blocks and count in the layer index, as in `hidden_states`.
- Projector: `model.multi_modal_projector`, one Linear from the tower's output (global encoder
  output concatenated with selected local-encoder layers, per tile, CLS included) to the
  cross-attention states. The image processor always pads an image to `max_num_tiles` tiles with
  all-zero tiles that the cross-attention mask hides; `vision_only`/`vision_projected` average over
  the image's REAL tiles only (`aspect_ratio_mask`), every patch and the CLS of each tile.
"""

from __future__ import annotations

import torch

from halp.models.base import Adapter, ExtractionPointError, Positions


class MllamaAdapter(Adapter):
    model_types = ("mllama",)
    notes = (
        "one <|image|> token per image, read through cross-attention (its embedding is not replaced); "
        "cross-attention blocks count in the layer index; vision_only = tower output over the real tiles "
        "(CLS included, padding tiles excluded)"
    )
    # MllamaProcessor reads a flat image list as all images of ONE prompt.
    image_list_per_prompt = True

    def projector_groups(self, tensor: torch.Tensor, positions: Positions, output: bool) -> list[torch.Tensor]:
        # The projector sees (batch, images, max_num_tiles, patches + CLS, dim) for input and output
        # alike; each image's real tiles come first, the zero padding tiles after them.
        tile_mask = positions.inputs.get("aspect_ratio_mask")
        batch = len(positions.image_tokens_per_sample)
        if tile_mask is None or tuple(tile_mask.shape[:2]) != (batch, 1):
            raise ExtractionPointError(
                "mllama needs aspect_ratio_mask of shape (batch, 1 image, tiles) to tell real tiles from padding; "
                f"got {None if tile_mask is None else tuple(tile_mask.shape)}"
            )
        if tensor.dim() != 5 or tuple(tensor.shape[:3]) != tuple(tile_mask.shape):
            raise ExtractionPointError(
                f"{self.projector}: expected (batch, 1 image, {tile_mask.shape[-1]} tiles, patches, dim), "
                f"got {tuple(tensor.shape)}"
            )
        real_tiles = tile_mask[:, 0].sum(dim=-1).tolist()
        return [tensor[row, 0, :tiles].reshape(-1, tensor.shape[-1]) for row, tiles in enumerate(real_tiles)]
