"""A synthetic visual world and a tiny VLM trained on it offline, so that halp can be studied on real mistakes.

- `halp.world.scene`: procedural scenes of coloured shapes with exact per-object masks and difficulty levels.
- `halp.world.questions`: questions of the study's types with exact answers.
- `halp.world.recipe`: what decides a world model (`WorldModelConfig`, the seeded example streams, the names of what
  training writes).
- `halp.world.scoring`: how a world model is fed and scored (prompt + answer batches, exact-match accuracy).
- `halp.world.model`: a tiny Qwen2-VL trained from scratch on CPU, cached by config hash.
- `halp.world.shipped`: the default recipe's trained weights, shipped with halp, with a manifest of SHA-256s.
- `halp.world.study`: the end-to-end study (extract, label, probe, report) on the trained model's own answers.
"""
