"""Tiny FastVLM checkpoint: the native `FastVlmForConditionalGeneration` (timm FastViT-HD tower, Qwen2 decoder).

The tower is timm's `fastvit_mci3` (FastViT-HD, the real FastVLM encoder) with one block per stage
and narrow stages; it downsamples 64x, so the 128 px centre crop becomes 2x2 = 4 `<image>` tokens.
The processor is the `LlavaProcessor` + `CLIPImageProcessor` pair the converted checkpoints ship,
which expands `<image>` to one token per output cell before the model sees the sequence.
Needs the `timm` package (the tower lives there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from halp.tiny_checkpoints import common

FAMILY = "fast_vlm"

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# Qwen2's chat template with its default system prompt; the image goes before the user's text, as
# in the FastVLM model card.
CHAT_TEMPLATE = common.chatml_template("<image>\n", default_system="You are a helpful assistant.")

# FastViT-HD downsamples by 4 in the stem and 2 in each of the four later stages.
DOWNSAMPLE = 64


def _unit_variance_init(tower: Any, crop_size: int) -> None:
    """Rescale each conv of the tower so that its output has unit spread on random pixels (LSUV-style).

    With transformers' generic init (normal, std 0.02) or timm's own, the signal shrinks at each of
    the tower's ~15 convolutions and conv biases dominate: its output is ~1e-23, or input-independent,
    and every vision check would pass vacuously. Layer by layer in forward order, zero the bias and
    divide the weight by the spread of the conv's output on a probe batch.
    """
    import torch
    from torch import nn

    probe = torch.rand(4, 3, crop_size, crop_size)
    seen: dict[nn.Module, torch.Tensor] = {}
    with torch.no_grad():
        for conv in [module for module in tower.modules() if isinstance(module, nn.Conv2d)]:
            handle = conv.register_forward_hook(lambda module, args, output: seen.__setitem__(module, output))
            if conv.bias is not None:
                conv.bias.zero_()
            tower.forward_features(probe)
            handle.remove()
            conv.weight /= seen.pop(conv).std().clamp_min(1e-6)


def build(
    path: Path,
    family: str = FAMILY,
    sizes: common.ToySizes = common.TOY,
    stage_dims: tuple[int, ...] = (8, 16, 32, 32, 32),
    crop_size: int = 128,
) -> Path:
    from transformers import CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor

    common.require_family(family, (FAMILY,))
    tokenizer, ids = common.family_tokenizer(SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # FastViT's head conv doubles the last stage width (cls_ratio 2): that is the tower's output width.
    vision_width = 2 * stage_dims[-1]
    vision_config = {
        "model_type": "timm_wrapper",
        "architecture": "fastvit_mci3",
        "do_pooling": True,
        "global_pool": "avg",
        "hidden_size": vision_width,
        "model_args": {"inference_mode": True, "layers": [1] * len(stage_dims), "embed_dims": list(stage_dims)},
    }
    text = sizes.text(len(tokenizer), model_type="qwen2", **common.chatml_token_ids(ids))
    config = FastVlmConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=(crop_size // DOWNSAMPLE) ** 2,
    )
    model = FastVlmForConditionalGeneration(config)
    _unit_variance_init(model.model.vision_tower.timm_model, crop_size)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
        # FastVLM feeds the tower [0, 1] pixels: its processor does not normalize.
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=DOWNSAMPLE,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    return common.save_checkpoint(path, model, processor, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
