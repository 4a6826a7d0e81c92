"""The six benchmarks of the HALP set, from the forms they are published in to halp's table.

`convert(source, path, out)` writes `out/<source>.parquet` (images embedded, ids prefixed by the source) and
`out/convert.json`; `halp.sources.compose` samples a composite of several converted tables; `halp.sources.labels`
holds the label rules that know each source's answer form. The layouts each converter reads, and each source's
quirks, are in its module's docstring and in docs/data.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from halp.errors import SourceError
from halp.sources import amber, hallusionbench, haloquest, mathvista, mme, pope
from halp.sources.common import ConvertSummary

Converter = Callable[[Path, Path, Path | None, str | None], ConvertSummary]
SOURCES: dict[str, Converter] = {
    module.NAME: module.convert for module in (amber, haloquest, pope, mme, hallusionbench, mathvista)
}


def convert(source: str, path: str | Path, out: str | Path, images: str | Path | None = None,
            split: str | None = None) -> ConvertSummary:
    """Convert one benchmark's files at `path` (and image folder `images`, for the layouts that need one)."""
    name = source.lower().replace("-", "").replace("_", "")
    if name not in SOURCES:
        raise SourceError(f"unknown source {source!r}; halp converts {', '.join(SOURCES)}")
    path = Path(path)
    if not path.exists():
        raise SourceError(f"path={path} does not exist")
    if images is not None and not Path(images).is_dir():
        raise SourceError(f"images={images} is not a directory")
    return SOURCES[name](path, Path(out), Path(images) if images is not None else None, split)


__all__ = ["SOURCES", "ConvertSummary", "convert"]
