"""What a model family must tell halp: where its extraction points are and how to prompt it.

A family is a small subclass of `Adapter` in its own module under `halp.models`; the registry finds
it by the transformers `model_type` values it lists. Most families only set class attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from halp.errors import ExtractionPointError


def get_submodule(model: nn.Module, dotted_path: str) -> nn.Module:
    try:
        return model.get_submodule(dotted_path)
    except AttributeError as err:
        raise ExtractionPointError(
            f"{type(model).__name__} has no module at {dotted_path!r}; the installed transformers may lay "
            f"out this architecture differently ({err})"
        ) from err


@dataclass
class Positions:
    """Per-batch token positions found from token ids by an adapter's rules (`from_inputs`); the capture hooks
    (`halp.capture`) and the adapters' per-sample splits read them."""

    image_mask: torch.Tensor  # (B, T) bool
    last_image: torch.Tensor  # (B,) long
    query: int  # column of the last prompt token (left padding: the last one)
    image_tokens_per_sample: list[int]
    #: What the projector's rows are proportional to, per sample (Adapter.projector_units_per_sample);
    #: None: the image token counts.
    projector_units: list[int] | None = None
    #: The batch's processor inputs, for adapters whose projector rows only they can attribute to samples.
    inputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_inputs(cls, adapter: Adapter, inputs: dict[str, torch.Tensor]) -> Positions:
        input_ids = inputs["input_ids"]
        mask = adapter.image_token_mask(inputs)
        counts = mask.sum(dim=1)
        if bool((counts == 0).any()):
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise ExtractionPointError(
                f"no image placeholder token (id {adapter.image_token_id}) in row(s) {rows} of the prompt; "
                "the chat template or processor did not insert the image"
            )
        attention = inputs.get("attention_mask")
        if attention is not None and not bool(attention[:, -1].all()):
            raise ExtractionPointError("the batch is not left-padded: the last column is padding for some rows")
        columns = torch.arange(input_ids.shape[1], device=mask.device)
        last_image = torch.where(mask, columns, -1).max(dim=1).values
        image_tokens = counts.tolist()
        units = adapter.projector_units_per_sample(inputs, image_tokens)
        return cls(mask, last_image, input_ids.shape[1] - 1, image_tokens, units, inputs)


class Adapter:
    """Declarative mapping from stable names to a family's modules, plus prompt and token rules.

    Paths are relative to the model `halp.loading.load_model` returns (the `AutoModelForImageTextToText`
    class of the checkpoint, or `AutoModelForMultimodalLM` / the remote-code class where that is what it registers).
    """

    #: transformers `config.model_type` values served by this adapter.
    model_types: ClassVar[tuple[str, ...]] = ()
    # The four extraction points default to transformers' standard layout of a `...ForConditionalGeneration`
    # VLM (LLaVA, Gemma-3, InternVL, Mllama, Molmo2, FastVLM): a family states only the ones it lays out otherwise.
    #: The multimodal projector: its input is `vision_only`, its output `vision_projected`.
    projector: ClassVar[str] = "model.multi_modal_projector"
    #: The ModuleList of decoder blocks; block k's output is layer k.
    decoder_layers: ClassVar[str] = "model.language_model.layers"
    #: The norm applied after the last block (used by independent checks and the logit lens).
    final_norm: ClassVar[str] = "model.language_model.norm"
    #: The config attribute holding the id of the token that image features replace (many configs alias
    #: `image_token_id` to their own `image_token_index`).
    image_token_id_attr: ClassVar[str] = "image_token_id"
    #: A short note for `halp models` and docs/models.md.
    notes: ClassVar[str] = ""
    #: The module whose OUTPUT is `vision_projected`, where the projection is not one module
    #: (Phi-4-multimodal: up-projection, functional GELU, down-projection); "": the projector's own.
    projector_output: ClassVar[str] = ""
    #: The model calls the projector once per sample, in batch order (Phi-4-multimodal loops over the
    #: batch), instead of once per batch; the capture concatenates the calls' rows.
    projector_per_sample: ClassVar[bool] = False
    #: How one image's projector input rows (`halp embed`'s `vision_tokens`) are ordered, once
    #: `restore_spatial_order` has run; recorded in the embedding manifest.
    vision_token_order: ClassVar[str] = (
        "the projector's input order (for ViT towers: per tile, patches row-major; see docs)"
    )
    #: The processor reads a flat image list as many images of ONE prompt (Gemma-3, Idefics3/SmolVLM, Mllama):
    #: `encode` passes it one list per prompt instead, which every processor reads unambiguously.
    image_list_per_prompt: ClassVar[bool] = False

    #: Greedy decoding of a batch can go on for a subset of its rows from the prefill's KV cache (`halp serve`
    #: stops abstained rows after the prefill): the cache's rows, the per-token inputs and `select_rows` are all the
    #: model keeps of the batch. Verified against plain `generate` for every family with a tiny fixture
    #: (tests/test_serve.py); False for the generic adapter, whose models nobody has checked.
    resumes_row_subsets: ClassVar[bool] = True

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor

    # ----- modules -------------------------------------------------------------------------
    def projector_module(self) -> nn.Module:
        return get_submodule(self.model, self.projector)

    def projector_output_module(self) -> nn.Module:
        return get_submodule(self.model, self.projector_output) if self.projector_output else self.projector_module()

    def layer_modules(self) -> nn.ModuleList:
        layers = get_submodule(self.model, self.decoder_layers)
        if not isinstance(layers, nn.ModuleList):
            raise ExtractionPointError(f"{self.decoder_layers!r} is a {type(layers).__name__}, not a ModuleList")
        return layers

    def final_norm_module(self) -> nn.Module:
        return get_submodule(self.model, self.final_norm)

    def layer_state_point(self, layer: int) -> tuple[nn.Module, bool]:
        """Where layer k's state is read: (module, False) = that module's output, (module, True) = its first input.

        Default: block k's output. A family whose model changes the residual stream between blocks
        (Qwen3-VL's deepstack) reads the next block's input instead, so the stored state is the one
        the next block receives.
        """
        return self.layer_modules()[layer], False

    @property
    def num_layers(self) -> int:
        return len(self.layer_modules())

    # ----- tokens --------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        config = self.model.config
        for holder in (config, getattr(config, "text_config", None)):
            value = getattr(holder, self.image_token_id_attr, None) if holder is not None else None
            if isinstance(value, int):
                return value
        raise ExtractionPointError(
            f"config of {type(self.model).__name__} has no integer {self.image_token_id_attr!r}; "
            "cannot tell which tokens carry the image"
        )

    def image_token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: the sequence positions whose embeddings are replaced by image features."""
        return inputs["input_ids"] == self.image_token_id

    def select_rows(self, rows: torch.Tensor) -> None:
        """Narrow what the model keeps of the current batch outside its KV cache to `rows`, before decoding goes on
        for those rows only. Default: the M-RoPE offsets (`rope_deltas`) that transformers' Qwen-VL-style models
        store on a submodule during the prefill."""
        for module in self.model.modules():
            deltas = getattr(module, "rope_deltas", None)
            if isinstance(deltas, torch.Tensor):
                module.rope_deltas = deltas[rows.to(deltas.device)]

    # ----- prompting -----------------------------------------------------------------------
    def messages(self, question: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def prompt(self, question: str) -> str:
        return self.processor.apply_chat_template(self.messages(question), add_generation_prompt=True, tokenize=False)

    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def encode(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch, left-padded so the last position is every row's query token.

        The tokenizer belongs to the caller (a loaded processor may serve other code too): its
        `padding_side` is left only for this call and restored afterwards, also when the call fails.
        """
        tokenizer = self.tokenizer()
        prompts = [self.prompt(question) for question in questions]
        if self.image_list_per_prompt:
            images = [[image] for image in images]
        # As processor.apply_chat_template(tokenize=True) does: a template that renders the BOS itself
        # (Gemma-3) must not get a second one from a tokenizer that also adds it.
        bos = getattr(tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and all(p.startswith(bos) for p in prompts) else {}
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            return dict(self.processor(text=prompts, images=images, padding=True, return_tensors="pt", **special))
        finally:
            tokenizer.padding_side = previous_side

    # ----- vision features -----------------------------------------------------------------
    def projector_units_per_sample(
        self, inputs: dict[str, torch.Tensor], image_tokens_per_sample: list[int]
    ) -> list[int]:
        """Per-sample counts that the projector's rows are proportional to; `split_per_sample` gets them.

        By default the image placeholder counts. A family whose projector sees whole tiles that are
        unpadded or interleaved with newline rows only after it (LLaVA-NeXT, LLaVA-OneVision) returns
        the number of tiles per sample, which only the processor inputs tell.
        """
        return image_tokens_per_sample

    def projector_groups(self, tensor: torch.Tensor, positions: Positions, output: bool) -> list[torch.Tensor]:
        """Per-sample (rows, dim) groups of the projector's input (output=False) or output (output=True).

        Default: `split_per_sample` by `positions.projector_units` (or the image token counts), the same
        for input and output. A family whose projector changes the rows per sample unevenly (Molmo2 pools
        crops into tokens) or pads them (Molmo) overrides this, reading `positions.inputs`.
        """
        return self.split_per_sample(tensor, positions.projector_units or positions.image_tokens_per_sample)

    def split_per_sample(self, tensor: torch.Tensor, image_tokens_per_sample: list[int]) -> list[torch.Tensor]:
        """Split a projector input/output into per-sample (n_tokens, dim) groups.

        Default rule: flattened over leading dims, the rows are proportional to each sample's number
        of image placeholder tokens (true for Qwen-VL, LLaVA-1.5, Gemma-3, Idefics3/SmolVLM ...).
        Families where that is not so override this.
        """
        rows = tensor.reshape(-1, tensor.shape[-1])
        total = sum(image_tokens_per_sample)
        if total == 0 or rows.shape[0] % total:
            raise ExtractionPointError(
                f"{self.projector}: {rows.shape[0]} feature rows cannot be split over "
                f"{image_tokens_per_sample} image tokens per sample"
            )
        factor = rows.shape[0] // total
        return list(torch.split(rows, [count * factor for count in image_tokens_per_sample]))

    def restore_spatial_order(
        self, inputs: dict[str, torch.Tensor], row: int, vision: np.ndarray, projected: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sample `row`'s projector input and output rows in the order `vision_token_order` states.

        Default: the projector already sees them in that order. A family whose tower permutes them
        (Qwen2.5-VL's window attention) undoes the permutation here, from the processor `inputs`.
        """
        return vision, projected

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": type(self).__name__,
            "projector": self.projector,
            "decoder_layers": self.decoder_layers,
            "final_norm": self.final_norm,
            "image_token_id": self.image_token_id,
            "num_layers": self.num_layers,
            "notes": self.notes,
        }
