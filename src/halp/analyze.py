"""`halp analyze norms|neighbors`: layer-wise statistics and readings of the vision tokens, any family.

Both run `halp.embed.Embedder` (one prefill pass per batch, token-level states kept) over a folder of
images. Layer k is decoder block k's output, before the final norm, as everywhere in halp.

- norms: per image and layer, the L2 norm of every vision token (image placeholder position) and
  every text token of the prompt -> mean / std (population, ddof=0) / min / max, plus the projector's
  input and output rows; one JSON summary and a plot of the norms across layers.
- neighbors: per vision token and layer, the nearest vocabulary tokens by cosine to the input
  embedding matrix ("embedding lens") and by the logit lens (final norm, then the LM head), top-k;
  optionally by LatentLens' contextual index (the `latentlens` package, built offline from a local
  text corpus through the same model).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from halp.capture import parse_layers
from halp.embed import DEFAULT_PROMPT, Embedder, Embedding, list_images, save_embedding, unique_stems
from halp.errors import MissingDependencyError, ParameterError, install_hint
from halp.layout import atomic_write, write_text_atomic
from halp.models import Adapter, ExtractionPointError
from halp.pages import render_page

Progress = Callable[[str], None] | None


def _embed_folder(
    embedder: Embedder, images: Sequence[Path], prompt: str, progress: Progress
) -> list[tuple[Path, Embedding]]:
    done: list[tuple[Path, Embedding]] = []
    for start in range(0, len(images), embedder.batch_size):
        chunk = list(images[start : start + embedder.batch_size])
        done += list(zip(chunk, embedder.embed_many(chunk, prompt), strict=True))
        if progress is not None:
            progress(f"{len(done)}/{len(images)} images")
    return done


# ----- norms --------------------------------------------------------------------------------------


def l2_norms(tokens: np.ndarray) -> np.ndarray:
    """Per-row L2 norms of (n, dim) tokens, in float64."""
    return np.linalg.norm(np.asarray(tokens, dtype=np.float64), axis=-1)


def norm_stats(norms: np.ndarray) -> dict[str, float | int]:
    """count / mean / std (ddof=0) / min / max of a vector of norms."""
    if norms.size == 0:
        raise ValueError("no tokens to summarise")
    return {
        "count": int(norms.size),
        "mean": float(norms.mean()),
        "std": float(norms.std()),
        "min": float(norms.min()),
        "max": float(norms.max()),
    }


def image_norms(embedding: Embedding) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One image's summary, and its raw norms by key (`vision/layer_k`, `text/layer_k`, projector rows)."""
    raw = {
        "projector_input": l2_norms(embedding["vision_tokens"]),
        "projector_output": l2_norms(embedding["projected_tokens"]),
    }
    for layer in embedding.layers:
        raw[f"vision/layer_{layer}"] = l2_norms(embedding[f"image_states/layer_{layer}"])
        raw[f"text/layer_{layer}"] = l2_norms(embedding[f"text_states/layer_{layer}"])
    summary = {
        "image": embedding.image,
        "num_visual_tokens": embedding.num_visual_tokens,
        "num_text_tokens": len(embedding.text_positions),
        "projector_input": norm_stats(raw["projector_input"]),
        "projector_output": norm_stats(raw["projector_output"]),
        "layers": {
            str(layer): {
                "vision": norm_stats(raw[f"vision/layer_{layer}"]),
                "text": norm_stats(raw[f"text/layer_{layer}"]),
            }
            for layer in embedding.layers
        },
    }
    return summary, raw


def pooled_norms(raws: Sequence[dict[str, np.ndarray]], layers: Sequence[int]) -> dict[str, Any]:
    """The same statistics over all tokens of all images together."""

    def pooled(key: str) -> dict[str, float | int]:
        return norm_stats(np.concatenate([raw[key] for raw in raws]))

    return {
        "projector_input": pooled("projector_input"),
        "projector_output": pooled("projector_output"),
        "layers": {
            str(layer): {"vision": pooled(f"vision/layer_{layer}"), "text": pooled(f"text/layer_{layer}")}
            for layer in layers
        },
    }


def norms_plot_png(summary: dict[str, Any]) -> bytes:
    """Mean L2 norm (+/- std band, all tokens of all images) of vision and text tokens across layers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.5, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    layers = [int(layer) for layer in summary["all_images"]["layers"]]
    for kind, colour in (("vision", "tab:orange"), ("text", "tab:blue")):
        stats = [summary["all_images"]["layers"][str(layer)][kind] for layer in layers]
        means = np.array([entry["mean"] for entry in stats])
        stds = np.array([entry["std"] for entry in stats])
        axes.plot(layers, means, marker="o", color=colour, label=f"{kind} tokens (mean)")
        axes.fill_between(layers, means - stds, means + stds, color=colour, alpha=0.2, label=f"{kind} tokens (±std)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer (block output)")
    axes.set_ylabel("L2 norm")
    axes.set_title(f"Token norms across layers, {len(summary['images'])} image(s)")
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


@dataclass
class NormsResult:
    summary_path: Path
    plot_path: Path
    features_dir: Path | None
    summary: dict[str, Any]


def analyze_norms(
    embedder: Embedder,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    prompt: str = DEFAULT_PROMPT,
    save_features: bool = False,
    limit: int | None = None,
    progress: Progress = None,
) -> NormsResult:
    """Write OUT/norms.json and OUT/norms.png (and OUT/features/<image>/ with save_features)."""
    paths = list_images(images) if isinstance(images, (str, Path)) else [Path(path) for path in images]
    paths = paths[:limit] if limit is not None else paths
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features_dir = out / "features" if save_features else None
    stems = unique_stems(paths)
    per_image, raws = [], []
    for index, (_, embedding) in enumerate(_embed_folder(embedder, paths, prompt, progress)):
        summary, raw = image_norms(embedding)
        per_image.append(summary)
        raws.append(raw)
        if features_dir is not None:
            save_embedding(embedding, features_dir / stems[index], tokens=True)
    summary = {
        **embedder.describe(),
        "prompt": prompt,
        "statistic": "L2 norm per token; std is the population std (ddof=0)",
        "vision_tokens": "image placeholder positions in the LM sequence",
        "text_tokens": "the prompt's other positions (chat template and question), padding excluded",
        "all_images": pooled_norms(raws, embedder.layers),
        "images": per_image,
    }
    summary_path, plot_path = out / "norms.json", out / "norms.png"
    write_text_atomic(summary_path, json.dumps(summary, indent=2))
    with atomic_write(plot_path, "wb") as handle:
        handle.write(norms_plot_png(summary))
    return NormsResult(summary_path, plot_path, features_dir, summary)


# ----- neighbours ---------------------------------------------------------------------------------


def _as_tensor(states: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(states)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def cosine_top_k(
    states: np.ndarray | torch.Tensor, matrix: torch.Tensor, top_k: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, k): the rows of `matrix` most cosine-similar to each state, best first."""
    states = _as_tensor(states)
    unit_matrix = nn.functional.normalize(matrix.detach().float(), dim=-1)
    scores, ids = [], []
    with torch.no_grad():
        for start in range(0, states.shape[0], chunk):
            queries = nn.functional.normalize(states[start : start + chunk].to(unit_matrix.device).float(), dim=-1)
            values, indices = (queries @ unit_matrix.T).topk(min(top_k, unit_matrix.shape[0]), dim=-1)
            scores.append(values.cpu())
            ids.append(indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(ids).numpy()


class VocabularyLens:
    """Reads states against the vocabulary: input-embedding cosine and the logit lens (final norm, LM head)."""

    def __init__(self, adapter: Adapter, chunk: int = 512) -> None:
        model = adapter.model
        embeddings = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
            raise ExtractionPointError(f"{type(model).__name__} exposes no input embedding matrix")
        if head is None:
            raise ExtractionPointError(f"{type(model).__name__} exposes no LM head (get_output_embeddings() is None)")
        self.adapter = adapter
        self.embedding_matrix = embeddings.weight
        self.head = head
        self.norm = adapter.final_norm_module()
        self.tokenizer = adapter.tokenizer()
        self.chunk = chunk

    def embedding_lens(self, states: np.ndarray | torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        return cosine_top_k(states, self.embedding_matrix, top_k, self.chunk)

    def logit_lens(self, states: np.ndarray | torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(logits, ids), each (n, k): LM head logits of the final-normed states (before any softcapping)."""
        states = _as_tensor(states)
        parameter = next(self.head.parameters())
        logits, ids = [], []
        with torch.no_grad():
            for start in range(0, states.shape[0], self.chunk):
                block = states[start : start + self.chunk].to(parameter.device, parameter.dtype)
                values, indices = self.head(self.norm(block)).float().topk(top_k, dim=-1)
                logits.append(values.cpu())
                ids.append(indices.cpu())
        return torch.cat(logits).numpy(), torch.cat(ids).numpy()

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([int(token_id)]))

    def table(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict[str, Any]]]:
        return [
            [{"id": int(i), "token": self.token_text(i), "score": float(s)} for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


class ContextualLens:
    """LatentLens: nearest contextual text embeddings, from an index built offline through the same model.

    The index holds, for each token of a local text corpus, the model's text-only hidden state at the
    chosen layers (latentlens' convention: hidden_states[i], i.e. halp layer i-1; built in memory, never
    saved, so no pickle is read or written). A search merges all of the index's layers.
    """

    def __init__(
        self,
        adapter: Adapter,
        corpus: str | Path | list[str],
        layers: Sequence[int],
        max_contexts_per_token: int = 50,
        batch_size: int = 16,
    ) -> None:
        try:
            import latentlens
        except ImportError as err:
            raise MissingDependencyError(
                f"the contextual lens needs the optional `latentlens` package: {install_hint('latentlens')}"
            ) from err
        tokenizer = adapter.tokenizer()
        # latentlens reads positions 2..length from the left of each padded row: right padding only.
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            self.index = latentlens.build_index(
                str(getattr(adapter.model, "name_or_path", "")),
                corpus=str(corpus) if isinstance(corpus, Path) else corpus,
                layers=[layer + 1 for layer in layers],
                max_contexts_per_token=max_contexts_per_token,
                batch_size=batch_size,
                show_progress=False,
                model=adapter.model,
                tokenizer=tokenizer,
            )
        finally:
            tokenizer.padding_side = previous_side
        if len(self.index) == 0:
            raise ParameterError("contextual_corpus", "gave no token contexts (latentlens skips each text's first 2)")
        self.halp_layers = list(layers)

    def search(self, states: np.ndarray | torch.Tensor, top_k: int) -> list[list[dict[str, Any]]]:
        results = self.index.search(_as_tensor(states).float(), top_k=top_k)
        return [
            [
                {
                    "token": neighbor.token_str,
                    "score": float(neighbor.similarity),
                    "context": neighbor.caption,
                    "position": int(neighbor.position),
                    "layer": int(neighbor.contextual_layer) - 1,  # back to halp's block index
                }
                for neighbor in row
            ]
            for row in results
        ]


@dataclass
class NeighborsResult:
    json_path: Path
    html_path: Path
    summary: dict[str, Any]


def image_neighbors(
    embedding: Embedding, lens: VocabularyLens, top_k: int, contextual: ContextualLens | None = None
) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for layer in embedding.layers:
        states = embedding[f"image_states/layer_{layer}"]
        entry = {
            "embedding": lens.table(*lens.embedding_lens(states, top_k)),
            "logit_lens": lens.table(*lens.logit_lens(states, top_k)),
        }
        if contextual is not None:
            entry["contextual"] = contextual.search(states, top_k)
        layers[str(layer)] = entry
    return {
        "image": embedding.image,
        "num_visual_tokens": embedding.num_visual_tokens,
        "image_token_positions": embedding.image_positions,
        "layers": layers,
    }


def neighbors_html(summary: dict[str, Any]) -> str:
    """neighbors.html: per image and layer, each vision token's neighbours by lens (templates/neighbors.html)."""
    return render_page("neighbors.html", title="halp analyze neighbors", summary=summary)


def analyze_neighbors(
    embedder: Embedder,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    top_k: int = 5,
    prompt: str = DEFAULT_PROMPT,
    contextual_corpus: str | Path | None = None,
    contextual_layers: str | Sequence[int] | None = None,
    limit: int | None = None,
    progress: Progress = None,
) -> NeighborsResult:
    """Write OUT/neighbors.json and OUT/neighbors.html for the vision tokens at the embedder's layers."""
    if top_k < 1:
        raise ParameterError("top_k", f"must be at least 1, got {top_k}")
    paths = list_images(images) if isinstance(images, (str, Path)) else [Path(path) for path in images]
    paths = paths[:limit] if limit is not None else paths
    lens = VocabularyLens(embedder.adapter)
    contextual = None
    if contextual_corpus is not None:
        num_layers = embedder.adapter.num_layers
        chosen = embedder.layers if contextual_layers is None else parse_layers(contextual_layers, num_layers)
        contextual = ContextualLens(embedder.adapter, contextual_corpus, chosen)
    lenses = ["embedding", "logit_lens"] + (["contextual"] if contextual is not None else [])
    per_image = [
        image_neighbors(embedding, lens, top_k, contextual)
        for _, embedding in _embed_folder(embedder, paths, prompt, progress)
    ]
    summary = {
        **embedder.describe(),
        "prompt": prompt,
        "top_k": top_k,
        "lenses": lenses,
        "contextual_layers": contextual.halp_layers if contextual is not None else None,
        "images": per_image,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "neighbors.json", out / "neighbors.html"
    write_text_atomic(json_path, json.dumps(summary, indent=2, ensure_ascii=False))
    write_text_atomic(html_path, neighbors_html(summary))
    return NeighborsResult(json_path, html_path, summary)
