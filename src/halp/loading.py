"""Loading a checkpoint (hub id or local directory) the way its users do."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from halp.errors import ParameterError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", f"{device!r} was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"{dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model_id: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """Model and processor through the Auto classes; remote code only when asked for."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    log.info("loading %s (%s, %s, trust_remote_code=%s)", model_id, device, torch_dtype, trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    model_class: Any = AutoModelForImageTextToText
    if trust_remote_code:
        from transformers import AutoConfig, AutoModelForCausalLM

        auto_map = getattr(AutoConfig.from_pretrained(model_id, trust_remote_code=True), "auto_map", None) or {}
        # Remote-code VLMs that register only a causal-LM class (Molmo-*-0924) load through that class.
        if "AutoModelForImageTextToText" not in auto_map and "AutoModelForCausalLM" in auto_map:
            model_class = AutoModelForCausalLM
    else:
        from transformers import AutoConfig, AutoModelForMultimodalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        # Phi-4-multimodal (text, image, audio) is registered as a multimodal LM, not as image-text-to-text.
        if AutoConfig.from_pretrained(model_id).model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            model_class = AutoModelForMultimodalLM
    model = model_class.from_pretrained(model_id, **kwargs)
    if device != "cuda":
        model = model.to(device)
    model.eval()
    return model, processor
