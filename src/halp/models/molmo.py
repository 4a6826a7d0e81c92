"""Molmo (hub remote code, `model_type` "molmo": Molmo-7B-O-0924, Molmo-7B-D-0924, MolmoE-1B-0924).

Only behind `--trust-remote-code`: transformers has no native class for it. The checkpoint's own
code (`modeling_molmo.py`) lays the model out as
  model.vision_backbone: image_vit -> pad embeds -> 2x2 attention pooling (image_pooling_2d)
                         -> image_projector (MLP)          <- the projector halp hooks
  model.transformer:     wte, blocks (ModuleList of decoder blocks), ln_f (final norm)
and adds the projected features to the embeddings at the sequence positions listed in
`image_input_idx` (batch, crops, tokens per crop; -1 = no position: overlap margins and padding
crops). The processor is not a standard one either: `processor.process(text=..., images=...)`
returns one unbatched sample (it wraps the text as " User: ... Assistant:" and prepends EOS as
BOS), so halp batches samples itself, left-padded, shifting `image_input_idx` by each row's padding.

Positions come from `image_input_idx`, not from token ids: the image positions of a row are its
valid indices (they hold `<im_patch>` tokens), the last image token is the largest one. The
projector's input and output are (batch, crops, tokens per crop, dim); a sample's rows are those
whose `image_input_idx` is valid, so `vision_only` is the mean of the pooled ViT features (the
concatenated `vit_layers` [-2, -9] after 2x2 attention pooling) that reach the LM, and
`vision_projected` the mean of what is added to the embeddings.

Not verified offline: the checkpoint cannot be downloaded here, so the module paths above are
read from its published code, and its `generate` (written for transformers 4.4x) has not been run
under the installed transformers. The batching and position logic is tested on synthetic tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from halp.models.base import Adapter, ExtractionPointError, Positions

#: Molmo's image placeholder, one per pooled 2x2 patch window placed in the sequence.
IMAGE_PATCH_TOKEN = "<im_patch>"
#: Molmo's fill value for absent crops, pixels and indices.
MOLMO_PAD = -1


def collate_left_padded(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch unbatched `processor.process` outputs: tokens left-padded, crops padded with -1.

    Left padding shifts every token, so each valid `image_input_idx` moves by its row's padding.
    """
    if not samples:
        raise ValueError("no samples to batch")
    length = max(int(sample["input_ids"].shape[0]) for sample in samples)
    crops = max(int(sample["images"].shape[0]) for sample in samples)
    batch: dict[str, list[torch.Tensor]] = {
        "input_ids": [],
        "attention_mask": [],
        "images": [],
        "image_masks": [],
        "image_input_idx": [],
    }
    for sample in samples:
        ids = sample["input_ids"].long()
        padding = length - int(ids.shape[0])
        batch["input_ids"].append(torch.cat([ids.new_full((padding,), pad_token_id), ids]))
        batch["attention_mask"].append(torch.cat([torch.zeros(padding, dtype=torch.long), torch.ones_like(ids)]))
        index = sample["image_input_idx"].long()
        index = torch.where(index >= 0, index + padding, index)
        missing = crops - int(sample["images"].shape[0])
        batch["image_input_idx"].append(_pad_crops(index, missing))
        batch["images"].append(_pad_crops(sample["images"].float(), missing))
        batch["image_masks"].append(_pad_crops(sample["image_masks"].float(), missing))
    return {key: torch.stack(values) for key, values in batch.items()}


def _pad_crops(tensor: torch.Tensor, missing: int) -> torch.Tensor:
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((missing, *tensor.shape[1:]), MOLMO_PAD)])


class MolmoAdapter(Adapter):
    model_types = ("molmo",)
    projector = "model.vision_backbone.image_projector"
    decoder_layers = "model.transformer.blocks"
    final_norm = "model.transformer.ln_f"
    notes = (
        "remote code only (--trust-remote-code); positions from image_input_idx (<im_patch> slots); "
        "vision_only = pooled ViT features entering image_projector; not run offline"
    )

    @property
    def image_token_id(self) -> int:
        token_id = self.tokenizer().convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
        if not isinstance(token_id, int) or token_id == getattr(self.tokenizer(), "unk_token_id", None):
            raise ExtractionPointError(f"the tokenizer has no {IMAGE_PATCH_TOKEN} token; is this a Molmo processor?")
        return token_id

    def image_token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = inputs["input_ids"]
        batch_size, length = input_ids.shape
        index = inputs.get("image_input_idx")
        if index is None:
            raise ExtractionPointError("Molmo inputs have no image_input_idx: cannot tell where the image features go")
        flat = index.reshape(batch_size, -1).long()
        if bool((flat >= length).any()):
            raise ExtractionPointError(f"image_input_idx points past the {length} prompt positions")
        valid = flat >= 0
        rows = torch.arange(batch_size, device=flat.device).unsqueeze(1).expand_as(flat)
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=input_ids.device)
        mask[rows[valid], flat[valid]] = True
        if int(mask.sum()) != int(valid.sum()):
            raise ExtractionPointError("image_input_idx lists a sequence position twice")
        return mask

    def prompt(self, question: str) -> str:
        # processor.process applies Molmo's own format (" User: ... Assistant:"); there is no chat template.
        return question

    def encode(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        samples = [
            self.processor.process(text=self.prompt(question), images=image)
            for image, question in zip(images, questions, strict=True)
        ]
        pad_token_id = self.tokenizer().pad_token_id
        if pad_token_id is None:
            raise ExtractionPointError("the Molmo tokenizer has no pad token; cannot left-pad a batch")
        return collate_left_padded(samples, pad_token_id)

    def projector_groups(self, tensor: torch.Tensor, positions: Positions, output: bool) -> list[torch.Tensor]:
        index = positions.inputs.get("image_input_idx")
        if index is None or tuple(tensor.shape[:-1]) != tuple(index.shape):
            raise ExtractionPointError(
                f"{self.projector} saw {tuple(tensor.shape)}, expected (batch, crops, tokens, dim) matching "
                f"image_input_idx {None if index is None else tuple(index.shape)}"
            )
        valid = index.to(tensor.device) >= 0
        return [tensor[row][valid[row]] for row in range(tensor.shape[0])]
