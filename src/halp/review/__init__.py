"""Manual review: decisions people make in `halp review` (or Label Studio) and how they become labels.

* `decisions`: the append-only log `RUN_DIR/reviews.jsonl`, its state, and the merge into `labels.csv`
  (conflicts, `--resolve latest`, rule-vs-manual agreement, Cohen's kappa between reviewers);
* `label_studio`: tasks for Label Studio, and its JSON export read back as decisions;
* `session`: what the review page shows (rows, rule labels, risk, queues, progress);
* `app`: the Starlette app and the server (needs the `review` extra: starlette, uvicorn).

Only `app` needs the web stack; `halp label` uses `decisions` and `label_studio` alone.
"""
