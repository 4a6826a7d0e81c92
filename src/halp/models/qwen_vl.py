"""Qwen2-VL and Qwen2.5-VL.

The projector is `visual.merger`: its input is the vision tower's per-patch output (before the 2x2
spatial merge), its output the merged tokens that replace `<|image_pad|>` in the sequence. Qwen2.5-VL
runs its vision blocks and merger in window order; means are order-invariant and the windows never
cross images, so per-image splitting by token counts holds. Only the token-level rows of `halp embed`
need the window order undone (`Qwen2_5VLAdapter.restore_spatial_order`).
"""

from __future__ import annotations

import numpy as np
import torch

from halp.models.base import Adapter, ExtractionPointError

#: The order of the merger's input rows in the Qwen-VL families (Qwen2.5-VL once its window order is undone).
MERGE_GROUP_ORDER = (
    "processor patch order: row-major over 2x2 merge groups, the 4 patches of a group row-major "
    "(projected_tokens: one row per group, the LM's order)"
)


class QwenVLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    projector = "model.visual.merger"
    notes = (
        "image placeholder <|image_pad|> (one per merged 2x2 patch group); vision_only = merger input "
        "(per patch, before the merge); 3-D M-RoPE positions built by generate from mm_token_type_ids"
    )
    vision_token_order = MERGE_GROUP_ORDER


class Qwen2_5VLAdapter(QwenVLAdapter):
    """Qwen2-VL's layout; the vision tower and merger run in window order (window attention)."""

    model_types = ("qwen2_5_vl",)
    vision_token_order = MERGE_GROUP_ORDER + "; the tower's window order is undone"

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The permutation the vision tower applies to the 2x2 merge groups of one image (window order)."""
        visual = self.model.get_submodule(self.projector.rsplit(".", 1)[0])
        if hasattr(visual, "get_window_index"):  # transformers 5.0-5.x kept it as a method
            return visual.get_window_index(grid_thw)[0]
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError as err:
            raise ExtractionPointError(
                "cannot find Qwen2.5-VL's window index (neither visual.get_window_index nor "
                "transformers.vision_utils.get_vision_window_index) to undo the window order of its vision tokens"
            ) from err
        config = self.model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=config.spatial_merge_size,
            window_size=config.window_size,
            patch_size=config.patch_size,
        )
        return window_index

    def restore_spatial_order(
        self, inputs: dict[str, torch.Tensor], row: int, vision: np.ndarray, projected: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Undo the window permutation of merge groups; the merger output is permuted alike.

        The model itself un-permutes the merger output with argsort(window_index) before the LM; the
        merger's input (and the hooked output) are still in window order, whole 2x2 groups moved together.
        """
        grid = inputs.get("image_grid_thw")
        batch = inputs["input_ids"].shape[0]
        if grid is None or grid.shape[0] != batch:
            raise ExtractionPointError(
                f"Qwen2.5-VL needs one image_grid_thw row per sample to restore the spatial order; got "
                f"{None if grid is None else tuple(grid.shape)} for {batch} samples"
            )
        groups = int(grid[row].prod()) // self.model.config.vision_config.spatial_merge_size**2
        order = torch.argsort(self.window_index(grid[row : row + 1].cpu())).numpy()
        if len(order) != groups or projected.shape[0] != groups or vision.shape[0] % groups:
            raise ExtractionPointError(
                f"Qwen2.5-VL window order: {len(order)} window entries, {groups} merge groups, "
                f"{vision.shape[0]} vision rows and {projected.shape[0]} projected rows do not match"
            )
        restored = vision.reshape(groups, vision.shape[0] // groups, -1)[order].reshape(vision.shape)
        return restored, projected[order]
