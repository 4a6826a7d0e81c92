"""Loading a checkpoint (hub id or local directory) the way its users do."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: --attn-implementation choices, and the package each kernel needs beyond torch.
ATTN_IMPLEMENTATIONS = {"sdpa": None, "flash_attention_2": "flash_attn", "eager": None}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_attn_implementation(attn_implementation: str, device: str) -> None:
    """Refuse an unknown kernel, or one whose package is missing, before anything loads."""
    from halp.errors import ModelLoadError

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"--attn-implementation {attn_implementation!r}: choose {', '.join(ATTN_IMPLEMENTATIONS)}")
    package = ATTN_IMPLEMENTATIONS[attn_implementation]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ModelLoadError(
            f"--attn-implementation {attn_implementation} needs the {package} package, which is not installed "
            f"(pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa (the default)"
        )
    if attn_implementation.startswith("flash_attention") and not device.startswith("cuda"):
        raise ModelLoadError(f"--attn-implementation {attn_implementation} runs on CUDA only; the device is {device}")


def load_processor(model_id: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor, as `load_model` loads it (input workers load theirs with this too)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)


def load_model(
    model_id: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Model and processor through the Auto classes; remote code only when asked for.

    `attn_implementation` (sdpa, flash_attention_2, eager) is passed to transformers, which refuses an
    architecture without that kernel; None leaves transformers' own choice (sdpa where supported, else eager).
    """
    from transformers import AutoModelForImageTextToText

    from halp.errors import ModelLoadError

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation, device)
        kwargs["attn_implementation"] = attn_implementation
    if device == "cuda":
        kwargs["device_map"] = "auto"
    log.info(
        "loading %s (%s, %s, attention %s, trust_remote_code=%s)",
        model_id,
        device,
        torch_dtype,
        attn_implementation or "transformers' default",
        trust_remote_code,
    )
    processor = load_processor(model_id, trust_remote_code)
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
    try:
        model = model_class.from_pretrained(model_id, **kwargs)
    except (ValueError, ImportError) as err:
        if attn_implementation is None or ("attn" not in str(err).lower() and "attention" not in str(err).lower()):
            raise
        raise ModelLoadError(
            f"{model_id} cannot load with --attn-implementation {attn_implementation}: {err}. "
            "Choose another (eager works for every architecture)."
        ) from err
    if device != "cuda":
        model = model.to(device)
    model.eval()
    return model, processor
