"""The generic fallback adapter: what it finds on a family with no dedicated adapter, and how it fails.

Feature correctness on that family (mistral3) is covered by tests/test_families.py, which runs every
fixture through whatever adapter the registry picks; here we pin that the pick is the generic one,
what it resolved, and its errors.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from halp.capture import FeatureExtractor
from halp.data import load_image, read_samples
from halp.models import ExtractionPointError, adapter_class_for, adapter_for
from halp.models.generic import GenericAdapter

FAMILY = "mistral3"


def test_registry_falls_back_to_generic_for_a_family_without_adapter(loaded):
    model, processor = loaded(FAMILY)
    assert model.config.model_type == FAMILY
    assert adapter_class_for(FAMILY) is GenericAdapter
    adapter = adapter_for(model, processor)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.projector == "model.multi_modal_projector"
    assert adapter.decoder_layers == "model.language_model.layers"
    assert adapter.final_norm == "model.language_model.norm"
    assert adapter.num_layers == model.config.text_config.num_hidden_layers
    assert adapter.image_token_id == processor.tokenizer.convert_tokens_to_ids("[IMG]")


def test_generic_vision_only_is_the_tower_output_per_patch(loaded, vqa_set):
    """Mistral3's projector merges 2x2 patches; its input (vision_only) is the Pixtral tower's per-patch output."""
    model, processor = loaded(FAMILY)
    adapter = adapter_for(model, processor)
    table, images_dir = vqa_set
    samples = read_samples(table)[:3]
    images = [load_image(images_dir, sample.image_id) for sample in samples]
    result = FeatureExtractor(adapter, [0])(images, [sample.question for sample in samples])
    for row, image in enumerate(images):
        inputs = adapter.encode([image], [samples[row].question])
        with torch.no_grad():
            tower = model.model.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        patches = tower.last_hidden_state.reshape(-1, tower.last_hidden_state.shape[-1])
        image_tokens = int((inputs["input_ids"] == adapter.image_token_id).sum())
        assert patches.shape[0] == 4 * image_tokens  # one [IMG] per merged 2x2 group
        torch.testing.assert_close(
            torch.from_numpy(result.features["vision_only"][row]), patches.mean(0), rtol=1e-4, atol=1e-5
        )


def _tiny_text_only_model() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    return MistralForCausalLM(config)


def test_text_only_model_names_the_missing_projector():
    with pytest.raises(ExtractionPointError, match="no multimodal projector found") as err:
        GenericAdapter(_tiny_text_only_model(), processor=None)
    assert "model.multi_modal_projector" in str(err.value)  # says where it looked
    assert "lm_head" in str(err.value)  # and what the model has instead


class _Config:
    """A bare config: the attributes a test gives it and nothing else."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


class _Holder(nn.Module):
    def __init__(self, config: _Config, **children: nn.Module) -> None:
        super().__init__()
        self.config = config
        for name, child in children.items():
            self.add_module(name, child)


def _language_model() -> nn.Module:
    return _Holder(_Config(), layers=nn.ModuleList([nn.Linear(4, 4)]), norm=nn.LayerNorm(4))


def test_missing_decoder_blocks_are_named():
    model = _Holder(_Config(image_token_id=3), model=_Holder(_Config(), multi_modal_projector=nn.Linear(4, 4)))
    with pytest.raises(ExtractionPointError, match="no decoder block list found"):
        GenericAdapter(model, processor=None)


def test_missing_final_norm_is_named():
    language_model = _Holder(_Config(), layers=nn.ModuleList([nn.Linear(4, 4)]))
    model = _Holder(
        _Config(image_token_id=3),
        model=_Holder(_Config(), multi_modal_projector=nn.Linear(4, 4), language_model=language_model),
    )
    with pytest.raises(ExtractionPointError, match=re.escape("no final norm under model.language_model")):
        GenericAdapter(model, processor=None)


def test_missing_image_token_is_named():
    model = _Holder(
        _Config(model_type="made_up"),
        model=_Holder(_Config(), multi_modal_projector=nn.Linear(4, 4), language_model=_language_model()),
    )
    with pytest.raises(ExtractionPointError, match="image_token_id or image_token_index"):
        GenericAdapter(model, processor=None)


def test_image_token_index_and_text_config_are_read():
    model = _Holder(
        _Config(text_config=_Config(image_token_index=7)),
        model=_Holder(_Config(), multi_modal_projector=nn.Linear(4, 4), language_model=_language_model()),
    )
    adapter = GenericAdapter(model, processor=None)
    assert adapter.image_token_id == 7


def test_ambiguous_projector_is_refused():
    model = _Holder(
        _Config(image_token_id=3),
        vision=_Holder(_Config(), merger=nn.Linear(4, 4)),
        audio=_Holder(_Config(), connector=nn.Linear(4, 4)),
        language_model=_language_model(),
    )
    with pytest.raises(ExtractionPointError, match=re.escape("vision.merger, audio.connector")):
        GenericAdapter(model, processor=None)


def test_projector_found_by_name_when_no_known_path_exists():
    model = _Holder(
        _Config(image_token_id=3),
        vision=_Holder(_Config(), connector=_Holder(_Config(), merger=nn.Linear(4, 4))),
        language_model=_language_model(),
    )
    adapter = GenericAdapter(model, processor=None)
    assert adapter.projector == "vision.connector"  # the outer match, not its nested merger
    assert adapter.decoder_layers == "language_model.layers"


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_left_pads_and_leaves_the_callers_tokenizer_as_it_found_it(loaded, vqa_set, side):
    """encode pads on the left for its own batch only; the processor's tokenizer keeps the caller's padding side."""
    model, processor = loaded(FAMILY)
    adapter = adapter_for(model, processor)
    tokenizer = processor.tokenizer
    before = tokenizer.padding_side
    table, images_dir = vqa_set
    samples = read_samples(table)[:2]
    images = [load_image(images_dir, sample.image_id) for sample in samples]
    try:
        tokenizer.padding_side = side
        questions = ["Is it red?", "How many dogs are there in the picture, and what color is the car?"]
        inputs = adapter.encode(images, questions)
        mask = inputs["attention_mask"]
        assert bool(mask[:, -1].all()), "every row must end with a real token (left padding)"
        assert not bool(mask.all()), "the two prompts must differ in length for padding to show"
        assert tokenizer.padding_side == side
        with pytest.raises(TypeError):  # the image processor refuses a non-image
            adapter.encode([object()], ["not an image"])
        assert tokenizer.padding_side == side, "a failing encode must restore the padding side too"
    finally:
        tokenizer.padding_side = before
