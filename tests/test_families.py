"""Every extracted number equals an independent computation, for every family with a tiny fixture.

The reference is a plain forward of one sample with `output_hidden_states=True`, read at positions
found from token ids (`config.image_token_id`), plus a hook on the projector module. A family whose
model departs from this pattern declares it in QUIRKS (one row) rather than getting a test of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from halp.capture import FeatureExtractor, parse_layers
from halp.data import load_image, read_samples
from halp.models import adapter_for
from halp.testing import available_fixtures

FAMILIES = available_fixtures()
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


@dataclass(frozen=True)
class Quirks:
    """How a family's plain forward differs from the common pattern."""

    #: image_token_id lookup on the config (some configs call it image_token_index).
    image_token_attr: str = "image_token_id"
    #: hidden_states[0] at image positions equals the projector output (no newline/extra tokens).
    embeds_equal_projector: bool = True
    #: An extra, family-specific check: (model, inputs, got_features_of_this_row) -> None.
    extra_check: Callable | None = None
    #: (model, inputs, hidden_states) -> the states the next blocks receive, where the model changes
    #: the residual stream between blocks (Qwen3-VL deepstack); None: hidden_states as they are.
    next_block_states: Callable | None = None
    #: Absolute tolerance of batched vs single features. Gemma-3's sandwich norms add unit-RMS
    #: sublayer outputs, so its states are O(1) and float32 reordering under padding reaches 1e-6.
    batch_atol: float = 1e-6
    #: (inputs, projector input or output) -> the (n, dim) rows its mean covers, where the projector
    #: also sees padding the model never attends to (mllama's padding tiles); None: all rows.
    projector_rows: Callable | None = None
    #: (model, inputs) -> hidden_states as `output_hidden_states` gives them, for a model whose forward
    #: fails with it (Phi-4-multimodal: its nested vision call then gets no hidden states back).
    hidden_states: Callable | None = None


def _qwen_vision_tower(model, inputs, got):
    """The vision tower's output (before the merger) is what vision_only averages."""
    with torch.no_grad():
        tower = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(got["vision_only"], tower.last_hidden_state.mean(0), **CLOSE)


def _qwen3_deepstack_states(model, inputs, hidden):
    """Qwen3-VL adds deepstack feature i at image positions after block i; hidden_states hold block outputs."""
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    image_positions = inputs["input_ids"] == model.config.image_token_id
    states = list(hidden)
    assert len(image.deepstack_features) < len(states) - 1, "deepstack reaches the last (normed) state"
    for block, features in enumerate(image.deepstack_features):
        states[block + 1] = states[block + 1].clone()
        states[block + 1][image_positions] += torch.cat(features)
    return tuple(states)


def _qwen3_deepstack_check(model, inputs, got):
    """Stored states are what block k+1 receives (a pre-hook on it), and differ from block k's output."""
    _qwen_vision_tower(model, inputs, got)
    blocks = model.model.language_model.layers
    received, block_outputs = {}, {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, k=index: received.__setitem__(k, a[0]))
        for index, block in enumerate(blocks)
    ] + [
        block.register_forward_hook(lambda m, a, o, k=index: block_outputs.__setitem__(k, o))
        for index, block in enumerate(blocks)
    ]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    last_image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()[-1]
    deepstack_blocks = len(model.config.vision_config.deepstack_visual_indexes)
    assert 0 < deepstack_blocks < len(blocks) - 1
    for layer in range(len(blocks) - 1):
        torch.testing.assert_close(got[f"vision_token/layer_{layer}"], received[layer + 1][0, last_image], **CLOSE)
        torch.testing.assert_close(got[f"query_token/layer_{layer}"], block_outputs[layer][0, -1], **CLOSE)
        # Separate computations: "equal" means within CLOSE, on any CPU (exact equality depends on the kernels).
        differs = not torch.allclose(got[f"vision_token/layer_{layer}"], block_outputs[layer][0, last_image], **CLOSE)
        assert differs == (layer < deepstack_blocks), f"layer {layer}: deepstack follows blocks < {deepstack_blocks}"


def _idefics3_global_thumbnail(model, inputs, got):
    """The last <image> token is the global thumbnail's (the last tile, tagged <global-img>), not a crop's."""
    from transformers import AutoTokenizer

    global_tag = AutoTokenizer.from_pretrained(model.name_or_path).convert_tokens_to_ids("<global-img>")
    ids, tiles = inputs["input_ids"][0], inputs["pixel_values"][0]
    assert tiles.shape[0] > 1, "the fixture must split images into crops + thumbnail, else this check is vacuous"
    assert bool(inputs["pixel_attention_mask"].all())
    image_positions = torch.nonzero(ids == model.config.image_token_id).flatten()
    per_tile = len(image_positions) // tiles.shape[0]
    thumbnail = image_positions[-per_tile:]
    assert thumbnail.tolist() == list(range(int(thumbnail[0]), int(thumbnail[0]) + per_tile))
    assert int(ids[thumbnail[0] - 1]) == global_tag
    with torch.no_grad():
        tower = model.model.vision_model(pixel_values=tiles).last_hidden_state
        thumbnail_embeds = model.model.connector(tower[-1:])[0]
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    torch.testing.assert_close(got["vision_only"], tower.mean(dim=(0, 1)), **CLOSE)
    torch.testing.assert_close(embeds[thumbnail], thumbnail_embeds, **CLOSE)


def _fast_vlm_tower_grid(model, inputs, got):
    """Native FastVLM: one <image> per FastViT-HD output cell (no in-model expansion); vision_only = cell mean."""
    with torch.no_grad():
        grid = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
    cells = grid.shape[-2] * grid.shape[-1]
    assert cells > 1
    # A vanishing or constant tower output would make every vision check pass vacuously.
    assert float(grid.flatten(2).std(dim=-1).mean()) > 1e-2, "the tower's output hardly varies over cells"
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == cells
    torch.testing.assert_close(got["vision_only"], grid[0].flatten(1).mean(dim=1), **CLOSE)


def _mllama_real_tiles(inputs, tensor):
    """The projector's rows of the image's real tiles (aspect_ratio_mask), not the zero padding tiles."""
    return tensor[0, 0, : int(inputs["aspect_ratio_mask"][0, 0].sum())].reshape(-1, tensor.shape[-1])


def _mllama_cross_attention(model, inputs, got):
    """The image enters only through the cross-attention blocks, which count in the layer index."""
    blocks, text_config = model.model.language_model.layers, model.config.text_config
    cross = sorted(text_config.cross_attention_layers)
    assert len(blocks) == text_config.num_hidden_layers
    assert [type(block).__name__.startswith("MllamaCrossAttention") for block in blocks] == [
        index in cross for index in range(len(blocks))
    ]
    with torch.no_grad():
        tower = model.model.vision_model(
            inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
        ).last_hidden_state
        projected = model.model.multi_modal_projector(tower)
    real_tiles = _mllama_real_tiles(inputs, tower)
    torch.testing.assert_close(got["vision_only"], real_tiles.mean(0), **CLOSE)
    torch.testing.assert_close(got["vision_projected"], _mllama_real_tiles(inputs, projected).mean(0), **CLOSE)
    if real_tiles.shape[0] < tower[0, 0].reshape(-1, tower.shape[-1]).shape[0]:  # padding tiles are left out
        assert not torch.allclose(got["vision_only"], tower.reshape(-1, tower.shape[-1]).mean(0), **CLOSE)
    # Another image changes nothing before the first cross-attention block and the query token from it on.
    other = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))
    with torch.no_grad():
        states = model(**other, output_hidden_states=True).hidden_states
    for layer in range(cross[0]):
        torch.testing.assert_close(got[f"query_token/layer_{layer}"], states[layer + 1][0, -1], **CLOSE)
    assert not torch.allclose(got[f"query_token/layer_{cross[0]}"], states[cross[0] + 1][0, -1], **CLOSE)


def _internvl_pixel_shuffled_tower(model, inputs, got):
    """vision_only = mean of the tower's last layer without CLS, 2x2 pixel-shuffled: block (dy, dx) of the
    projector input is the mean over patches at row parity dy and column parity dx, over all tiles."""
    tiles = inputs["pixel_values"]
    assert tiles.shape[0] > 1, "the fixture must tile images, else the per-image split is not exercised"
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=tiles).last_hidden_state
    patches = tower[:, 1:]  # drop CLS
    side = int(patches.shape[1] ** 0.5)
    grid = patches.reshape(tiles.shape[0], side, side, -1)
    expected = torch.cat([grid[:, dy::2, dx::2].mean(dim=(0, 1, 2)) for dy in (0, 1) for dx in (0, 1)])
    torch.testing.assert_close(got["vision_only"], expected, **CLOSE)
    from transformers import AutoTokenizer

    ids = inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == model.config.image_token_id).flatten()
    assert len(image_positions) == tiles.shape[0] * model.config.image_seq_length
    # The last image token is the last <IMG_CONTEXT>, right before </img> (which is not an image token).
    end_image = AutoTokenizer.from_pretrained(model.name_or_path).convert_tokens_to_ids("</img>")
    assert int(ids[image_positions[-1] + 1]) == end_image


def _llava_selected_vision_layer(model, inputs, got):
    """vision_only = CLIP hidden_states[-2] without CLS (the selected layer), not the tower's last output."""
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    tiles = inputs["pixel_values"].flatten(0, -4)  # LLaVA-NeXT: (1, tiles, C, H, W) -> (tiles, C, H, W)
    with torch.no_grad():
        tower = model.model.vision_tower(tiles, output_hidden_states=True)
    width = tower.last_hidden_state.shape[-1]
    torch.testing.assert_close(got["vision_only"], tower.hidden_states[-2][:, 1:].reshape(-1, width).mean(0), **CLOSE)
    for wrong in (tower.hidden_states[-1][:, 1:], tower.hidden_states[-2]):  # last layer; CLS kept
        assert not torch.allclose(got["vision_only"], wrong.reshape(-1, width).mean(0), **CLOSE)


def _llava_anyres_packing(model, inputs, got):
    """Any-resolution: the placeholders receive the packed features (unpadded crops + image_newline rows,
    OneVision down-sampled), not the projector rows; vision_* features average the projector over all tiles."""
    tiles = inputs["pixel_values"][0]  # a batch of one is padded to its own tile count
    ids = inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == model.config.image_token_id).flatten()
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert tiles.shape[0] > 1, "the fixture must tile images, else the per-sample tile split is not exercised"
    assert len(image_positions) != tiles.shape[0] * patches, "placeholders happen to match the projector rows"
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    torch.testing.assert_close(embeds[image_positions], torch.cat(packed), **CLOSE)
    # The last image token closes the last feature row: it is the learned newline, not an image feature.
    torch.testing.assert_close(embeds[image_positions[-1]], model.model.image_newline, **CLOSE)


def _llava_next_check(model, inputs, got):
    _llava_selected_vision_layer(model, inputs, got)
    _llava_anyres_packing(model, inputs, got)


def _llava_onevision_check(model, inputs, got):
    """As LLaVA-NeXT, but SigLIP's last layer (no CLS) *before* its post-layernorm feeds the projector."""
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-1, "full")
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True)
    width = tower.last_hidden_state.shape[-1]
    torch.testing.assert_close(got["vision_only"], tower.hidden_states[-1].reshape(-1, width).mean(0), **CLOSE)
    assert not torch.allclose(got["vision_only"], tower.last_hidden_state.reshape(-1, width).mean(0), **CLOSE)
    _llava_anyres_packing(model, inputs, got)


def _gemma3_soft_tokens(model, inputs, got):
    """Placeholders are the soft tokens between <start_of_image> and <end_of_image>; one <bos>; image tokens
    attend bidirectionally (token_type_ids), so a causal forward gives other image states."""
    config, ids = model.config, inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == config.image_token_id).flatten()
    assert len(image_positions) == config.mm_tokens_per_image
    assert int(ids[image_positions[0] - 1]) == config.boi_token_id
    assert int(ids[image_positions[-1] + 1]) == config.eoi_token_id
    assert int(ids[0]) == config.text_config.bos_token_id
    assert int((ids == config.text_config.bos_token_id).sum()) == 1, "the template's <bos> was doubled"
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, output_hidden_states=True)
    torch.testing.assert_close(got["vision_only"], tower[0].mean(0), **CLOSE)
    assert float(got["vision_projected"].abs().mean()) > 1e-3, "zero projector output: vision checks are vacuous"
    causal_mean = causal.hidden_states[1][0, image_positions].mean(0)
    assert not torch.allclose(got["vision_token_mean/layer_0"], causal_mean, **CLOSE)


def _molmo2_check(model, inputs, got):
    """Molmo2 adds the pooled features to the <im_patch> embeddings; vision_only is the mean over all crops'
    patches of the two concatenated ViT layers; the last <im_patch> closes the high-res grid."""
    from transformers import AutoTokenizer

    image_token = model.config.image_token_id
    ids = inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == image_token).flatten()
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"]
        )
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
        placeholder = model.get_input_embeddings()(torch.tensor([image_token]))[0]
    projected = torch.cat(features.pooler_output)
    assert projected.shape[0] == len(image_positions)
    torch.testing.assert_close(embeds[image_positions] - placeholder, projected, **CLOSE)
    assert not torch.allclose(embeds[image_positions], projected, **CLOSE)  # the residual is really there
    layers = model.config.adapter_config.vision_feature_layer
    concatenated = torch.cat([tower[layer + 1 if layer >= 0 else layer] for layer in layers], dim=-1)
    assert inputs["pixel_values"].shape[0] == int(inputs["image_num_crops"][0]) > 1
    torch.testing.assert_close(got["vision_only"], concatenated.reshape(-1, concatenated.shape[-1]).mean(0), **CLOSE)
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    high_res_start = torch.nonzero(ids == tokenizer.convert_tokens_to_ids("<im_start>")).flatten()[-1]
    low_res_start = torch.nonzero(ids == tokenizer.convert_tokens_to_ids("<low_res_im_start>")).flatten()[-1]
    assert low_res_start < high_res_start < image_positions[-1]
    assert int(ids[image_positions[-1] + 1]) == tokenizer.convert_tokens_to_ids("<im_col>")


def _phi4_hidden_states(model, inputs):
    """Embeddings (input of block 0), block outputs, the last one through the final norm: from hooks."""
    blocks, states = model.model.layers, {}
    handles = [blocks[0].register_forward_pre_hook(lambda m, a: states.__setitem__(-1, a[0]))]
    handles += [
        block.register_forward_hook(lambda m, a, o, k=index: states.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for index, block in enumerate(blocks)
    ]
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: states.__setitem__(len(blocks), o)))
    model(**inputs)
    for handle in handles:
        handle.remove()
    return (*(states[index] for index in range(-1, len(blocks) - 1)), states[len(blocks)])


def _phi4_lora_and_vision(model, inputs, got):
    """The vision LoRA of vision-lora/ is loaded and active (it changes the states); the tower is bidirectional."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    saved = load_file(f"{model.name_or_path}/vision-lora/adapter_model.safetensors")
    loaded = {name: value for name, value in model.named_parameters() if ".lora_" in name}
    assert len(saved) == len(loaded) > 0
    for name, value in saved.items():
        key = name.removeprefix("base_model.model.").replace(".weight", ".vision.weight")
        torch.testing.assert_close(loaded[key], value)
    tuners = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert all(tuner.active_adapters == ["vision"] and not tuner.disable_adapters for tuner in tuners)
    try:
        for tuner in tuners:
            tuner.enable_adapters(False)
        with torch.no_grad():
            without_lora = _phi4_hidden_states(model, inputs)
    finally:
        for tuner in tuners:
            tuner.enable_adapters(True)
    assert not torch.allclose(got["query_token/layer_0"], without_lora[1][0, -1], **CLOSE)
    tower = model.model.embed_tokens_extend.image_embed.img_processor
    assert not any(getattr(module, "is_causal", False) for module in tower.modules())


QUIRKS: dict[str, Quirks] = {
    "qwen2_vl": Quirks(extra_check=_qwen_vision_tower),
    "qwen2_5_vl": Quirks(extra_check=_qwen_vision_tower),
    "qwen3_vl": Quirks(extra_check=_qwen3_deepstack_check, next_block_states=_qwen3_deepstack_states),
    "qwen3_vl_moe": Quirks(extra_check=_qwen3_deepstack_check, next_block_states=_qwen3_deepstack_states),
    "internvl": Quirks(extra_check=_internvl_pixel_shuffled_tower),
    "molmo2": Quirks(embeds_equal_projector=False, extra_check=_molmo2_check),
    "idefics3": Quirks(extra_check=_idefics3_global_thumbnail),
    "smolvlm": Quirks(extra_check=_idefics3_global_thumbnail),
    "fast_vlm": Quirks(extra_check=_fast_vlm_tower_grid),
    "phi4_multimodal": Quirks(hidden_states=_phi4_hidden_states, extra_check=_phi4_lora_and_vision),
    "mllama": Quirks(
        embeds_equal_projector=False, projector_rows=_mllama_real_tiles, extra_check=_mllama_cross_attention
    ),
    "llava": Quirks(extra_check=_llava_selected_vision_layer),
    "llava_next": Quirks(embeds_equal_projector=False, extra_check=_llava_next_check),
    "llava_onevision": Quirks(embeds_equal_projector=False, extra_check=_llava_onevision_check),
    "gemma3": Quirks(extra_check=_gemma3_soft_tokens, batch_atol=1e-5),
}


def _image_token_id(model, quirks: Quirks) -> int:
    # Phi-4-multimodal keeps it on vision_config.
    config = model.config
    for holder in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        value = getattr(holder, quirks.image_token_attr, None)
        if isinstance(value, int):
            return value
    raise AssertionError(f"config has no {quirks.image_token_attr}")


def _check_row(model, adapter, image, question, layers, got, quirks: Quirks) -> None:
    inputs = adapter.encode([image], [question])
    image_positions = torch.nonzero(inputs["input_ids"][0] == _image_token_id(model, quirks)).flatten()
    assert len(image_positions) > 0
    captured = {}
    # The output may come from another module than the input (Adapter.projector_output, Phi-4-multimodal).
    handles = [
        adapter.projector_module().register_forward_hook(lambda m, a, o: captured.update(inp=a[0])),
        adapter.projector_output_module().register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    with torch.no_grad():
        if quirks.hidden_states is None:
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        else:
            hidden = quirks.hidden_states(model, inputs)
    for handle in handles:
        handle.remove()
    if quirks.next_block_states is not None:
        hidden = quirks.next_block_states(model, inputs, hidden)
    num_layers = adapter.num_layers
    assert len(hidden) == num_layers + 1

    # A tuple or a transformers ModelOutput (Molmo2's projector): its first tensor.
    projector_out = captured["out"] if isinstance(captured["out"], torch.Tensor) else captured["out"][0]
    rows = quirks.projector_rows or (lambda inputs, tensor: tensor.reshape(-1, tensor.shape[-1]))
    torch.testing.assert_close(got["vision_only"], rows(inputs, captured["inp"]).mean(0), **CLOSE)
    torch.testing.assert_close(got["vision_projected"], rows(inputs, projector_out).mean(0), **CLOSE)
    if quirks.embeds_equal_projector:
        torch.testing.assert_close(got["vision_projected"], hidden[0][0, image_positions].mean(0), **CLOSE)
    for layer in layers:
        if layer < num_layers - 1:
            state = hidden[layer + 1][0]
            torch.testing.assert_close(got[f"vision_token/layer_{layer}"], state[image_positions[-1]], **CLOSE)
            torch.testing.assert_close(got[f"vision_token_mean/layer_{layer}"], state[image_positions].mean(0), **CLOSE)
            torch.testing.assert_close(got[f"query_token/layer_{layer}"], state[-1], **CLOSE)
        else:
            # hidden_states[-1] is after the final norm; compare through that norm.
            norm = adapter.final_norm_module()
            with torch.no_grad():
                torch.testing.assert_close(norm(got[f"query_token/layer_{layer}"]), hidden[-1][0, -1], **CLOSE)
                torch.testing.assert_close(
                    norm(got[f"vision_token/layer_{layer}"]), hidden[-1][0, image_positions[-1]], **CLOSE
                )
    if quirks.extra_check is not None:
        quirks.extra_check(model, inputs, got)


def _batch(vqa_set, n):
    table, images_dir = vqa_set
    samples = read_samples(table)[:n]
    return [load_image(images_dir, s.image_id) for s in samples], [s.question for s in samples]


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_independent_computation(family, loaded, vqa_set):
    model, processor = loaded(family)
    adapter = adapter_for(model, processor)
    layers = parse_layers("all", adapter.num_layers)
    images, questions = _batch(vqa_set, 6)
    assert len({image.size for image in images}) == 6  # several sizes and aspect ratios
    result = FeatureExtractor(adapter, layers)(images, questions, max_new_tokens=0)
    for row, (image, question) in enumerate(zip(images, questions, strict=True)):
        got = {name: torch.from_numpy(values[row]) for name, values in result.features.items()}
        _check_row(model, adapter, image, question, layers, got, QUIRKS.get(family, Quirks()))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance_and_generation_equal_generate(family, loaded, vqa_set):
    model, processor = loaded(family)
    adapter = adapter_for(model, processor)
    extractor = FeatureExtractor(adapter, parse_layers("halp", adapter.num_layers))
    images, questions = _batch(vqa_set, 5)
    batched = extractor(images, questions, max_new_tokens=8)
    atol = QUIRKS.get(family, Quirks()).batch_atol
    for row in range(len(images)):
        single = extractor(images[row : row + 1], questions[row : row + 1], max_new_tokens=8)
        for name, values in batched.features.items():
            np.testing.assert_allclose(values[row], single.features[name][0], rtol=1e-4, atol=atol, err_msg=name)
        # Plain greedy generate, batch of one, no hooks.
        inputs = adapter.encode(images[row : row + 1], questions[row : row + 1])
        with torch.no_grad():
            sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new_tokens = sequences[0, inputs["input_ids"].shape[1] :]
        expected = adapter.tokenizer().decode(new_tokens, skip_special_tokens=True).strip()
        assert batched.answers[row] == expected
        assert single.answers[0] == expected
    assert any(batched.answers), "random weights should produce some text; otherwise the check above is vacuous"
