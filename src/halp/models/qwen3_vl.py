"""Qwen3-VL and Qwen3-VL-MoE.

As in Qwen2-VL, the projector is `visual.merger` (input: per-patch tower output before the 2x2
merge; output: one token per `<|image_pad|>`). The tower also taps some of its blocks
(`deepstack_visual_indexes`, e.g. 8/16/24) through separate `deepstack_merger_list` mergers; those
are not the projector and are never hooked as such.

Deepstack trap: in the installed transformers, `Qwen3VLTextModel.forward` adds deepstack feature i
to the hidden states at image positions *after* decoder block i returns, for the first
len(deepstack_visual_indexes) blocks. A forward hook on block i (and `output_hidden_states`, which
records block outputs) therefore sees the state *before* that addition, while block i+1 receives
the state *after* it. halp stores the state the next block receives: for those early layers it reads
the input of block i+1 (or of the final norm, when block i is the last). Text positions, the query
token included, are unaffected by deepstack, so only vision-token features differ.
"""

from __future__ import annotations

from torch import nn

from halp.models.base import Adapter, ExtractionPointError
from halp.models.qwen_vl import MERGE_GROUP_ORDER


class Qwen3VLAdapter(Adapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    projector = "model.visual.merger"
    vision_token_order = MERGE_GROUP_ORDER
    notes = (
        "image placeholder <|image_pad|> (one per merged 2x2 group of 16 px patches); vision_only = merger input; "
        "layer k < len(deepstack_visual_indexes) is stored after the deepstack addition (next block's input)"
    )

    @property
    def deepstack_layers(self) -> int:
        """How many early decoder blocks are followed by a deepstack addition at image positions."""
        vision_config = getattr(self.model.config, "vision_config", None)
        indexes = getattr(vision_config, "deepstack_visual_indexes", None)
        if indexes is None:
            raise ExtractionPointError(
                f"{type(self.model).__name__} config has no vision_config.deepstack_visual_indexes; cannot tell "
                "which decoder blocks are followed by a deepstack addition"
            )
        return len(indexes)

    def layer_state_point(self, layer: int) -> tuple[nn.Module, bool]:
        if layer >= self.deepstack_layers:
            return super().layer_state_point(layer)
        blocks = self.layer_modules()
        following = blocks[layer + 1] if layer + 1 < len(blocks) else self.final_norm_module()
        return following, True
