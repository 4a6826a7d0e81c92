"""Fallback adapter for an AutoModelForImageTextToText family that has no dedicated adapter.

It looks the extraction points up by the names transformers uses across LLaVA-style models: the
projector among known paths (`model.multi_modal_projector`, `model.visual.merger`, `model.connector`,
`model.mm_projector`, ...), the decoder blocks as the `layers` ModuleList of the language model, the
image token from `config.image_token_id` / `image_token_index`. Whatever it cannot find, it names in
an ExtractionPointError instead of guessing.

What it cannot know: whether the family's projector rows are proportional to its image placeholder
tokens (the default per-image split; a mismatch that does not divide evenly raises), whether the
model changes the residual stream between blocks, or whether the placeholder is the token the image
features replace. A family with such traps needs a dedicated adapter; docs/models.md says which
families were verified through this one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from halp.models.base import Adapter, ExtractionPointError

#: Where transformers keeps the multimodal projector, most common first.
PROJECTOR_PATHS = (
    "model.multi_modal_projector",
    "multi_modal_projector",
    "model.visual.merger",
    "visual.merger",
    "model.connector",
    "connector",
    "model.mm_projector",
    "mm_projector",
    "model.vision_projector",
    "model.visual_projection",
    "model.aligner",
)
#: Last path components that name a projector when none of the known paths exists.
PROJECTOR_NAMES = frozenset(
    {"multi_modal_projector", "mm_projector", "connector", "merger", "vision_projector", "visual_projection", "aligner"}
)
#: Where the language model (the module holding the decoder blocks) lives.
LANGUAGE_MODEL_PATHS = (
    "model.language_model",
    "language_model",
    "model.text_model",
    "model.language_model.model",
    "language_model.model",
)
BLOCK_LIST_NAMES = ("layers", "h", "blocks")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_projector(model: nn.Module) -> str:
    for path in PROJECTOR_PATHS:
        if _has_module(model, path):
            return path
    named = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    # A projector nested inside another match (e.g. connector.merger) is part of the outer one.
    outermost = [name for name in named if not any(name.startswith(other + ".") for other in named)]
    if len(outermost) == 1:
        return outermost[0]
    if len(outermost) > 1:
        raise ExtractionPointError(
            f"{type(model).__name__}: several modules could be the multimodal projector ({', '.join(outermost)}); "
            "this family needs a dedicated adapter"
        )
    raise ExtractionPointError(
        f"{type(model).__name__}: no multimodal projector found (tried {', '.join(PROJECTOR_PATHS)} and modules "
        f"named {', '.join(sorted(PROJECTOR_NAMES))}); top-level modules: {_children(model)}"
    )


def find_language_model(model: nn.Module) -> tuple[str, str]:
    """(language model path, decoder block list path)."""
    for root in LANGUAGE_MODEL_PATHS:
        if not _has_module(model, root):
            continue
        for name in BLOCK_LIST_NAMES:
            path = f"{root}.{name}"
            if _has_module(model, path) and isinstance(model.get_submodule(path), nn.ModuleList):
                return root, path
    block_lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    raise ExtractionPointError(
        f"{type(model).__name__}: no decoder block list found (tried {', '.join(BLOCK_LIST_NAMES)} under "
        f"{', '.join(LANGUAGE_MODEL_PATHS)}); ModuleLists in the model: {', '.join(block_lists) or 'none'}"
    )


def find_final_norm(model: nn.Module, language_model: str) -> str:
    for name in FINAL_NORM_NAMES:
        path = f"{language_model}.{name}"
        if _has_module(model, path):
            return path
    raise ExtractionPointError(
        f"{type(model).__name__}: no final norm under {language_model} (tried {', '.join(FINAL_NORM_NAMES)})"
    )


def _children(model: nn.Module) -> str:
    return ", ".join(name for name, _ in model.named_children()) or "none"


class GenericAdapter(Adapter):
    model_types = ("*",)
    notes = "generic discovery (no dedicated adapter): projector, decoder blocks and image token found by name"
    # Unknown families may keep batch state that `select_rows` does not know about.
    resumes_row_subsets = False

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        # Per instance, not per class: each model resolves its own paths.
        self.projector = find_projector(model)
        language_model, self.decoder_layers = find_language_model(model)
        self.final_norm = find_final_norm(model, language_model)
        self.image_token_id_attr = self._image_token_attr()

    def _image_token_attr(self) -> str:
        config = self.model.config
        for attr in IMAGE_TOKEN_ATTRS:
            for holder in (config, getattr(config, "text_config", None)):
                if holder is not None and isinstance(getattr(holder, attr, None), int):
                    return attr
        raise ExtractionPointError(
            f"config of {type(self.model).__name__} has no integer {' or '.join(IMAGE_TOKEN_ATTRS)}; "
            "cannot tell which tokens carry the image"
        )
