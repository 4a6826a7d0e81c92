"""Molmo (remote code) adapter: batching and position logic on synthetic tensors.

The checkpoint cannot be downloaded here, so no model runs: the samples below have the layout of
Molmo's `processor.process` output (unbatched input_ids, images, image_masks, image_input_idx with
-1 for unused slots), and the checks are on what halp derives from them.
"""

from __future__ import annotations

import pytest
import torch

from halp.capture import Positions
from halp.models import ExtractionPointError, adapter_class_for
from halp.models.molmo import MolmoAdapter, collate_left_padded

PAD, PATCH, COL, BOS = 0, 7, 8, 1
PATCHES, PIXELS, TOKENS = 4, 3, 4  # per crop


def _sample(text_before: int, crops: int, unused: set[tuple[int, int]], text_after: int) -> dict[str, torch.Tensor]:
    """BOS, `text_before` text tokens, then one <im_patch> per used (crop, slot) and a column token per crop,
    then `text_after` text tokens; image_input_idx points at the <im_patch> positions, -1 for unused slots."""
    ids = [BOS] + [20 + i for i in range(text_before)]
    index = torch.full((crops, TOKENS), -1)
    for crop in range(crops):
        for slot in range(TOKENS):
            if (crop, slot) not in unused:
                index[crop, slot] = len(ids)
                ids.append(PATCH)
        ids.append(COL)
    ids += [30 + i for i in range(text_after)]
    images = torch.arange(crops * PATCHES * PIXELS, dtype=torch.float32).reshape(crops, PATCHES, PIXELS)
    return {
        "input_ids": torch.tensor(ids),
        "images": images,
        "image_masks": torch.ones(crops, PATCHES),
        "image_input_idx": index,
    }


class _Tokenizer:
    pad_token_id = PAD
    unk_token_id = 3

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<im_patch>": PATCH}.get(token, self.unk_token_id)


class _Processor:
    """Molmo's processor interface: process(text=..., images=...) -> one unbatched sample."""

    def __init__(self, samples: dict[str, dict[str, torch.Tensor]]) -> None:
        self.tokenizer = _Tokenizer()
        self.samples = samples
        self.seen: list[tuple[str, object]] = []

    def process(self, text: str, images: object) -> dict[str, torch.Tensor]:
        self.seen.append((text, images))
        return self.samples[text]


SHORT = _sample(text_before=1, crops=1, unused=set(), text_after=2)
LONG = _sample(text_before=3, crops=2, unused={(1, 0), (1, 3)}, text_after=4)


def test_registered_for_molmo():
    assert adapter_class_for("molmo") is MolmoAdapter


def test_collate_left_pads_and_shifts_image_positions():
    batch = collate_left_padded([SHORT, LONG], pad_token_id=PAD)
    length = LONG["input_ids"].shape[0]
    padding = length - SHORT["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, length)
    assert batch["input_ids"][0, :padding].eq(PAD).all() and batch["attention_mask"][0, :padding].eq(0).all()
    assert batch["attention_mask"][:, -1].eq(1).all()  # the query token is the last column of every row
    # Every valid index still points at an <im_patch> token, in the padded row too.
    for row in range(2):
        index = batch["image_input_idx"][row].flatten()
        assert batch["input_ids"][row, index[index >= 0]].eq(PATCH).all()
    assert batch["image_input_idx"][0, 0].tolist() == (SHORT["image_input_idx"][0] + padding).tolist()
    # The short sample's missing second crop is Molmo's padding: -1 pixels, masks and indices.
    assert batch["images"].shape == (2, 2, PATCHES, PIXELS)
    assert batch["images"][0, 1].eq(-1).all() and batch["image_masks"][0, 1].eq(-1).all()
    assert batch["image_input_idx"][0, 1].eq(-1).all()


def test_positions_come_from_image_input_idx():
    batch = collate_left_padded([SHORT, LONG], pad_token_id=PAD)
    adapter = MolmoAdapter(model=torch.nn.Module(), processor=_Processor({}))
    positions = Positions.from_inputs(adapter, batch)
    valid = batch["image_input_idx"].reshape(2, -1) >= 0
    assert positions.image_tokens_per_sample == valid.sum(dim=1).tolist() == [4, 6]
    assert positions.last_image.tolist() == batch["image_input_idx"].reshape(2, -1).max(dim=1).values.tolist()
    # Unused slots hold no position, so the mask equals the <im_patch> tokens exactly.
    assert torch.equal(positions.image_mask, batch["input_ids"] == PATCH)
    assert positions.query == batch["input_ids"].shape[1] - 1


def test_projector_rows_are_the_valid_slots_of_each_sample():
    batch = collate_left_padded([SHORT, LONG], pad_token_id=PAD)
    adapter = MolmoAdapter(model=torch.nn.Module(), processor=_Processor({}))
    positions = Positions.from_inputs(adapter, batch)
    # Row value encodes (sample, crop, slot), so the selection can be read back.
    codes = torch.tensor([[[100 * b + 10 * c + s for s in range(TOKENS)] for c in range(2)] for b in range(2)])
    features = codes.unsqueeze(-1).float().expand(-1, -1, -1, 5)
    for output in (False, True):
        groups = adapter.projector_groups(features, positions, output)
        assert [group.shape for group in groups] == [(4, 5), (6, 5)]
        assert groups[0][:, 0].tolist() == [0, 1, 2, 3]  # crop 0 only; crop 1 is padding
        assert groups[1][:, 0].tolist() == [100, 101, 102, 103, 111, 112]  # slots (1,0) and (1,3) unused
    with pytest.raises(ExtractionPointError, match="expected \\(batch, crops, tokens, dim\\)"):
        adapter.projector_groups(features[:, :1], positions, output=False)


def test_encode_uses_molmo_process_per_sample():
    processor = _Processor({"q short": SHORT, "q long": LONG})
    adapter = MolmoAdapter(model=torch.nn.Module(), processor=processor)
    batch = adapter.encode(["image a", "image b"], ["q short", "q long"])
    assert processor.seen == [("q short", "image a"), ("q long", "image b")]
    assert torch.equal(batch["input_ids"], collate_left_padded([SHORT, LONG], PAD)["input_ids"])
    assert adapter.image_token_id == PATCH


def test_bad_image_input_idx_is_refused():
    batch = collate_left_padded([SHORT], pad_token_id=PAD)
    adapter = MolmoAdapter(model=torch.nn.Module(), processor=_Processor({}))
    beyond = dict(batch, image_input_idx=batch["image_input_idx"] + batch["input_ids"].shape[1])
    with pytest.raises(ExtractionPointError, match="points past"):
        adapter.image_token_mask(beyond)
    twice = batch["image_input_idx"].clone()
    twice[0, 0, 1] = twice[0, 0, 0]
    with pytest.raises(ExtractionPointError, match="twice"):
        adapter.image_token_mask(dict(batch, image_input_idx=twice))
    with pytest.raises(ExtractionPointError, match="no image_input_idx"):
        adapter.image_token_mask({"input_ids": batch["input_ids"]})


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class RemoteToyConfig(PretrainedConfig):
    model_type = "remote_toy"
"""
REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_remote_toy import RemoteToyConfig


class RemoteToyForCausalLM(PreTrainedModel):
    config_class = RemoteToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(2, 2)
        self.post_init()
"""


def test_remote_code_registering_only_a_causal_lm_class_loads_through_it(tmp_path):
    """Molmo-*-0924's auto_map names AutoModelForCausalLM only; load_model must use it (not ImageTextToText)."""
    import json

    from safetensors.torch import save_file

    from halp.loading import load_model
    from halp.testing.checkpoints import train_tokenizer

    (tmp_path / "configuration_remote_toy.py").write_text(REMOTE_CONFIG)
    (tmp_path / "modeling_remote_toy.py").write_text(REMOTE_MODEL)
    auto_map = {
        "AutoConfig": "configuration_remote_toy.RemoteToyConfig",
        "AutoModelForCausalLM": "modeling_remote_toy.RemoteToyForCausalLM",
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "remote_toy", "auto_map": auto_map}))
    train_tokenizer(["<pad>"], pad_token="<pad>").save_pretrained(tmp_path)
    save_file({"proj.weight": torch.eye(2), "proj.bias": torch.zeros(2)}, tmp_path / "model.safetensors")
    model, _ = load_model(str(tmp_path), device="cpu", dtype="float32", trust_remote_code=True)
    assert type(model).__name__ == "RemoteToyForCausalLM"
