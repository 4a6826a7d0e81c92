"""Family adapters and their registry.

Each family lives in one module of this package that defines an `Adapter` subclass listing the
transformers `model_type` values it serves. The registry imports those small modules on first use
(they import no model code), so adding a family means adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from torch import nn

from halp.models.base import Adapter, ExtractionPointError

__all__ = ["Adapter", "ExtractionPointError", "adapter_class_for", "adapter_classes", "adapter_for"]

_NOT_FAMILIES = {"base"}


@cache
def adapter_classes() -> dict[str, type[Adapter]]:
    """model_type -> adapter class, for every family module in this package."""
    registry: dict[str, type[Adapter]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Adapter) and value.__module__ == module.__name__:
                for model_type in value.model_types:
                    if model_type in registry:
                        raise RuntimeError(
                            f"model_type {model_type!r} claimed by {registry[model_type].__name__} and {value.__name__}"
                        )
                    registry[model_type] = value
    return registry


def adapter_class_for(model_type: str) -> type[Adapter]:
    registry = adapter_classes()
    if model_type in registry:
        return registry[model_type]
    fallback = registry.get("*")
    if fallback is None:
        raise ExtractionPointError(
            f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(registry))}"
        )
    return fallback


def adapter_for(model: nn.Module, processor: Any) -> Adapter:
    """The adapter for a loaded model, checked: its modules and image token must resolve."""
    adapter = adapter_class_for(model.config.model_type)(model, processor)
    adapter.projector_module()
    adapter.layer_modules()
    _ = adapter.image_token_id
    return adapter
