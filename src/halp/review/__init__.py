"""Manual review: decisions people make in `halp review` (or Label Studio) and how they become labels.

* `model`: what a review is: reviewer names, the append-only log `RUN_DIR/reviews.jsonl` and its state, the queues
  and progress (no web code, no run files besides the log);
* `decisions`: the merge of the decisions into `labels.csv` (conflicts, `--resolve latest`, rule-vs-manual
  agreement, Cohen's kappa between reviewers);
* `label_studio`: tasks for Label Studio, and its JSON export read back as decisions;
* `session`: what the review page shows (the run's rows, rule labels, labels.csv, risk) on top of the model;
* `app`: the Starlette app and the server (needs the `review` extra: starlette, uvicorn).

Each depends only on those above it in this list, never on one below. Only `app` needs the web stack; `halp label`
uses `decisions` and `label_studio` alone.
"""
