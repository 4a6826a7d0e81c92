"""Phi-4-multimodal (`phi4_multimodal`, transformers-native): SigLIP tower, HD crops, Phi-4-mini decoder.

- LoRA: the model answers image questions with its vision LoRA (`vision-lora/` next to the base
  weights) active; the base weights alone are the text model. Constructing this adapter loads that
  adapter under the name "vision" and activates it, so the prefill and the answer both run with it.
  transformers' `load_adapter`/`set_adapter` (the documented way) require peft >= 0.22, newer than
  the registry offers here, so halp injects it with peft's own API (`inject_adapter_in_model` +
  `set_peft_model_state_dict`) and checks that every LoRA weight of the file was loaded.
- Projector: not one module. `Phi4MultimodalImageEmbedding` builds per sample the rows for the image
  (2x2-pooled tower features of `feature_layer` -2 for each HD crop, a learned newline row after
  each feature row, a learned separator, then the global crop's rows with their newlines) and
  projects them with `img_projection_up` -> GELU (a function) -> `img_projection_down`, in a loop
  over the batch. `vision_only` = mean of `img_projection_up`'s input rows (features + learned
  newline/separator rows, as the projector sees them), `vision_projected` = mean of
  `img_projection_down`'s output, which replaces the placeholders one row per token.
- Vision attention: transformers 5.24's `Phi4MultimodalVisionAttention` sets `is_causal = True`, so
  with SDPA the SigLIP tower attends causally when no crop of the batch has padding and
  bidirectionally (through the padding mask) when one has: a sample's features depend on the other
  samples of its batch (and eager attention is always bidirectional). The released model's SigLIP
  tower is bidirectional, so the adapter sets `is_causal = False` on the tower's attention modules
  (logged), for the extraction and the answer alike.
- Image placeholder `<|image|>` (`vision_config.image_token_id`), expanded by the processor; the HD
  crops come first and the global crop last, so the last image token is the global crop's last
  newline row. Decoder blocks `model.layers` (Phi-4-mini: 32).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from halp.models.base import Adapter, ExtractionPointError, get_submodule

log = logging.getLogger(__name__)

VISION_LORA_FOLDER = "vision-lora"
VISION_ADAPTER = "vision"
VISION_TOWER = "model.embed_tokens_extend.image_embed.img_processor"
# PEFT saves weights of a wrapped model under this prefix; the unwrapped model has none.
PEFT_PREFIX = "base_model.model."


def _tuner_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _load_vision_lora(model: nn.Module) -> None:
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    source = model.name_or_path
    try:
        config = PeftConfig.from_pretrained(source, subfolder=VISION_LORA_FOLDER)
        weights_file = cached_file(source, "adapter_model.safetensors", subfolder=VISION_LORA_FOLDER)
    except (OSError, ValueError) as err:
        raise ExtractionPointError(
            f"Phi-4-multimodal answers with its vision LoRA, but {source!r} has no loadable "
            f"{VISION_LORA_FOLDER}/ adapter ({err})"
        ) from err
    config.inference_mode = True
    inject_adapter_in_model(config, model, adapter_name=VISION_ADAPTER)
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(weights_file).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=VISION_ADAPTER)
    missing = [key for key in result.missing_keys if f".{VISION_ADAPTER}." in key]
    if result.unexpected_keys or missing:
        raise ExtractionPointError(
            f"{VISION_LORA_FOLDER} does not fit the model: {len(result.unexpected_keys)} unexpected weights "
            f"(e.g. {result.unexpected_keys[:2]}), {len(missing)} LoRA weights left unloaded (e.g. {missing[:2]})"
        )


def activate_vision_lora(model: nn.Module) -> None:
    """Load the vision LoRA once (if not loaded) and make it the active adapter of every LoRA layer."""
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ExtractionPointError("Phi-4-multimodal needs its vision LoRA, which needs the peft package") from err
    if VISION_ADAPTER not in getattr(model, "peft_config", {}):
        _load_vision_lora(model)
    layers = _tuner_layers(model)
    if not layers:
        raise ExtractionPointError(f"the {VISION_LORA_FOLDER} adapter targets no module of the model")
    for layer in layers:
        layer.enable_adapters(True)
        layer.set_adapter(VISION_ADAPTER)


class Phi4MultimodalAdapter(Adapter):
    model_types = ("phi4_multimodal",)
    projector = "model.embed_tokens_extend.image_embed.img_projection_up"
    projector_output = "model.embed_tokens_extend.image_embed.img_projection_down"
    projector_per_sample = True
    decoder_layers = "model.layers"
    final_norm = "model.norm"
    notes = (
        "vision LoRA loaded and active; image placeholder <|image|> (HD crops, then the global crop; the last "
        "image token is the global crop's last newline row); projector = img_projection_up -> GELU -> "
        "img_projection_down, run once per sample; vision_only includes the learned newline/separator rows"
    )

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        activate_vision_lora(model)
        self._make_vision_attention_bidirectional()

    def _make_vision_attention_bidirectional(self) -> None:
        attentions = [
            module
            for module in get_submodule(self.model, VISION_TOWER).modules()
            if type(module).__name__.endswith("VisionAttention")
        ]
        if not attentions:
            raise ExtractionPointError(f"no vision attention module under {VISION_TOWER}")
        causal = [module for module in attentions if getattr(module, "is_causal", False)]
        for module in causal:
            module.is_causal = False
        if causal:
            log.warning(
                "Phi-4-multimodal: set is_causal=False on %d vision attention modules (transformers marks the "
                "SigLIP tower causal, which SDPA applies only to batches without padded crops)",
                len(causal),
            )

    @property
    def image_token_id(self) -> int:
        value = getattr(getattr(self.model.config, "vision_config", None), self.image_token_id_attr, None)
        if not isinstance(value, int):
            raise ExtractionPointError("Phi-4-multimodal config has no integer vision_config.image_token_id")
        return value

    def prompt(self, question: str) -> str:
        # Phi-4's chat template takes string contents with the image placeholder inside the text.
        image_token = getattr(self.processor, "image_token", "<|image|>")
        messages = [{"role": "user", "content": f"{image_token}{question}"}]
        return self.tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
