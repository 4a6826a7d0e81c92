"""Tiny random-weight checkpoints of real architectures, built offline.

A checkpoint is a real `save_pretrained` directory (model, trained BPE tokenizer, real image processor, chat
template) that loads through `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`, so the real loading
path runs. `halp demo` and `halp world` build theirs here; the test suite and the benchmarks use them through
`halp.testing`.

One module per family defines `FAMILY` (or `FAMILIES`) and `build(path, family=..., sizes=<its ToySizes>, **specific)
-> Path`. What all
builders share (toy decoder and tower sizes, tokenizer, ChatML template, save steps) is in `common`, which defines
no family; a builder states only what is specific to its family.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import fields, replace
from functools import cache
from pathlib import Path
from typing import Any

from halp.tiny_checkpoints.common import ToySizes

__all__ = ["ToySizes", "available_fixtures", "build_checkpoint"]


@cache
def _builders() -> dict[str, Callable[..., Path]]:
    found: dict[str, Callable[..., Path]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for family in getattr(module, "FAMILIES", (getattr(module, "FAMILY", None),)):
            if family:
                found[family] = module.build
    return found


def available_fixtures() -> list[str]:
    """Family names (transformers model_type) that have a tiny-checkpoint builder."""
    return sorted(_builders())


def build_checkpoint(family: str, path: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """Build a tiny random checkpoint of `family` into `path` (a save_pretrained directory)."""
    import torch

    builders = _builders()
    if family not in builders:
        raise KeyError(f"no tiny-checkpoint builder for {family!r}; have {', '.join(sorted(builders))}")
    build = builders[family]
    # The toy sizes travel as one ToySizes: the family's own defaults (its `sizes` default), overridden by name.
    toy = {name: sizes.pop(name) for name in [field.name for field in fields(ToySizes)] if name in sizes}
    if toy:
        sizes["sizes"] = replace(inspect.signature(build).parameters["sizes"].default, **toy)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return build(path, family=family, **sizes)
