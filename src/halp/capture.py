"""One prefill pass captures every feature; the answer is decoded from that pass's KV cache.

Hooks are armed for the first forward call of the top-level model only (the prefill inside
`generate`), so decode steps never reach them. Positions come from token ids: the last image
placeholder of each row, the mean over all its placeholders, and the last prompt token (the
generation prompt included), which with left padding is the last column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from halp.errors import ParameterError
from halp.features import (
    PROJECTED_TOKENS,
    QUERY_TOKEN,
    VISION_TOKEN,
    VISION_TOKEN_MEAN,
    VISION_TOKENS,
    feature_name,
    feature_names,
    layer_key,
)
from halp.models.base import Adapter, ExtractionPointError, Positions


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """`halp` = {0, L//4, L//2, 3L//4, L-1} (the paper); `all`; or a list like `0,7,-1`."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "halp":
            raw = [0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1]
        elif text == "all":
            raw = list(range(num_layers))
        else:
            try:
                raw = [int(part) for part in text.split(",") if part.strip()]
            except ValueError as err:
                raise ParameterError("layers", f"{spec!r}: expected 'halp', 'all' or integers like 0,7,-1") from err
    else:
        raw = list(spec)
    if not raw:
        raise ParameterError("layers", f"{spec!r} selects no layer")
    resolved = []
    for layer in raw:
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ParameterError("layers", f": layer {layer} is out of range for a decoder with {num_layers} blocks")
        resolved.append(index)
    return sorted(set(resolved))


def _first_tensor(output: Any) -> torch.Tensor:
    """Decoder blocks return a tensor in some families and versions and a tuple in others."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput (e.g. Molmo2's projector returns one)
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ExtractionPointError(f"unexpected decoder block output of type {type(output).__name__}")


@dataclass
class PrefillCapture:
    """Hooks that reduce, during the prefill pass, everything halp stores for a batch."""

    adapter: Adapter
    layers: list[int]
    positions: Positions | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Also keep token-level tensors in `tokens` (one per sample): the projector's input/output rows per
    #: sample (`vision_tokens`, `projected_tokens`) and each layer's states at every column (`layer_k`).
    keep_tokens: bool = False
    tokens: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _armed: bool = False
    _handles: list[Any] = field(default_factory=list)
    #: Projector calls of this prefill, per feature name, where they are reduced only once it ends.
    _projector_calls: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __enter__(self) -> PrefillCapture:
        adapter = self.adapter
        if adapter.projector_output or adapter.projector_per_sample:
            # Input and output come from different modules and/or several calls: collect, reduce at the end.
            self._handles.append(adapter.projector_module().register_forward_hook(self._collect("vision_only")))
            output_module = adapter.projector_output_module()
            self._handles.append(output_module.register_forward_hook(self._collect("vision_projected")))
        else:
            self._handles.append(adapter.projector_module().register_forward_hook(self._on_projector))
        for layer in self.layers:
            module, reads_input = self.adapter.layer_state_point(layer)
            hook = self._layer_hook(layer, reads_input)
            register = module.register_forward_pre_hook if reads_input else module.register_forward_hook
            self._handles.append(register(hook))
        # Disarm once the top-level prefill forward returns: decode steps must not be captured.
        self._handles.append(self.adapter.model.register_forward_hook(self._on_model_done))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._armed = False

    def arm(self, positions: Positions) -> None:
        self.positions = positions
        self._projector_calls = {}
        self.features = {}
        self.tokens = {}
        self._armed = True

    def _on_model_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed:
            self._reduce_projector_calls()
        self._armed = False

    def _collect(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._armed:
                return
            tensor = (args[0] if args else None) if name == "vision_only" else _first_tensor(output)
            if not isinstance(tensor, torch.Tensor):
                raise ExtractionPointError(f"the module giving {name} was called without a tensor")
            calls = self._projector_calls.setdefault(name, [])
            if calls and not self.adapter.projector_per_sample:
                raise ExtractionPointError(f"{name} was produced twice in one prefill pass")
            calls.append(tensor)

        return hook

    def _reduce_projector_calls(self) -> None:
        assert self.positions is not None
        samples = len(self.positions.image_tokens_per_sample)
        for name, calls in self._projector_calls.items():
            if self.adapter.projector_per_sample and len(calls) != samples:
                raise ExtractionPointError(
                    f"the module giving {name} ran {len(calls)} times for {samples} samples; expected once per sample"
                )
            tensor = calls[0] if len(calls) == 1 else torch.cat([call.reshape(-1, call.shape[-1]) for call in calls])
            self._store(name, self._per_sample_mean(tensor, output=name == "vision_projected"))
        self._projector_calls = {}

    def _store(self, name: str, value: torch.Tensor) -> None:
        if name in self.features:
            raise ExtractionPointError(f"{name} was produced twice in one prefill pass")
        self.features[name] = value.detach().float().cpu()

    def _per_sample_mean(self, tensor: torch.Tensor, output: bool) -> torch.Tensor:
        assert self.positions is not None
        groups = self.adapter.projector_groups(tensor, self.positions, output)
        if self.keep_tokens:
            self._keep(PROJECTED_TOKENS if output else VISION_TOKENS, groups)
        return torch.stack([group.float().mean(dim=0) for group in groups])

    def _keep(self, name: str, per_sample: Sequence[torch.Tensor]) -> None:
        if name in self.tokens:
            raise ExtractionPointError(f"{name} tokens were produced twice in one prefill pass")
        self.tokens[name] = [value.detach().float().cpu() for value in per_sample]

    def _on_projector(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed:
            return
        projector_input = args[0] if args else None
        if not isinstance(projector_input, torch.Tensor):
            raise ExtractionPointError(f"{self.adapter.projector} was called without a tensor input")
        self._store("vision_only", self._per_sample_mean(projector_input, output=False))
        self._store("vision_projected", self._per_sample_mean(_first_tensor(output), output=True))

    def _layer_hook(self, layer: int, reads_input: bool = False):
        # Serves as a forward hook (module, args, output) or, reading the input, a pre-hook (module, args).
        def hook(module: nn.Module, args: Any, output: Any = None) -> None:
            if not self._armed:
                return
            assert self.positions is not None
            hidden = _first_tensor(args if reads_input else output)
            positions = self.positions
            if hidden.shape[1] != positions.image_mask.shape[1]:
                raise ExtractionPointError(
                    f"decoder block {layer} saw {hidden.shape[1]} positions, the prompt has "
                    f"{positions.image_mask.shape[1]}: the model changes the sequence inside forward"
                )
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            mask = positions.image_mask.to(hidden.device).unsqueeze(-1)
            image_mean = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)
            self._store(feature_name(VISION_TOKEN, layer), hidden[rows, positions.last_image.to(hidden.device)])
            self._store(feature_name(VISION_TOKEN_MEAN, layer), image_mean)
            self._store(feature_name(QUERY_TOKEN, layer), hidden[:, positions.query])
            if self.keep_tokens:
                self._keep(layer_key(layer), list(hidden))

        return hook


@dataclass
class BatchResult:
    features: dict[str, np.ndarray]  # name -> (B, dim) float32
    answers: list[str]
    prompt_tokens: list[int]
    #: With keep_tokens: name -> one float32 array per sample (PrefillCapture.tokens), and the batch's positions.
    tokens: dict[str, list[np.ndarray]] = field(default_factory=dict)
    positions: Positions | None = None


def _to_device(value: torch.Tensor, device: torch.device, model_dtype: torch.dtype) -> torch.Tensor:
    # non_blocking pays off for pinned host tensors (the pipeline pins them); a no-op otherwise.
    moved = value.to(device, non_blocking=True)
    return moved.to(model_dtype) if moved.is_floating_point() else moved


class FeatureExtractor:
    """Runs one batch: encode, one prefill with hooks, greedy decode from the same cache."""

    def __init__(self, adapter: Adapter, layers: Sequence[int], keep_tokens: bool = False) -> None:
        self.adapter = adapter
        self.layers = list(layers)
        self.names = feature_names(self.layers)
        self.keep_tokens = keep_tokens

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def input_device(self) -> torch.device:
        return self.adapter.layer_modules()[0].parameters().__next__().device

    def __call__(self, images: list[Any], questions: list[str], max_new_tokens: int = 0) -> BatchResult:
        return self.run(self.adapter.encode(images, questions), max_new_tokens)

    def locate(self, inputs: dict[str, Any]) -> Positions:
        """Token positions of a batch's processor inputs (on the host): computed once, before the device copy."""
        return Positions.from_inputs(self.adapter, inputs)

    def device_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A batch's processor inputs on the model's input device, floating-point tensors in the model's dtype;
        pinned host tensors are copied without blocking the host."""
        device = self.input_device()
        model_dtype = next(self.model.parameters()).dtype
        return {
            key: _to_device(value, device, model_dtype) if isinstance(value, torch.Tensor) else value
            for key, value in inputs.items()
        }

    def greedy_settings(self) -> dict[str, Any]:
        """The `generate` arguments of halp's answers: greedy, one beam, the tokenizer's padding id."""
        return {"do_sample": False, "num_beams": 1, "pad_token_id": self.adapter.tokenizer().pad_token_id}

    def captured_features(self, capture: PrefillCapture) -> dict[str, np.ndarray]:
        """Every feature of `names` from a finished prefill pass, (B, dim) float32; a missing one is an error."""
        missing = [name for name in self.names if name not in capture.features]
        if missing:
            raise ExtractionPointError(f"the prefill pass did not produce {', '.join(missing)}")
        return {name: capture.features[name].numpy() for name in self.names}

    def decode(self, new_tokens: Any) -> list[str]:
        """Answers as halp stores them: the new tokens of each row, special tokens skipped, whitespace stripped."""
        return [text.strip() for text in self.adapter.tokenizer().batch_decode(new_tokens, skip_special_tokens=True)]

    @torch.inference_mode()
    def run(self, inputs: dict[str, Any], max_new_tokens: int = 0, positions: Positions | None = None) -> BatchResult:
        """Extract a batch from its processor inputs (`Adapter.encode`); pinned host tensors are copied without
        blocking the host."""
        positions = positions if positions is not None else self.locate(inputs)
        rows = int(inputs["input_ids"].shape[0])
        inputs = self.device_inputs(inputs)
        with PrefillCapture(self.adapter, self.layers, keep_tokens=self.keep_tokens) as capture:
            capture.arm(positions)
            # generate() builds position ids from the attention mask (and Qwen's 3-D rope from
            # mm_token_type_ids) exactly as deployment does; max_new_tokens=1 is the pure prefill.
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=max(1, max_new_tokens),
                use_cache=max_new_tokens > 0,  # prefill only: no decode step will read a KV cache
                **self.greedy_settings(),
            )
            kept = {name: [value.numpy() for value in values] for name, values in capture.tokens.items()}
            features = self.captured_features(capture)
        answers = [""] * rows
        if max_new_tokens > 0:
            answers = self.decode(sequences[:, inputs["input_ids"].shape[1] :])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return BatchResult(features, answers, prompt_tokens, kept, positions if self.keep_tokens else None)
