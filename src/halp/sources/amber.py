"""AMBER (Wang et al. 2023): an LLM-free hallucination benchmark on 1,004 images.

Published in the authors' repository as `data/query/query_*.json` (lists of `id, image, query`: query_all, or
query_generative / query_discriminative[-existence|-attribute|-relation]) and `data/annotations.json` (a list in
id order: entry id-1 annotates query id), with the images (`AMBER_<n>.jpg`) downloaded separately (--images).

Two kinds of query:
- generative (ids 1-1004, "Describe this image."): no single answer; the annotation lists the objects in the
  image (`truth`) and objects a model is likely to hallucinate there (`hallu`). halp keeps both: `references`
  holds the objects present, `extra.hallucinated_objects` the listed absent ones (answer_format `objects`);
- discriminative (ids 1005+): yes/no questions on existence, attributes (state, number, action) and relations;
  the annotation's `type` (e.g. discriminative-attribute-state) is the category, `truth` the yes/no answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from halp.errors import SourceError
from halp.sources.common import (
    ConvertSummary,
    Row,
    file_bytes,
    is_present,
    read_json,
    unknown_layout,
    write_table,
    yes_no_row,
)

NAME = "amber"
EXPECTED = "the AMBER repository (data/query/query_*.json and data/annotations.json), its data/ folder, or a query file"
SPLITS = ("all", "generative", "discriminative", "discriminative-existence", "discriminative-attribute",
          "discriminative-relation")


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(query file, annotations.json) from the repository root, its data/ folder or a query file."""
    if is_present(path):
        for parent in (path.parent, path.parent.parent):
            if is_present(parent / "annotations.json"):
                return path, parent / "annotations.json"
        return path, None
    for data in (path / "data", path):
        if is_present(data / "annotations.json"):
            query_dir = data / "query"
            return (query_dir / "query_all.json" if is_present(query_dir / "query_all.json") else None,
                    data / "annotations.json")
    return None, None


def convert(path: Path, out: Path, images: Path | None = None, split: str | None = None) -> ConvertSummary:
    query_file, annotation_file = _locate(path)
    if split is not None:
        if split not in SPLITS:
            raise SourceError(f"{path}: no AMBER query set {split!r}; the sets are {', '.join(SPLITS)}")
        if query_file is not None:
            query_file = query_file.parent / f"query_{split}.json"
            if not is_present(query_file):
                raise SourceError(f"{path}: no query file {query_file.name} for split {split!r}")
    if query_file is None or annotation_file is None or not query_file.name.startswith("query_"):
        raise unknown_layout(NAME, path, EXPECTED)
    queries = read_json(query_file)
    annotations = read_json(annotation_file)
    if not isinstance(queries, list) or (queries and not {"id", "image", "query"} <= set(queries[0])):
        raise SourceError(f"{query_file}: expected a list of objects with id, image, query")
    if not isinstance(annotations, list) or (annotations and not {"id", "type", "truth"} <= set(annotations[0])):
        raise SourceError(f"{annotation_file}: expected a list of objects with id, type, truth")
    by_id = {int(item["id"]): item for item in annotations}
    return write_table(NAME, _rows(queries, by_id, images, query_file.stem.removeprefix("query_")), out,
                       "query + annotations json + image folder", str(path))


def _rows(queries: list[dict[str, Any]], annotations: dict[int, dict[str, Any]], images: Path | None,
          split: str) -> Iterator[Row]:
    for query in queries:
        query_id = int(query["id"])
        note = annotations.get(query_id)
        if note is None:
            raise SourceError(f"AMBER query {query_id} has no entry in annotations.json")
        source_id = str(query_id)
        image = file_bytes(images, str(query["image"]), f"AMBER {source_id}")
        if note["type"] == "generative":
            yield Row(
                source_id=source_id,
                image_id=str(query["image"]),
                question=str(query["query"]).strip(),
                answer="",
                answer_format="objects",
                category="generative",
                image=image,
                references=[str(item) for item in note["truth"]],
                split=split,
                extra={"hallucinated_objects": [str(item) for item in note.get("hallu", [])]},
            )
        else:
            yield yes_no_row(source_id, str(query["image"]), query["query"], note["truth"], str(note["type"]), image,
                             split)
