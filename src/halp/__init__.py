"""halp: predict VLM hallucinations from internal states before a single token is generated."""

from typing import Any

from halp.version import __version__

__all__ = ["Embedder", "RiskScorer", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import halp` must stay cheap (no torch/transformers) for the CLI and for tools that read __version__.
    if name == "RiskScorer":
        from halp.predict import RiskScorer

        return RiskScorer
    if name == "Embedder":
        from halp.embed import Embedder

        return Embedder
    raise AttributeError(f"module 'halp' has no attribute {name!r}")
