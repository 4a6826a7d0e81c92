"""The test kit: tiny checkpoints (built by `halp.tiny_checkpoints`), a synthetic VQA set, published-format
benchmark files, fault injection and run helpers.

Used by the test suite and the benchmarks, never by halp's own modules (tests/test_layering.py checks it). A
checkpoint is a real `save_pretrained` directory that loads through `from_pretrained`, so the real loading path runs.
"""

from halp.testing.vqa import make_vqa_set
from halp.tiny_checkpoints import available_fixtures, build_checkpoint

__all__ = ["available_fixtures", "build_checkpoint", "make_vqa_set"]
