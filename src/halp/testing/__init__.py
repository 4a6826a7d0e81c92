"""Tiny random-weight checkpoints of real architectures, built offline, and a synthetic VQA set.

Used by the test suite, the benchmarks and `halp demo`. A checkpoint is a real `save_pretrained`
directory (model, trained BPE tokenizer, real image processor, chat template) that loads through
`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`, so the real loading path runs.
Each family has one builder module in `halp.testing.builders` defining `FAMILY` and `build(path, **sizes)`.
"""

from halp.testing.checkpoints import available_fixtures, build_checkpoint
from halp.testing.vqa import make_vqa_set

__all__ = ["available_fixtures", "build_checkpoint", "make_vqa_set"]
