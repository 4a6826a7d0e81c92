"""The feature vocabulary: the HALP representations, how a feature is named, parsed and ordered.

A *representation* is where a state is read; a *feature* is a representation at one decoder layer
(`query_token/layer_7`) or, for the two read before the language model, the representation itself
(`vision_only`). Every module that names, parses or sorts features uses this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Mean over tokens of the multimodal projector's input (vision encoder output, before fusion).
VISION_ONLY = "vision_only"
#: Mean of the projector's output (what enters the language model).
VISION_PROJECTED = "vision_projected"
#: Decoder block k's output at the last image-placeholder token.
VISION_TOKEN = "vision_token"
#: The same, averaged over every image-placeholder token.
VISION_TOKEN_MEAN = "vision_token_mean"
#: Decoder block k's output at the last prompt token (generation prompt included).
QUERY_TOKEN = "query_token"

#: In report and storage order.
REPRESENTATIONS = (VISION_ONLY, VISION_PROJECTED, VISION_TOKEN, VISION_TOKEN_MEAN, QUERY_TOKEN)
#: Read before the language model: one vector per sample, no layer.
PRE_LM_REPRESENTATIONS = (VISION_ONLY, VISION_PROJECTED)
#: Read at decoder layers.
LAYER_REPRESENTATIONS = (VISION_TOKEN, VISION_TOKEN_MEAN, QUERY_TOKEN)
#: Derived from the image (tower or image tokens), not from the prompt's last token.
VISION_REPRESENTATIONS = (VISION_ONLY, VISION_PROJECTED, VISION_TOKEN, VISION_TOKEN_MEAN)

#: Token-level (not pooled) arrays: the projector's input rows (the token-level `vision_only`) and output rows.
VISION_TOKENS = "vision_tokens"
PROJECTED_TOKENS = "projected_tokens"
#: What `halp embed` adds per layer: decoder block k's output at every image token / text token (token level), and
#: the mean over the text tokens.
IMAGE_STATES = "image_states"
TEXT_STATES = "text_states"
TEXT_TOKEN_MEAN = "text_token_mean"


def layer_key(layer: int) -> str:
    return f"layer_{layer}"


def feature_name(representation: str, layer: int | None = None) -> str:
    """("query_token", 7) -> "query_token/layer_7"; ("vision_only", None) -> "vision_only"."""
    return representation if layer is None else f"{representation}/{layer_key(layer)}"


def feature_names(layers: Sequence[int]) -> list[str]:
    """Every feature one extraction at `layers` stores, in storage order."""
    return [*PRE_LM_REPRESENTATIONS] + [
        feature_name(representation, layer) for representation in LAYER_REPRESENTATIONS for layer in layers
    ]


def split_feature(feature: str) -> tuple[str, int | None]:
    """`query_token/layer_7` -> ("query_token", 7); `vision_only` -> ("vision_only", None)."""
    representation, _, leaf = feature.partition("/")
    if leaf.startswith("layer_"):
        try:
            return representation, int(leaf.removeprefix("layer_"))
        except ValueError:
            pass
    return feature, None


def is_feature_name(feature: str) -> bool:
    """A name this vocabulary produces: a pre-LM representation alone, or a layer representation at a layer."""
    representation, layer = split_feature(feature)
    if layer is None:
        return representation in PRE_LM_REPRESENTATIONS
    return representation in LAYER_REPRESENTATIONS


def is_vision_feature(feature: str) -> bool:
    """Vision-derived: read from image tokens or the vision tower, not from the prompt's last token."""
    return split_feature(feature)[0] in VISION_REPRESENTATIONS


def representation_rank(representation: str) -> int:
    return REPRESENTATIONS.index(representation) if representation in REPRESENTATIONS else len(REPRESENTATIONS)


def feature_sort_key(feature: str) -> tuple[int, str, int]:
    """Representations in REPRESENTATIONS order, then layers ascending; unknown names last, by name."""
    representation, layer = split_feature(feature)
    return representation_rank(representation), representation, -1 if layer is None else layer


def sort_features(features: Iterable[str]) -> list[str]:
    return sorted(features, key=feature_sort_key)
