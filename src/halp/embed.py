"""Per-image embeddings for every supported family: `halp embed` and `halp.Embedder`.

One prefill pass per batch (the capture core's hooks, with token-level tensors kept) gives, per image:

- `vision_tokens` (rows, Cv): the multimodal projector's input rows, in the image's spatial order;
- `projected_tokens` (rows', D): the projector's output rows, in the same order;
- `image_states/layer_k` (n_image, D) and `text_states/layer_k` (n_text, D): decoder block k's output
  at the image placeholder positions and at the prompt's other (text) positions, in sequence order;
- mean pools: `vision_only`, `vision_projected`, `vision_token_mean/layer_k`, `text_token_mean/layer_k`,
  and the HALP points `vision_token/layer_k` (last image token) and `query_token/layer_k` (last prompt token).

The pooled names that HALP also stores are computed by the same hooks as `halp extract`, so they are
the same numbers. Qwen2.5-VL runs its vision tower and merger in window order; the rows are put back
in the processor's patch order here (`Adapter.restore_spatial_order`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from halp.capture import BatchResult, FeatureExtractor, parse_layers
from halp.data import load_image, to_rgb
from halp.errors import ParameterError
from halp.features import (
    IMAGE_STATES,
    LAYER_REPRESENTATIONS,
    PRE_LM_REPRESENTATIONS,
    PROJECTED_TOKENS,
    TEXT_STATES,
    TEXT_TOKEN_MEAN,
    VISION_TOKENS,
    feature_name,
    layer_key,
)
from halp.layout import write_text_atomic
from halp.models import ExtractionPointError, adapter_for

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST = "manifest.json"

#: Token-level array names (kept only with tokens=True / --save-tokens); everything else is a pooled vector.
TOKEN_ARRAYS = ("vision_tokens", "projected_tokens", "image_states/", "text_states/")


def is_token_array(name: str) -> bool:
    return name.startswith(TOKEN_ARRAYS)


# ----- results ------------------------------------------------------------------------------------


@dataclass
class Embedding:
    """One image's named arrays (float32) and where its tokens are in the prompt (padding removed)."""

    image: str
    prompt: str
    arrays: dict[str, np.ndarray]
    image_positions: list[int]
    text_positions: list[int]
    text_tokens: list[str]
    prompt_length: int
    vision_token_order: str
    num_vision_rows: int
    num_projected_rows: int
    layers: list[int] = field(default_factory=list)

    @property
    def num_visual_tokens(self) -> int:
        """Image placeholder tokens in the LM sequence (what the LM attends to)."""
        return len(self.image_positions)

    @property
    def query_position(self) -> int:
        return self.prompt_length - 1

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def keys(self) -> list[str]:
        return list(self.arrays)

    def describe(self) -> dict[str, Any]:
        """Everything but the arrays' values, as JSON-ready data."""
        return {
            "image": self.image,
            "prompt": self.prompt,
            "layers": self.layers,
            "num_visual_tokens": self.num_visual_tokens,
            "num_vision_rows": self.num_vision_rows,
            "num_projected_rows": self.num_projected_rows,
            "vision_token_order": self.vision_token_order,
            "prompt_length": self.prompt_length,
            "query_position": self.query_position,
            "last_image_position": self.image_positions[-1],
            "image_token_positions": self.image_positions,
            "text_token_positions": self.text_positions,
            "text_tokens": self.text_tokens,
        }


def as_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    return load_image(path.parent, path.name)


def _label(image: Image.Image | str | Path, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image_{index}"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Embedder:
    """Embeds images with one prefill pass per batch: `Embedder(model).embed(image, prompt=...)`.

    `model` is a hub id or checkpoint directory (loaded with `halp.loading.load_model`), or a loaded
    model together with its `processor`. `layers`: 'halp', 'all' or indices like `0,7,-1`. With
    `tokens=False` only the pooled vectors are returned (the token-level arrays are still computed).
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        processor: Any = None,
        *,
        layers: str | Sequence[int] = "halp",
        tokens: bool = True,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        if isinstance(model, (str, Path)):
            from halp.loading import load_model

            self.model_ref = str(model)
            model, processor = load_model(self.model_ref, device, dtype, trust_remote_code)
        else:
            if processor is None:
                raise ParameterError("processor", ": a loaded model needs its processor: Embedder(model, processor)")
            self.model_ref = str(getattr(model, "name_or_path", "") or type(model).__name__)
        if batch_size < 1:
            raise ParameterError("batch_size", f"must be at least 1, got {batch_size}")
        self.adapter = adapter_for(model, processor)
        self.layers = parse_layers(layers, self.adapter.num_layers)
        self.tokens = tokens
        self.batch_size = batch_size
        self.extractor = FeatureExtractor(self.adapter, self.layers, keep_tokens=True)
        self.model_type = str(model.config.model_type)
        self.vision_token_order = self.adapter.vision_token_order

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def describe(self) -> dict[str, Any]:
        """The run-level manifest: model, family, layers, dtypes."""
        import transformers

        from halp.version import __version__

        return {
            "model": self.model_ref,
            "model_type": self.model_type,
            "adapter": type(self.adapter).__name__,
            "projector": self.adapter.projector,
            "num_layers": self.adapter.num_layers,
            "layers": self.layers,
            "model_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "array_dtype": "float32",
            "vision_token_order": self.vision_token_order,
            "halp_version": __version__,
            "transformers_version": transformers.__version__,
        }

    def embed(self, image: Image.Image | str | Path, prompt: str = DEFAULT_PROMPT) -> Embedding:
        return self.embed_many([image], prompt)[0]

    def embed_many(
        self,
        images: Sequence[Image.Image | str | Path],
        prompts: str | Sequence[str] = DEFAULT_PROMPT,
        batch_size: int | None = None,
    ) -> list[Embedding]:
        """Embed many images in batches of `batch_size` (one prompt for all, or one per image)."""
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise ParameterError("prompt", f": {len(images)} images but {len(prompt_list)} prompts")
        indexed = list(range(len(images)))
        results: list[Embedding] = []
        for chunk in _chunks(indexed, batch_size or self.batch_size):
            loaded = [as_image(images[index]) for index in chunk]
            labels = [_label(images[index], index) for index in chunk]
            questions = [prompt_list[index] for index in chunk]
            batch = self.extractor(loaded, questions, max_new_tokens=0)
            results += [self._sample(batch, row, labels[row], questions[row]) for row in range(len(chunk))]
        return results

    def _sample(self, batch: BatchResult, row: int, label: str, prompt: str) -> Embedding:
        positions = batch.positions
        if positions is None:
            raise ExtractionPointError("the capture kept no token-level tensors")
        inputs = positions.inputs
        input_ids = inputs["input_ids"][row].cpu()
        attention = inputs.get("attention_mask")
        valid = attention[row].cpu().bool() if attention is not None else torch.ones_like(input_ids, dtype=torch.bool)
        image_mask = positions.image_mask[row].cpu() & valid
        text_mask = valid & ~image_mask
        offset = int(valid.numel() - valid.sum())  # left padding
        image_columns = torch.nonzero(image_mask).flatten()
        text_columns = torch.nonzero(text_mask).flatten()

        vision = batch.tokens[VISION_TOKENS][row]
        projected = batch.tokens[PROJECTED_TOKENS][row]
        vision, projected = self.adapter.restore_spatial_order(inputs, row, vision, projected)
        arrays: dict[str, np.ndarray] = {name: batch.features[name][row] for name in PRE_LM_REPRESENTATIONS}
        if self.tokens:
            arrays[VISION_TOKENS] = vision
            arrays[PROJECTED_TOKENS] = projected
        for layer in self.layers:
            states = batch.tokens[layer_key(layer)][row]
            text_states = states[text_columns.numpy()]
            for representation in LAYER_REPRESENTATIONS:
                arrays[feature_name(representation, layer)] = batch.features[feature_name(representation, layer)][row]
            arrays[feature_name(TEXT_TOKEN_MEAN, layer)] = text_states.mean(axis=0)
            if self.tokens:
                arrays[feature_name(IMAGE_STATES, layer)] = states[image_columns.numpy()]
                arrays[feature_name(TEXT_STATES, layer)] = text_states
        tokenizer = self.adapter.tokenizer()
        return Embedding(
            image=label,
            prompt=prompt,
            arrays=arrays,
            image_positions=[int(column) - offset for column in image_columns],
            text_positions=[int(column) - offset for column in text_columns],
            text_tokens=[str(token) for token in tokenizer.convert_ids_to_tokens(input_ids[text_columns].tolist())],
            prompt_length=int(valid.sum()),
            vision_token_order=self.vision_token_order,
            num_vision_rows=int(vision.shape[0]),
            num_projected_rows=int(projected.shape[0]),
            layers=list(self.layers),
        )


# ----- files --------------------------------------------------------------------------------------


def array_filename(name: str) -> str:
    """`image_states/layer_3` -> `image_states.layer_3.npy` (flat, one file per array)."""
    return name.replace("/", ".") + ".npy"


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def save_embedding(embedding: Embedding, directory: str | Path, tokens: bool = True) -> Path:
    """Write one image's arrays as .npy (no pickle) and its manifest.json; returns the manifest path.

    Arrays and the manifest an earlier call left in `directory` are removed first, so the manifest
    lists exactly the files there.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("*.npy"), directory / MANIFEST]:
        stale.unlink(missing_ok=True)
    listed: dict[str, dict[str, Any]] = {}
    for name, values in embedding.arrays.items():
        if not tokens and is_token_array(name):
            continue
        filename = array_filename(name)
        np.save(directory / filename, values, allow_pickle=False)
        listed[name] = {"file": filename, "shape": list(values.shape), "dtype": str(values.dtype)}
    manifest = {**embedding.describe(), "arrays": listed}
    _write_json(directory / MANIFEST, manifest)
    return directory / MANIFEST


def load_embedding_arrays(directory: str | Path) -> dict[str, np.ndarray]:
    """The arrays a `save_embedding` directory holds, by name."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    return {name: np.load(directory / entry["file"], allow_pickle=False) for name, entry in manifest["arrays"].items()}


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """One directory name per image: its stem, suffixed where two images share one."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = Path(path).stem or "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}-{count + 1}")
    # A suffixed name could collide with a real stem ("a-2"); keep suffixing until unique.
    taken: set[str] = set()
    unique = []
    for stem in stems:
        candidate, extra = stem, 1
        while candidate in taken:
            extra += 1
            candidate = f"{stem}-{extra}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def list_images(source: str | Path) -> list[Path]:
    """An image file, or a directory's image files (not recursive), sorted by name."""
    source = Path(source)
    if source.exists() and not source.is_dir():  # a file of any kind: reading it names one that is not regular
        return [source]
    if not source.is_dir():
        raise ParameterError("images", f"{source} is neither an image file nor a directory")
    # Every entry named like an image but a folder: one that is not a regular file (a FIFO) fails naming itself.
    found = sorted(path for path in source.iterdir() if not path.is_dir() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ParameterError("images", f": no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return found


def write_embeddings(
    embedder: Embedder,
    images: Sequence[str | Path],
    out: str | Path,
    prompt: str = DEFAULT_PROMPT,
    tokens: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """`halp embed`: OUT/<image stem>/*.npy + manifest.json per image, and OUT/manifest.json for the run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(images)
    entries = []
    done = 0
    for chunk in _chunks(list(range(len(images))), embedder.batch_size):
        embeddings = embedder.embed_many([images[index] for index in chunk], prompt)
        for index, embedding in zip(chunk, embeddings, strict=True):
            save_embedding(embedding, out / stems[index], tokens=tokens)
            entries.append(
                {"image": str(images[index]), "dir": stems[index], "num_visual_tokens": embedding.num_visual_tokens}
            )
        done += len(chunk)
        if progress is not None:
            progress(f"embedded {done}/{len(images)}")
    manifest = {**embedder.describe(), "prompt": prompt, "tokens_saved": tokens, "images": entries}
    _write_json(out / MANIFEST, manifest)
    return out / MANIFEST
