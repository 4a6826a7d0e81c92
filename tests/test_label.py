"""Labeling rules on real-looking answers, manual-label import, the judge's plumbing, labels.csv and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from halp.cli import app
from halp.data import Sample
from halp.label import (
    LABEL_COLUMNS,
    Judge,
    infer_answer_type,
    label_answer,
    label_run,
    parse_label_value,
    parse_verdict,
    read_label_table,
)
from halp.store import rows_for, write_rows
from halp.testing.checkpoints import train_tokenizer

OPTIONS = "Which animal is on the sofa? A. cat B. dog C. bird D. none"

# (question, ground truth, answer) -> (label, answer type). None = unknown.
DECIDED = [
    # yes/no: the polarity the answer opens with, against the ground truth
    ("Is there a beach in the image?", "no", "Yes, there is a beach in the image with people walking.", 1, "yesno"),
    ("Is there a beach in the image?", "No", "no", 0, "yesno"),
    ("Is the forest lit by a full moonlight?", "no", "No, the forest is dark and there is no moon.", 0, "yesno"),
    ("Is there a cat in the image?", "yes", "YES! A cat is sleeping on the sofa.", 0, "yesno"),
    ("Is there a cat in the image?", "yes", "No, I don't see any cat.", 1, "yesno"),
    ("Is there a cat in the image?", "Yes.", "Yes", 0, "yesno"),
    # numbers: digits or words, one stated number
    ("How many dogs are there in the picture?", "2", "There are two dogs.", 0, "number"),
    ("How many dogs are there in the picture?", "two", "2", 0, "number"),
    ("How many dogs are there in the picture?", "3", "There are 4 dogs playing.", 1, "number"),
    ("How many people are on the boat?", "0", "None.", 0, "number"),
    ("How many boats are there?", "1,000", "About 1000 boats.", 0, "number"),
    # multiple choice: the letter, or the option's text
    (OPTIONS, "B", "B", 0, "choice"),
    (OPTIONS, "B", "(B) dog", 0, "choice"),
    (OPTIONS, "B", "The answer is A.", 1, "choice"),
    (OPTIONS, "B", "dog", 0, "choice"),
    (OPTIONS, "(C)", "cat", 1, "choice"),
    # short answers: normalized match, offered alternatives, colours
    ("What color is the car?", "red", "The car is red.", 0, "short"),
    ("What color is the car?", "Red", "red.", 0, "short"),
    ("What color is the car?", "red", "The car is blue.", 1, "short"),
    ("What color is the car?", "grey", "Gray", 0, "short"),
    ("Is the statue on water or a platform?", "platform", "On a platform.", 0, "short"),
    ("Is the statue on water or a platform?", "platform", "The statue stands on the water.", 1, "short"),
    ("Is the picture bright or dark?", "dark", "bright", 1, "short"),
    ("What is on the sofa?", "a cat", "A cat is sitting on the sofa.", 0, "short"),
]

UNDECIDED = [
    ("Is there a beach in the image?", "yes", "There is a beach with people.", "does not start with yes or no"),
    ("Is there a beach in the image?", "yes", "Yes and no, it is partly a beach.", "both polarities"),
    ("Is there a dog?", "no", "It is unclear from the image.", "hedges"),
    ("Is there a beach in the image?", "no", "No doubt, there is a beach.", "idiom"),
    ("Is there a dog?", "no", "I cannot tell whether there is a dog.", "hedges"),
    ("How many dogs are there?", "2", "Two dogs and one cat.", "several numbers"),
    ("How many dogs are there?", "2", "Some dogs.", "no number"),
    (OPTIONS, "B", "A cat is on the sofa.", "no single option"),
    (OPTIONS, "B", "(A) and (B) are both possible", "no single option"),
    ("What color is the car?", "red", "It is not red.", "negation"),
    ("What color is the car?", "red", "Crimson.", "paraphrase"),
    ("What color is the car?", "red", "Red and white.", "other colours"),
    ("What is on the sofa?", "cat", "A kitten.", "paraphrase"),
    ("Describe the image.", "A beach with people, a boat and the blue sea.", "A beach at sunset.", "open-ended"),
    ("What is happening?", "two people are playing tennis on a court", "People play tennis.", "open-ended"),
    ("Is there a dog?", "", "Yes.", "no ground truth"),
    ("Is there a dog?", "yes", "", "empty answer"),
]


@pytest.mark.parametrize(("question", "truth", "answer", "expected", "answer_type"), DECIDED)
def test_rules_decide_clear_answers(question, truth, answer, expected, answer_type):
    label = label_answer(question, truth, answer)
    assert (label.label, label.answer_type) == (expected, answer_type), label.reason
    assert label.method == f"rule:{answer_type}" and label.reason


@pytest.mark.parametrize(("question", "truth", "answer", "why"), UNDECIDED)
def test_rules_leave_doubtful_answers_unknown_with_a_reason(question, truth, answer, why):
    label = label_answer(question, truth, answer)
    assert label.label is None
    assert why in label.reason


def test_answer_types_come_from_the_ground_truth():
    assert infer_answer_type("Is it red?", "Yes") == "yesno"
    assert infer_answer_type("How many?", "three") == "number"
    assert infer_answer_type(OPTIONS, "d") == "choice"
    assert infer_answer_type("Which letter is on the sign?", "B") == "short"  # no options: a letter, not a choice
    assert infer_answer_type("What is it?", "a wooden chair") == "short"
    assert infer_answer_type("What is it?", "a chair made of old dark wood") == "open"
    assert infer_answer_type("Describe the image.", "a cat") == "open"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, 1),
        ("True", 1),
        ("true", 1),
        ("1", 1),
        (1, 1),
        ("1.0", 1),
        ("yes", 1),
        (False, 0),
        ("False", 0),
        (0, 0),
        ("0.0", 0),
        ("no", 0),
        ("", None),
        (float("nan"), None),
        (None, None),
        ("unknown", None),
    ],
)
def test_label_values(value, expected):
    assert parse_label_value(value) == expected


def test_unreadable_label_value_raises():
    with pytest.raises(ValueError, match="not one of"):
        parse_label_value("hallucinated?!")


# ----- runs ------------------------------------------------------------------------------------
ROWS = [
    ("Is there a beach in the image?", "no", "Yes, there is a beach in the image..."),
    ("How many dogs are there?", "2", "There are two dogs."),
    ("Describe the image.", "A beach with people, a boat and the blue sea.", "A snowy mountain."),
    ("What color is the car?", "red", "Crimson."),
    ("Is there a cat?", "yes", ""),
]


def write_run(root: Path, rows: list[tuple[str, str, str]] = ROWS) -> Path:
    samples = [Sample(f"q{i}", f"img{i}.png", q, gt, {"dataset": "toy"}) for i, (q, gt, _) in enumerate(rows)]
    features = {"vision_only": np.zeros((len(rows), 4), dtype=np.float32)}
    root.mkdir(parents=True, exist_ok=True)
    write_rows(root / "features.h5", rows_for(samples, [a for _, _, a in rows], features), {"model_id": "toy"})
    return root


def read_labels(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "labels.csv", dtype=str, keep_default_na=False)


def test_label_run_writes_labels_csv(tmp_path):
    run_dir = write_run(tmp_path / "run")
    summary = label_run(run_dir)
    frame = read_labels(run_dir)
    assert tuple(frame.columns) == LABEL_COLUMNS
    assert frame["question_id"].tolist() == ["q0", "q1", "q2", "q3", "q4"]
    assert frame["label"].tolist() == ["1", "0", "", "", ""]
    assert frame["answer_type"].tolist() == ["yesno", "number", "open", "short", "yesno"]
    assert frame["method"].tolist()[:2] == ["rule:yesno", "rule:number"]
    assert all(frame.loc[frame["label"] == "", "reason"] != "")
    assert (summary.total, summary.labelled, summary.positives) == (5, 2, 1)
    # What `halp probe` reads back: the same 1/0/unknown values.
    labels, column = read_label_table(run_dir / "labels.csv", None)
    assert column == "label" and labels == {"q0": 1, "q1": 0, "q2": None, "q3": None, "q4": None}


def test_manual_labels_import_the_halp_review_csv_as_is(tmp_path):
    run_dir = write_run(tmp_path / "run")
    review = tmp_path / "qwen25vl_manually_reviewed.csv"
    pd.DataFrame(
        {
            "question_id": ["q0", "q1", "q2", "q3", "other"],
            "model_answer": ["..."] * 5,
            "ground_truth_answer": ["..."] * 5,
            "is_hallucinating_manual": ["True", "False", "", "true", "False"],
        }
    ).to_csv(review, index=False)
    summary = label_run(run_dir, labels=review)
    frame = read_labels(run_dir)
    assert frame["label"].tolist() == ["1", "0", "", "1", ""]
    assert set(frame["method"]) == {"manual"}
    assert "not in" in frame["reason"].iloc[4] and "empty in" in frame["reason"].iloc[2]
    assert summary.label_column == "is_hallucinating_manual" and summary.unmatched_manual == 1

    pd.DataFrame({"question_id": ["q0", "q0"], "label": ["1", "0"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="conflicting"):
        label_run(run_dir, labels=tmp_path / "bad.csv")
    pd.DataFrame({"question_id": ["q0"], "verdict": ["1"]}).to_csv(tmp_path / "nocol.csv", index=False)
    with pytest.raises(ValueError, match="name one with label_column="):  # the CLI shows it as --label-column
        label_run(run_dir, labels=tmp_path / "nocol.csv")


# ----- the judge ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("HALLUCINATED", (1, True)),
        ("  correct.", (0, True)),
        ("**Hallucinated** because", (1, True)),
        ("UNSURE", (None, True)),
        ("INCORRECT", (None, False)),
        ("The answer is CORRECT", (None, False)),
        ("", (None, False)),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def build_judge(path: Path, reply_word: str) -> Path:
    """A tiny random-weight Llama whose greedy reply is `reply_word` then end-of-text.

    Attention and MLP outputs are zeroed so each position's last hidden state is its token's
    embedding: every token embeds to e0 except `reply_word` (e1); the head maps e0 -> reply_word
    and e1 -> EOS. Everything else is a real LlamaForCausalLM saved and loaded by the Auto classes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([reply_word])  # an ordinary token: it decodes into the reply
    word, eos = tokenizer.convert_tokens_to_ids(reply_word), tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.zero_()
        embeddings[:, 0] = 1.0
        embeddings[word] = 0.0
        embeddings[word, 1] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[word, 0] = 10.0
        head[eos, 1] = 10.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("word", "label", "reason"),
    [
        ("HALLUCINATED", 1, "judge says HALLUCINATED: 'HALLUCINATED'"),
        ("CORRECT", 0, "judge says CORRECT"),
        ("UNSURE", None, "judge unsure: 'UNSURE'"),
        ("banana", None, "judge reply not understood: 'banana'"),
    ],
)
def test_judge_labels_what_the_rules_leave_unknown(tmp_path, word, label, reason):
    run_dir = write_run(tmp_path / "run")
    judge = Judge.load(str(build_judge(tmp_path / "judge", word)), device="cpu")
    assert judge.reply("Is it red?", "red", "blue") == word
    label_run(run_dir, judge=judge)
    frame = read_labels(run_dir)
    # Rule-decided rows keep their rule label; the open (q2) and paraphrased short (q3) rows go to the judge;
    # the empty answer (q4) is never sent.
    assert frame["label"].tolist()[:2] == ["1", "0"]
    for index in (2, 3):
        assert frame["label"].iloc[index] == ("" if label is None else str(label))
        assert frame["method"].iloc[index] == f"judge:{tmp_path / 'judge'}"
        assert reason in frame["reason"].iloc[index]
    assert frame["method"].iloc[4] == "none"


def test_cli_label_with_judge_and_manual_labels(tmp_path):
    run_dir = write_run(tmp_path / "run")
    judge_dir = build_judge(tmp_path / "judge", "HALLUCINATED")
    result = CliRunner().invoke(app, ["label", str(run_dir), "--judge", str(judge_dir)])
    assert result.exit_code == 0, result.output
    assert "4 of 5 labelled" in result.output and "labels.csv" in result.output
    assert read_labels(run_dir)["label"].tolist() == ["1", "0", "1", "1", ""]

    review = tmp_path / "review.csv"
    pd.DataFrame({"question_id": ["q0", "q1"], "is_hallucinating_manual": ["False", "True"]}).to_csv(review)
    result = CliRunner().invoke(app, ["label", str(run_dir), "--labels", str(review)])
    assert result.exit_code == 0, result.output
    assert "is_hallucinating_manual" in result.output and "2 of 5 labelled" in result.output
    both = CliRunner().invoke(app, ["label", str(run_dir), "--labels", str(review), "--judge", str(judge_dir)])
    assert both.exit_code == 2
    missing = CliRunner().invoke(app, ["label", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "features.h5" in missing.output
