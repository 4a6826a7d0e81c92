"""`halp.Embedder` / `halp embed`: every array equals an independent computation, on tiny checkpoints.

The reference is a plain forward of one image with `output_hidden_states=True` and a hook on the
projector, read at positions found from token ids, as in test_families. Qwen2.5-VL's vision tokens
are checked against the tower run in the processor's patch order (window attention off, identity
window index), which is the unpermuted patch grid.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from halp.cli import app
from halp.data import load_image, read_samples
from halp.embed import Embedder, load_embedding_arrays, write_embeddings

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
PROMPT = "Is there a red shape in the image?"
#: Families whose image placeholders receive exactly the projector's output rows (no newline rows, no tiles' packing).
EMBEDS_EQUAL_PROJECTOR = {"qwen2_5_vl", "qwen2_vl", "llava", "gemma3", "idefics3"}


def _image_paths(vqa_set, n):
    table, images_dir = vqa_set
    return [images_dir / sample.image_id for sample in read_samples(table)[:n]]


def _close(actual, expected, message=""):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected).float(), **CLOSE, msg=message)


def _reference(model, adapter, image):
    """Plain forward of one image: projector input/output rows, hidden states, token positions."""
    inputs = adapter.encode([image], [PROMPT])
    captured = {}
    handle = adapter.projector_module().register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o))
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    handle.remove()
    output = captured["out"] if isinstance(captured["out"], torch.Tensor) else captured["out"][0]
    ids = inputs["input_ids"][0]
    image_positions = torch.nonzero(ids == adapter.image_token_id).flatten()
    text_positions = torch.nonzero(ids != adapter.image_token_id).flatten()
    width_in, width_out = captured["inp"].shape[-1], output.shape[-1]
    return {
        "inputs": inputs,
        "ids": ids,
        "projector_in": captured["inp"].reshape(-1, width_in),
        "projector_out": output.reshape(-1, width_out),
        "hidden": hidden,
        "image": image_positions,
        "text": text_positions,
    }


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava", "gemma3", "idefics3", "llava_next"])
def test_embed_equals_independent_computation(family, loaded, vqa_set):
    model, processor = loaded(family)
    embedder = Embedder(model, processor, layers="all", batch_size=3)
    paths = _image_paths(vqa_set, 3)
    embeddings = embedder.embed_many(paths, PROMPT)  # one batch of three sizes: left padding is exercised
    adapter, last = embedder.adapter, embedder.adapter.num_layers - 1
    norm = adapter.final_norm_module()
    for path, got in zip(paths, embeddings, strict=True):
        ref = _reference(model, adapter, load_image(path.parent, path.name))
        assert got.image == str(path)
        assert got.image_positions == ref["image"].tolist()
        assert got.text_positions == ref["text"].tolist()
        assert got.num_visual_tokens == len(ref["image"]) > 0
        assert got.prompt_length == len(ref["ids"]) and got.query_position == len(ref["ids"]) - 1
        assert got.text_tokens == adapter.tokenizer().convert_ids_to_tokens(ref["ids"][ref["text"]].tolist())

        if family == "qwen2_5_vl":
            # Window order undone: the merger applied to the restored groups gives the rows the LM receives.
            merger = model.model.visual.merger
            with torch.no_grad():
                _close(merger(torch.from_numpy(got["vision_tokens"])), got["projected_tokens"], "merger(vision)")
            rows = ref["projector_in"]
            assert got["vision_tokens"].shape == tuple(rows.shape)
        else:
            _close(got["vision_tokens"], ref["projector_in"], "vision_tokens")
            _close(got["projected_tokens"], ref["projector_out"], "projected_tokens")
        if family in EMBEDS_EQUAL_PROJECTOR:
            _close(got["projected_tokens"], ref["hidden"][0][0, ref["image"]], "projected = LM input at images")
        _close(got["vision_only"], ref["projector_in"].mean(0), "vision_only")
        _close(got["vision_projected"], ref["projector_out"].mean(0), "vision_projected")

        for layer in embedder.layers:
            image_states, text_states = got[f"image_states/layer_{layer}"], got[f"text_states/layer_{layer}"]
            if layer < last:
                state = ref["hidden"][layer + 1][0]
                _close(image_states, state[ref["image"]], f"image_states/{layer}")
                _close(text_states, state[ref["text"]], f"text_states/{layer}")
            else:  # hidden_states[-1] is after the final norm
                with torch.no_grad():
                    _close(norm(torch.from_numpy(image_states)), ref["hidden"][-1][0, ref["image"]])
                    _close(norm(torch.from_numpy(text_states)), ref["hidden"][-1][0, ref["text"]])
            _close(got[f"vision_token/layer_{layer}"], image_states[-1])
            _close(got[f"vision_token_mean/layer_{layer}"], image_states.mean(0))
            _close(got[f"text_token_mean/layer_{layer}"], text_states.mean(0))
            _close(got[f"query_token/layer_{layer}"], text_states[-1])  # the last prompt token is text


def test_qwen2_5_vl_vision_tokens_follow_the_unpermuted_patch_grid(loaded, vqa_set):
    """With full attention everywhere the tower is order-equivariant, so running it with an identity window
    index gives its output in the processor's patch order; the restored vision tokens must equal that."""
    model, processor = loaded("qwen2_5_vl")
    model = copy.deepcopy(model)
    visual = model.model.visual
    visual.fullatt_block_indexes = list(range(len(visual.blocks)))
    embedder = Embedder(model, processor, layers="0")
    permuted = 0
    for path in _image_paths(vqa_set, 6):
        image = load_image(path.parent, path.name)
        got = embedder.embed(image, PROMPT)["vision_tokens"]
        inputs = embedder.adapter.encode([image], [PROMPT])
        pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        rows = pixels.shape[0]
        with torch.no_grad():
            in_grid_order = visual(
                pixels,
                grid_thw=grid,
                window_index=torch.arange(rows // 4),
                cu_window_seqlens=torch.tensor([0, rows], dtype=torch.int32),
            ).last_hidden_state
            window_order = visual(pixels, grid_thw=grid).last_hidden_state
        _close(got, in_grid_order, str(path))
        permuted += not torch.allclose(window_order, in_grid_order, **CLOSE)
    assert permuted >= 2, "the fixture images must span several windows, else the order check is vacuous"


def test_qwen2_vl_vision_tokens_are_the_tower_output_in_processor_order(loaded, vqa_set):
    """Qwen2-VL has no windows: its tower keeps the processor's patch order (2x2 merge groups)."""
    model, processor = loaded("qwen2_vl")
    embedder = Embedder(model, processor, layers="0")
    path = _image_paths(vqa_set, 2)[1]
    image = load_image(path.parent, path.name)
    inputs = embedder.adapter.encode([image], [PROMPT])
    with torch.no_grad():
        tower = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
    got = embedder.embed(image, PROMPT)
    _close(got["vision_tokens"], tower)
    assert "merge groups" in got.vision_token_order


def test_files_manifest_and_pooled_only(tmp_path, loaded, vqa_set):
    model, processor = loaded("llava")
    paths = _image_paths(vqa_set, 3)
    paths.append(paths[0])  # a repeated file name gets its own directory
    embedder = Embedder(model, processor, layers="0,-1", batch_size=2)
    manifest_path = write_embeddings(embedder, paths, tmp_path / "full", prompt=PROMPT, tokens=True)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_type"] == "llava" and manifest["layers"] == [0, embedder.adapter.num_layers - 1]
    directories = [entry["dir"] for entry in manifest["images"]]
    assert len(set(directories)) == 4 and directories[3] == f"{paths[0].stem}-2"
    expected = embedder.embed_many(paths, PROMPT)
    for entry, embedding in zip(manifest["images"], expected, strict=True):
        directory = tmp_path / "full" / entry["dir"]
        image_manifest = json.loads((directory / "manifest.json").read_text())
        arrays = load_embedding_arrays(directory)
        assert set(arrays) == set(embedding.keys())
        for name, values in arrays.items():
            assert image_manifest["arrays"][name]["shape"] == list(values.shape)
            assert image_manifest["arrays"][name]["dtype"] == "float32"
            np.testing.assert_allclose(values, embedding[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert image_manifest["image_token_positions"] == embedding.image_positions
        assert image_manifest["num_visual_tokens"] == entry["num_visual_tokens"] == embedding.num_visual_tokens

    # Pooled only: no token-level files, and a rerun into the same place leaves no stale ones behind.
    write_embeddings(embedder, paths[:1], tmp_path / "full", prompt=PROMPT, tokens=False)
    names = set(load_embedding_arrays(tmp_path / "full" / paths[0].stem))
    assert names and not any(
        name.startswith(("vision_tokens", "projected_tokens", "image_states", "text_states")) for name in names
    )
    assert len(list((tmp_path / "full" / paths[0].stem).glob("*.npy"))) == len(names)


def test_embed_cli(tmp_path, checkpoint_dir, vqa_set):
    paths = _image_paths(vqa_set, 2)
    out = tmp_path / "embeds"
    result = CliRunner().invoke(
        app,
        [
            "embed",
            *map(str, paths),
            "--model",
            str(checkpoint_dir("gemma3")),
            "--layers",
            "1",
            "--save-tokens",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--prompt",
            PROMPT,
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens_saved"] and manifest["layers"] == [1] and manifest["prompt"] == PROMPT
    arrays = load_embedding_arrays(out / paths[1].stem)
    assert arrays["image_states/layer_1"].shape[0] == manifest["images"][1]["num_visual_tokens"]

    missing = CliRunner().invoke(app, ["embed", str(tmp_path / "nope.png"), "--model", "x", "--out", str(out)])
    assert missing.exit_code == 2 and "nope.png" in missing.output


def test_embedder_is_exported_lazily_and_needs_a_processor(loaded):
    import halp
    from halp import embed

    assert halp.Embedder is embed.Embedder
    model, _ = loaded("llava")
    with pytest.raises(ValueError, match="processor"):
        Embedder(model)
