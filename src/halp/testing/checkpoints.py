"""The tiny-checkpoint registry and tokenizer under the names the tests import; they live in `halp.tiny_checkpoints`
(production code builds its models there: `halp demo`, `halp world`)."""

from halp.tiny_checkpoints import available_fixtures, build_checkpoint
from halp.tiny_checkpoints.common import CORPUS, train_tokenizer

__all__ = ["CORPUS", "available_fixtures", "build_checkpoint", "train_tokenizer"]
