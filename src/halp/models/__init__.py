"""Family adapters and their registry.

Each family lives in one module of this package that defines an `Adapter` subclass listing the
transformers `model_type` values it serves. The registry imports those small modules on first use
(they import no model code), so adding a family means adding one file.

Third-party packages add families without touching halp: an entry point in the `halp.adapters` group,
named after the `model_type` it serves and pointing at an `Adapter` subclass (docs/models.md has a
worked example). The registry imports a plugin only when its `model_type` is asked for (or all of them
are listed), so a broken plugin fails with an `AdapterPluginError` naming it and never affects another family.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from torch import nn

from halp.errors import AdapterPluginError
from halp.models.base import Adapter, ExtractionPointError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AdapterPluginError",
    "ExtractionPointError",
    "adapter_class_for",
    "adapter_classes",
    "adapter_for",
]

#: The entry-point group third-party adapters register in: `<model_type> = "package.module:AdapterClass"`.
ENTRY_POINT_GROUP = "halp.adapters"

_NOT_FAMILIES = {"base"}


@cache
def builtin_adapter_classes() -> dict[str, type[Adapter]]:
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


def plugin_entry_points() -> dict[str, list[EntryPoint]]:
    """model_type -> the installed `halp.adapters` entry points of that name (read from metadata, nothing imported).

    Not cached: a package installed while the process runs is seen on the next look-up.
    """
    found: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, []).append(entry_point)
    return found


def _describe(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    source = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"adapter plugin {entry_point.name!r} ({entry_point.value}{source})"


def load_plugin(model_type: str, candidates: list[EntryPoint]) -> type[Adapter]:
    """Import and check the one plugin registered for `model_type`; any failure names the plugin."""
    if len(candidates) > 1:
        raise AdapterPluginError(
            f"model_type {model_type!r} is claimed by several {ENTRY_POINT_GROUP!r} plugins: "
            f"{'; '.join(_describe(entry_point) for entry_point in candidates)}; uninstall all but one"
        )
    entry_point = candidates[0]
    builtin = builtin_adapter_classes().get(model_type)
    if builtin is not None:
        raise AdapterPluginError(
            f"{_describe(entry_point)} claims model_type {model_type!r}, which halp's own {builtin.__name__} "
            "serves; uninstall the plugin or register it under another model_type"
        )
    try:
        value = entry_point.load()
    except Exception as err:  # any error of third-party import code: report it as the plugin's
        raise AdapterPluginError(
            f"{_describe(entry_point)} cannot be imported: {type(err).__name__}: {err}; fix or uninstall "
            "that package (other families are unaffected)"
        ) from err
    if not (isinstance(value, type) and issubclass(value, Adapter)):
        raise AdapterPluginError(f"{_describe(entry_point)} points at {value!r}, not a subclass of halp.models.Adapter")
    if model_type not in value.model_types:
        raise AdapterPluginError(
            f"{_describe(entry_point)} is registered for model_type {model_type!r}, but {value.__name__}.model_types "
            f"is {value.model_types!r}; the entry-point name must be one of them"
        )
    return value


def adapter_classes() -> dict[str, type[Adapter]]:
    """model_type -> adapter class: halp's own families and every installed plugin (all imported)."""
    registry = dict(builtin_adapter_classes())
    for model_type, candidates in sorted(plugin_entry_points().items()):
        registry[model_type] = load_plugin(model_type, candidates)
    return registry


def adapter_class_for(model_type: str) -> type[Adapter]:
    """The adapter class serving `model_type`: a plugin registered for it, halp's own, else the generic one."""
    plugins = plugin_entry_points()
    if model_type in plugins:
        return load_plugin(model_type, plugins[model_type])
    registry = builtin_adapter_classes()
    if model_type in registry:
        return registry[model_type]
    fallback = registry.get("*")
    if fallback is None:
        supported = sorted({*registry, *plugins})
        raise ExtractionPointError(f"no adapter for model_type {model_type!r}; supported: {', '.join(supported)}")
    return fallback


def adapter_for(model: nn.Module, processor: Any) -> Adapter:
    """The adapter for a loaded model, checked: its modules and image token must resolve."""
    adapter = adapter_class_for(model.config.model_type)(model, processor)
    adapter.projector_module()
    adapter.layer_modules()
    _ = adapter.image_token_id
    return adapter
