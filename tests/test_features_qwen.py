"""Every extracted number equals an independent computation (Qwen2-VL, Qwen2.5-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halp.capture import FeatureExtractor, parse_layers
from halp.data import load_image, read_samples
from halp.models import adapter_for

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _reference(model, processor, adapter, image, question, layers):
    """Plain forward, batch of one, positions from token ids, hooks only on the projector."""
    inputs = adapter.encode([image], [question])
    ids = inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == model.config.image_token_id).flatten()
    assert len(image_positions) > 0
    captured = {}
    merger = model.model.visual.merger
    handle = merger.register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        tower = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    hidden = out.hidden_states
    num_layers = len(model.model.language_model.layers)
    norm = model.model.language_model.norm
    ref = {
        "vision_only_hook": captured["inp"].mean(0),
        "vision_only_tower": tower.last_hidden_state.mean(0),
        "vision_projected_hook": captured["out"].mean(0),
        "vision_projected_embeds": hidden[0][0, image_positions].mean(0),
    }
    for layer in layers:
        if layer < num_layers - 1:
            state = hidden[layer + 1][0]
            ref[f"vision_token/layer_{layer}"] = state[image_positions[-1]]
            ref[f"vision_token_mean/layer_{layer}"] = state[image_positions].mean(0)
            ref[f"query_token/layer_{layer}"] = state[-1]
        else:
            # hidden_states[-1] is after the final norm; compare through it.
            ref[f"normed_query/layer_{layer}"] = hidden[-1][0, -1]
            ref[f"normed_vision/layer_{layer}"] = hidden[-1][0, image_positions[-1]]
    return ref, norm


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_independent_computation(family, loaded, vqa_set):
    model, processor = loaded(family)
    adapter = adapter_for(model, processor)
    layers = parse_layers("all", adapter.num_layers)
    table, images_dir = vqa_set
    samples = read_samples(table)[:6]  # six sizes and aspect ratios
    images = [load_image(images_dir, s.image_id) for s in samples]
    questions = [s.question for s in samples]
    result = FeatureExtractor(adapter, layers)(images, questions, max_new_tokens=0)
    sizes = {img.size for img in images}
    assert len(sizes) == 6

    last = adapter.num_layers - 1
    for row, (image, question) in enumerate(zip(images, questions, strict=True)):
        ref, norm = _reference(model, processor, adapter, image, question, layers)
        got = {name: torch.from_numpy(values[row]) for name, values in result.features.items()}
        close = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["vision_only"], ref["vision_only_hook"], **close)
        torch.testing.assert_close(got["vision_only"], ref["vision_only_tower"], **close)
        torch.testing.assert_close(got["vision_projected"], ref["vision_projected_hook"], **close)
        torch.testing.assert_close(got["vision_projected"], ref["vision_projected_embeds"], **close)
        for layer in layers[:-1]:
            for group in ("vision_token", "vision_token_mean", "query_token"):
                torch.testing.assert_close(got[f"{group}/layer_{layer}"], ref[f"{group}/layer_{layer}"], **close)
        with torch.no_grad():
            torch.testing.assert_close(
                norm(got[f"query_token/layer_{last}"]), ref[f"normed_query/layer_{last}"], **close
            )
            torch.testing.assert_close(
                norm(got[f"vision_token/layer_{last}"]), ref[f"normed_vision/layer_{last}"], **close
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance_and_generation_equal_generate(family, loaded, vqa_set):
    model, processor = loaded(family)
    adapter = adapter_for(model, processor)
    extractor = FeatureExtractor(adapter, parse_layers("halp", adapter.num_layers))
    table, images_dir = vqa_set
    samples = read_samples(table)[:5]
    images = [load_image(images_dir, s.image_id) for s in samples]
    questions = [s.question for s in samples]
    batched = extractor(images, questions, max_new_tokens=8)
    for row in range(len(samples)):
        single = extractor(images[row : row + 1], questions[row : row + 1], max_new_tokens=8)
        for name, values in batched.features.items():
            np.testing.assert_allclose(values[row], single.features[name][0], rtol=1e-4, atol=1e-6, err_msg=name)
        # Plain greedy generate, batch of one, no hooks.
        inputs = adapter.encode(images[row : row + 1], questions[row : row + 1])
        with torch.no_grad():
            sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert batched.answers[row] == expected.strip()
        assert single.answers[0] == expected.strip()


def test_answers_are_not_trivially_empty(loaded, vqa_set):
    """The equality above must be able to fail: random weights produce non-empty text."""
    model, processor = loaded("qwen2_vl")
    adapter = adapter_for(model, processor)
    table, images_dir = vqa_set
    samples = read_samples(table)[:3]
    result = FeatureExtractor(adapter, [0])(
        [load_image(images_dir, s.image_id) for s in samples], [s.question for s in samples], max_new_tokens=8
    )
    assert any(answer for answer in result.answers)
