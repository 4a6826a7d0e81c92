"""Loading a checkpoint (hub id or local directory) the way its users do.

Remote code: every transformers loading call gets `trust_remote_code` explicitly, so transformers never asks
"Do you wish to run the custom code?" (a prompt that hangs a terminal and runs the code on a piped "y").
Without the flag, a checkpoint that needs its own code (a config `auto_map` for a model type transformers does
not know) is refused before anything of it is imported; a checkpoint whose type transformers knows loads with
transformers' own classes, and its `.py` files are never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from halp.digests import handle_sha256
from halp.errors import ModelLoadError, ParameterError, first_line

log = logging.getLogger(__name__)

#: The words of transformers' refusal when custom code would be needed but trust_remote_code is False.
_CUSTOM_CODE_REFUSAL = "custom code"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: --attn-implementation choices, and the package each kernel needs beyond torch.
ATTN_IMPLEMENTATIONS = {"sdpa": None, "flash_attention_2": "flash_attn", "eager": None}


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


def _looks_like_path(model_id: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (`./x`, `/x`, `~/x`, `a/b/c`, `a\\b`) is meant as a path."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or (os.sep != "/" and os.sep in model_id)


def _local_config(model_id: str) -> dict[str, Any] | None:
    """The checkpoint directory's config.json, or None for a hub id (its config is read by transformers)."""
    path = Path(model_id).expanduser()
    if not path.is_dir():
        return None
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_id} is a directory but holds no config.json: not a checkpoint directory")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config_path} cannot be read as JSON: {err}") from err


def refuse_remote_code(model_id: str, config: dict[str, Any]) -> None:
    """Fail if loading `config` needs the checkpoint's own Python code (and the user did not allow it)."""
    from transformers import CONFIG_MAPPING

    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    if auto_map and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{model_id} needs its own Python code (auto_map: {', '.join(sorted(auto_map))}; model_type "
            f"{model_type!r} is not built into transformers); halp runs it only with trust_remote_code=True"
        )


def check_model_source(model_id: str, trust_remote_code: bool) -> None:
    """Before transformers sees `model_id`: it exists, and it needs no code the user did not allow."""
    path = Path(model_id).expanduser()
    if not path.exists():
        if _looks_like_path(model_id):
            raise ModelLoadError(f"model={model_id}: no such directory or hub id")
        check_hub_model(model_id)
    config = _local_config(model_id)
    if config is not None and not trust_remote_code:
        refuse_remote_code(model_id, config)



def check_hub_model(model_id: str) -> None:
    """A hub id (no such local directory) is in the local hub cache, or the hub knows it; else one line, at once.

    huggingface_hub's own cache look-up decides "cached"; offline (HF_HUB_OFFLINE=1) an id that is not cached fails
    there, and online one request asks the hub whether the repository exists, so a mistyped id never reaches
    transformers' download, whose retries print a screen of noise over half a minute before failing.
    """
    from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError as err:  # HFValidationError: not a repository id at all
        raise ModelLoadError(f"model={model_id}: no such directory, and not a hub id ({first_line(err)})") from err
    if isinstance(cached, str):
        return
    if is_offline_mode():
        raise ModelLoadError(
            f"model={model_id}: no such directory, and not in the local hub cache (the hub is offline: HF_HUB_OFFLINE "
            "is set)"
        )
    try:
        exists = HfApi().repo_exists(model_id)
    except Exception as err:  # whatever stops the request (DNS, proxy, TLS, timeout) is said, not retried
        raise ModelLoadError(
            f"model={model_id}: no such directory, not in the local hub cache, and the hub cannot be reached "
            f"({first_line(err)})"
        ) from err
    if not exists:
        raise ModelLoadError(
            f"model={model_id}: no such directory or hub id (a private repository needs `hf auth login` first)"
        )


def _load_error(model_id: str, err: Exception) -> ModelLoadError:
    """One line for a checkpoint transformers cannot load: missing, malformed id, or refused custom code."""
    text = str(err)
    if _CUSTOM_CODE_REFUSAL in text:
        return ModelLoadError(f"{model_id} needs its own Python code; halp runs it only with trust_remote_code=True")
    if not Path(model_id).expanduser().exists():
        return ModelLoadError(
            f"model={model_id}: no such directory or hub id (or the hub cannot be reached and it is not cached)"
        )
    return ModelLoadError(f"{model_id} cannot be loaded: {first_line(err)}")


def check_attn_implementation(attn_implementation: str, device: str) -> None:
    """Refuse an unknown kernel, or one whose package is missing, before anything loads."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation={attn_implementation!r}: choose {', '.join(ATTN_IMPLEMENTATIONS)}")
    package = ATTN_IMPLEMENTATIONS[attn_implementation]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ModelLoadError(
            f"attn_implementation={attn_implementation} needs the {package} package, which is not installed "
            f"(pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa (the default)"
        )
    if attn_implementation.startswith("flash_attention") and not device.startswith("cuda"):
        raise ModelLoadError(f"attn_implementation={attn_implementation} runs on CUDA only; the device is {device}")


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
    from huggingface_hub.errors import HFValidationError

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_model_source(model_id, trust_remote_code)
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation, device)
    log.info(
        "loading %s (%s, %s, attention %s, trust_remote_code=%s)",
        model_id,
        device,
        torch_dtype,
        attn_implementation or "transformers' default",
        trust_remote_code,
    )
    try:
        model_class, processor = _model_class_and_processor(model_id, trust_remote_code)
    except (OSError, HFValidationError, ValueError) as err:
        raise _load_error(model_id, err) from err
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device == "cuda":
        kwargs["device_map"] = "auto"
    try:
        model = model_class.from_pretrained(model_id, **kwargs)
    except (ValueError, ImportError) as err:
        if attn_implementation is None or not any(word in str(err).lower() for word in ("attn", "attention")):
            raise
        raise ModelLoadError(
            f"{model_id} cannot load with attn_implementation={attn_implementation}: {err}. "
            "Choose another (eager works for every architecture)."
        ) from err
    if device != "cuda":
        model = model.to(device)
    model.eval()
    return model, processor


def _model_class_and_processor(model_id: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """The Auto class the checkpoint loads through, and its processor; trust_remote_code passed to each call."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForMultimodalLM,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    if not trust_remote_code:
        refuse_remote_code(model_id, config.to_dict())  # a hub config, read without running its code
    processor = load_processor(model_id, trust_remote_code)
    if trust_remote_code and getattr(config, "auto_map", None):
        auto_map = config.auto_map
        # Remote-code VLMs that register only a causal-LM class (Molmo-*-0924) load through that class.
        if "AutoModelForImageTextToText" not in auto_map and "AutoModelForCausalLM" in auto_map:
            return AutoModelForCausalLM, processor
        return AutoModelForImageTextToText, processor
    # Phi-4-multimodal (text, image, audio) is registered as a multimodal LM, not as image-text-to-text.
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForMultimodalLM, processor
    return AutoModelForImageTextToText, processor


#: Files of a local checkpoint whose bytes decide the model's numbers (weights, configs, tokenizer, processor).
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".py")


def model_fingerprint(model_id: str, known: dict[str, list[Any]] | None = None) -> tuple[str | None, dict[str, Any]]:
    """The content identity of a checkpoint, and the per-file record that makes the next call cheap.

    A local directory: SHA-256 over every weight, config, tokenizer and code file (name, size, SHA-256 of its
    bytes). A file whose (size, mtime_ns, inode) equals the one in `known` (the record of an earlier call) is not
    hashed again, so a rerun costs a `stat` per file. A hub id: `hub:<id>@<commit>` of the cached snapshot
    (None while it is not cached: the caller checks again once the model is loaded).
    """
    path = Path(model_id).expanduser()
    if not path.is_dir():
        commit = hub_commit(model_id)
        return (f"hub:{model_id}@{commit}" if commit else None), {}
    known = known or {}
    record: dict[str, list[Any]] = {}
    total = hashlib.sha256()
    files = sorted(
        file for file in path.rglob("*")
        if file.suffix in _FINGERPRINT_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
        and file.is_file()
    )
    for file in files:
        name = file.relative_to(path).as_posix()
        stat = file.stat()
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        previous = known.get(name)
        if previous is not None and list(previous[:3]) == key:
            digest = str(previous[3])
        else:
            with file.open("rb") as handle:
                digest = handle_sha256(handle)
        record[name] = [*key, digest]
        total.update(f"{name}\t{stat.st_size}\t{digest}\n".encode())
    return total.hexdigest(), record


def hub_commit(model_id: str) -> str | None:
    """The commit of the cached snapshot of a hub model (from the cache's path), or None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
