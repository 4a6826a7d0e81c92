"""`halp analyze norms|neighbors`: summaries equal a direct computation from a plain forward, on tiny checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from halp.analyze import (
    ContextualLens,
    VocabularyLens,
    analyze_neighbors,
    analyze_norms,
    neighbors_html,
    norm_stats,
)
from halp.capture import parse_layers
from halp.cli import app
from halp.data import load_image, read_samples
from halp.embed import Embedder, load_embedding_arrays
from halp.errors import install_hint

FAMILIES = ["qwen2_5_vl", "llava", "gemma3"]
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, vqa_set):
    """Three images of different sizes in a folder of their own (the analyses take a folder)."""
    table, images = vqa_set
    folder = tmp_path_factory.mktemp("analyze_images")
    for sample in read_samples(table)[:3]:
        shutil.copy(images / sample.image_id, folder / sample.image_id)
    return folder


def _direct_states(model, adapter, image):
    """Block outputs at every position of a plain one-image forward (hooks on each block: the last block's
    output is before the final norm, which hidden_states[-1] is not), projector rows, image/text positions."""
    inputs = adapter.encode([image], [PROMPT])
    blocks, captured = adapter.layer_modules(), {}
    handles = [
        block.register_forward_hook(
            lambda m, a, o, k=index: captured.__setitem__(k, o[0] if isinstance(o, tuple) else o)
        )
        for index, block in enumerate(blocks)
    ]
    handles.append(adapter.projector_module().register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o)))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    ids = inputs["input_ids"][0]
    image = ids == adapter.image_token_id
    layers = {index: captured[index][0] for index in range(len(blocks))}
    return layers, image, ~image, captured["inp"], captured["out"], inputs


def _norms(rows):
    return torch.linalg.vector_norm(rows.reshape(-1, rows.shape[-1]).double(), dim=-1).numpy()


def _assert_stats(got, norms, what):
    expected = {"count": norms.size, "mean": norms.mean(), "std": norms.std(), "min": norms.min(), "max": norms.max()}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{what} {key}")


def test_norm_stats_is_population_std():
    norms = np.array([3.0, 4.0, 12.0])
    assert norm_stats(norms) == {
        "count": 3,
        "mean": 19 / 3,
        "std": float(np.sqrt(np.mean((norms - 19 / 3) ** 2))),
        "min": 3.0,
        "max": 12.0,
    }
    with pytest.raises(ValueError):
        norm_stats(np.array([]))


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_summary_equals_direct_computation(family, loaded, image_dir, tmp_path):
    model, processor = loaded(family)
    embedder = Embedder(model, processor, layers="all", batch_size=2)  # 3 images: a padded batch and a single
    result = analyze_norms(embedder, image_dir, tmp_path, prompt=PROMPT, save_features=True)
    summary = json.loads(result.summary_path.read_text())
    assert result.plot_path.read_bytes().startswith(b"\x89PNG")
    paths = sorted(image_dir.iterdir())
    assert [entry["image"] for entry in summary["images"]] == [str(path) for path in paths]
    pooled: dict[str, list[np.ndarray]] = {}
    for path, entry in zip(paths, summary["images"], strict=True):
        layers, image, text, projector_in, projector_out, _ = _direct_states(
            model, embedder.adapter, load_image(path.parent, path.name)
        )
        assert entry["num_visual_tokens"] == int(image.sum()) and entry["num_text_tokens"] == int(text.sum())
        direct = {"projector_input": _norms(projector_in), "projector_output": _norms(projector_out)}
        for layer, state in layers.items():
            direct[f"{layer}/vision"], direct[f"{layer}/text"] = _norms(state[image]), _norms(state[text])
        _assert_stats(entry["projector_input"], direct["projector_input"], "projector input")
        _assert_stats(entry["projector_output"], direct["projector_output"], "projector output")
        assert sorted(entry["layers"], key=int) == [str(layer) for layer in layers]
        for layer in layers:
            for kind in ("vision", "text"):
                _assert_stats(entry["layers"][str(layer)][kind], direct[f"{layer}/{kind}"], f"layer {layer} {kind}")
        for key, norms in direct.items():
            pooled.setdefault(key, []).append(norms)
        features = load_embedding_arrays(result.features_dir / path.stem)
        np.testing.assert_allclose(
            _norms(torch.from_numpy(features["image_states/layer_0"])), direct["0/vision"], rtol=1e-5
        )
    for layer in range(embedder.adapter.num_layers):
        for kind in ("vision", "text"):
            _assert_stats(
                summary["all_images"]["layers"][str(layer)][kind],
                np.concatenate(pooled[f"{layer}/{kind}"]),
                f"all images, layer {layer} {kind}",
            )
    # Not vacuous: the vision-token norms differ from layer to layer.
    means = [
        summary["all_images"]["layers"][str(layer)]["vision"]["mean"] for layer in range(embedder.adapter.num_layers)
    ]
    assert len(set(np.round(means, 6))) == len(means)


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbors_of_a_token_embedding_return_that_token_first(family, loaded):
    model, processor = loaded(family)
    embedder = Embedder(model, processor, layers="0")
    lens = VocabularyLens(embedder.adapter)
    matrix = model.get_input_embeddings().weight.detach()
    tokenizer = embedder.adapter.tokenizer()
    chosen = [tokenizer.convert_tokens_to_ids(token) for token in tokenizer.tokenize(" red cat")] + [5, 77, 399]
    scores, ids = lens.embedding_lens(matrix[chosen].numpy() * 3.0, top_k=4)  # scale changes no cosine
    assert ids[:, 0].tolist() == chosen
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    assert (scores[:, 1] < 1.0 - 1e-4).all()
    table = lens.table(scores, ids)
    assert table[0][0]["token"] == tokenizer.decode([chosen[0]]) and table[0][0]["id"] == chosen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_of_the_last_layer_is_the_models_next_token(family, loaded, image_dir):
    """Final norm + LM head on the last block's query state reproduces the model's own logits."""
    model, processor = loaded(family)
    embedder = Embedder(model, processor, layers="-1")
    path = sorted(image_dir.iterdir())[0]
    got = embedder.embed(path, PROMPT)
    logits, ids = VocabularyLens(embedder.adapter).logit_lens(got[f"query_token/layer_{embedder.layers[0]}"], 5)
    inputs = embedder.adapter.encode([load_image(path.parent, path.name)], [PROMPT])
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1].topk(5)
    assert ids[0].tolist() == expected.indices.tolist()
    np.testing.assert_allclose(logits[0], expected.values.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbors_json_equals_direct_computation(family, loaded, image_dir, tmp_path):
    model, processor = loaded(family)
    embedder = Embedder(model, processor, layers="0,-1", batch_size=3)
    result = analyze_neighbors(embedder, image_dir, tmp_path, top_k=3, prompt=PROMPT, limit=2)
    summary = json.loads(result.json_path.read_text())
    assert summary["lenses"] == ["embedding", "logit_lens"] and len(summary["images"]) == 2
    unit_vocabulary = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    head, norm = model.get_output_embeddings(), embedder.adapter.final_norm_module()
    tokenizer = embedder.adapter.tokenizer()
    for path, entry in zip(sorted(image_dir.iterdir())[:2], summary["images"], strict=True):
        layers, image, _, _, _, _ = _direct_states(model, embedder.adapter, load_image(path.parent, path.name))
        assert entry["image_token_positions"] == torch.nonzero(image).flatten().tolist()
        for layer in embedder.layers:
            states = layers[layer][image]
            cosine = torch.nn.functional.normalize(states, dim=-1) @ unit_vocabulary.T
            with torch.no_grad():
                logits = head(norm(states))
            for lens, scores in (("embedding", cosine), ("logit_lens", logits)):
                rows = entry["layers"][str(layer)][lens]
                assert len(rows) == int(image.sum())
                top = scores.topk(3, dim=-1)
                assert [[n["id"] for n in row] for row in rows] == top.indices.tolist(), (layer, lens)
                np.testing.assert_allclose(
                    [[n["score"] for n in row] for row in rows], top.values.numpy(), rtol=1e-4, atol=1e-5
                )
                assert rows[0][0]["token"] == tokenizer.decode([rows[0][0]["id"]])
    page = result.html_path.read_text()
    assert page.count("<table>") == 2 * len(embedder.layers) and "<|" not in page  # special tokens are escaped


def test_neighbors_page_escapes_every_string_it_shows():
    """Token texts, contexts, image and model names come from users' files and vocabularies: none is markup."""
    hostile = "<script>alert('x')</script>"
    neighbour = {"id": 7, "token": hostile, "score": 0.5, "context": '"><script>alert(1)</script>', "position": 3,
                 "layer": 0}  # fmt: skip
    summary = {
        "model": '<img src=x onerror="alert(1)">', "top_k": 1, "lenses": ["embedding", "contextual"],
        "images": [{"image": "a&b<i>.png", "num_visual_tokens": 1, "image_token_positions": [5],
                    "layers": {"0": {"embedding": [[neighbour]], "contextual": [[neighbour]]}}}],
    }  # fmt: skip
    page = neighbors_html(summary)
    assert "<script" not in page.lower() and "<img" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page and "a&amp;b&lt;i&gt;.png" in page
    # The token is shown as its repr (quotes and all), escaped; the context is an escaped attribute value.
    assert page.count('<code title="&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt; (layer 0)">') == 2
    assert page.count("&#34;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&#34;</code> 0.500") == 2
    assert page.count("<table>") == 1


def test_contextual_lens_without_latentlens_says_how_to_install(loaded, monkeypatch):
    model, processor = loaded("llava")
    monkeypatch.setitem(sys.modules, "latentlens", None)  # makes `import latentlens` raise ImportError
    with pytest.raises(ImportError, match=re.escape(install_hint("latentlens"))):
        ContextualLens(Embedder(model, processor, layers="0").adapter, ["a red cat on the sofa"], [0])


def test_contextual_lens_finds_the_context_a_state_came_from(loaded):
    """A text token's own hidden state (layer k = hidden_states[k+1]) is its own nearest contextual neighbour."""
    pytest.importorskip("latentlens", reason="optional extra: pip install -e '.[latentlens]'")
    model, processor = loaded("qwen2_5_vl")
    adapter = Embedder(model, processor, layers="1").adapter
    corpus = ["Is there a cat in the image? Yes, there is a cat on the sofa.", "The car is red.", "Two dogs."]
    lens = ContextualLens(adapter, corpus, [1])
    tokenizer = adapter.tokenizer()
    ids = tokenizer(corpus[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    position = 5
    best = lens.search(hidden[position], top_k=3)[0][0]
    assert best["token"] == tokenizer.decode([int(ids[0, position])])
    assert best["context"] == corpus[0] and best["position"] == position and best["layer"] == 1
    assert best["score"] == pytest.approx(1.0, abs=1e-4)


def test_analyze_cli(tmp_path, checkpoint_dir, image_dir):
    runner = CliRunner()
    model = str(checkpoint_dir("llava"))
    common = ["--model", model, "--images", str(image_dir), "--device", "cpu", "--dtype", "float32", "--limit", "2"]
    norms = runner.invoke(app, ["analyze", "norms", *common, "--layers", "0,-1", "--out", str(tmp_path / "n")])
    assert norms.exit_code == 0, norms.output
    summary = json.loads((tmp_path / "n" / "norms.json").read_text())
    assert len(summary["images"]) == 2 and list(summary["images"][0]["layers"]) == ["0", str(summary["num_layers"] - 1)]
    assert not (tmp_path / "n" / "features").exists()
    neighbors = runner.invoke(app, ["analyze", "neighbors", *common, "--top-k", "2", "--out", str(tmp_path / "k")])
    assert neighbors.exit_code == 0, neighbors.output
    table = json.loads((tmp_path / "k" / "neighbors.json").read_text())
    assert table["layers"] == parse_layers("halp", summary["num_layers"]) and table["top_k"] == 2
    assert all(len(row) == 2 for row in table["images"][0]["layers"][str(table["layers"][0])]["embedding"])
    bad = runner.invoke(app, ["analyze", "norms", *common, "--layers", "99", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "out of range" in bad.output
