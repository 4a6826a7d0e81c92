"""Label rules that know the sources: each case is a fixture row's question and ground truth with an answer a VLM
might give, and the verdict a careful reader gives it (1 hallucinated, 0 correct). The rules may abstain (unknown)
but must never disagree; coverage and agreement per source are printed (docs/data.md reports them)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from halp.sources.labels import label_with_sources

YES_NO_Q = "Is there a dog in the image?"
CHOICES_Q = "Which shape is largest?\nChoices:\n(A) circle\n(B) square\n(C) triangle"
AMBER_EXTRA = {"hallucinated_objects": ["cat", "frisbee", "person"]}
AMBER_PRESENT = ["dog", "grass", "sky"]
COLLAR = ("What color is the cat's collar?", ["The cat in the picture does not have a collar on"], "false premises")
PLATE = ("What letters are on the license plate?",
         ["The license plate is not visible in the picture.", "We can not see the plate"], "insufficient context")
FINGERS = ("How many fingers does the hand have?", ["Six fingers", "6"], "visually challenging")

# (source, answer_format, question, truth, references, extra, category, answer, human verdict)
CASES = [
    ("pope", "yesno", YES_NO_Q, "yes", ["yes"], {}, "random", "Yes", 0),
    ("pope", "yesno", YES_NO_Q, "yes", ["yes"], {}, "random", "No, there is no dog.", 1),
    ("pope", "yesno", YES_NO_Q, "no", ["no"], {}, "adversarial", "Yes, a dog is on the sofa.", 1),
    ("pope", "yesno", YES_NO_Q, "no", ["no"], {}, "adversarial", "There might be a dog.", 1),
    ("mme", "yesno", "Is this artwork by Monet? Please answer yes or no.", "no", ["no"], {}, "artwork", "No", 0),
    ("mme", "yesno", "Is there a bus? Please answer yes or no.", "yes", ["yes"], {}, "existence", "Yes.", 0),
    ("mme", "yesno", "Is there a boat? Please answer yes or no.", "no", ["no"], {}, "existence", "Yes", 1),
    ("hallusionbench", "yesno", "Is the bar above 10?", "no", ["no", "The bar is below 10."], {}, "chart",
     "No, it is below 10.", 0),
    ("hallusionbench", "yesno", "Is the bar above 10?", "no", ["no", "The bar is below 10."], {}, "chart",
     "Yes, the bar is above 10.", 1),
    ("hallusionbench", "yesno", "Is the bar above 10?", "yes", ["yes", "The bar is above 10."], {}, "chart",
     "It is hard to tell from the chart.", 1),
    ("mathvista", "choice", CHOICES_Q, "B", ["square"], {}, "general-vqa", "B", 0),
    ("mathvista", "choice", CHOICES_Q, "B", ["square"], {}, "general-vqa", "(A) circle", 1),
    ("mathvista", "choice", CHOICES_Q, "B", ["square"], {}, "general-vqa", "square", 0),
    ("mathvista", "number", "The line is about (_) centimeters long.", "7", ["7"], {"unit": "cm", "precision": None},
     "math-targeted-vqa", "7 cm", 0),
    ("mathvista", "number", "The line is about (_) centimeters long.", "7", ["7"], {"unit": "cm", "precision": None},
     "math-targeted-vqa", "About 9 centimeters.", 1),
    ("mathvista", "number", "What is the slope?", "1.45", ["1.45"], {"unit": "", "precision": 2},
     "math-targeted-vqa", "The slope is 1.449", 0),
    ("mathvista", "number", "What is the slope?", "1.45", ["1.45"], {"unit": "", "precision": 2},
     "math-targeted-vqa", "1.5", 1),
    ("mathvista", "number", "What is the slope?", "1.45", ["1.45"], {"unit": "", "precision": 2},
     "math-targeted-vqa", "Rise 3 over run 2, so 1.5", 1),
    ("mathvista", "text", "List the labels from left to right.", "[a, b]", ["[a, b]"], {}, "general-vqa", "a, b", 0),
    ("haloquest", "open", COLLAR[0], COLLAR[1][0], COLLAR[1], {}, COLLAR[2], "The collar is red.", 1),
    ("haloquest", "open", COLLAR[0], COLLAR[1][0], COLLAR[1], {}, COLLAR[2], "The cat is not wearing a collar.", 0),
    ("haloquest", "open", PLATE[0], PLATE[1][0], PLATE[1], {}, PLATE[2], "ABC 123", 1),
    ("haloquest", "open", PLATE[0], PLATE[1][0], PLATE[1], {}, PLATE[2], "The plate cannot be seen.", 0),
    ("haloquest", "open", FINGERS[0], FINGERS[1][0], FINGERS[1], {}, FINGERS[2], "six fingers", 0),
    ("haloquest", "open", FINGERS[0], FINGERS[1][0], FINGERS[1], {}, FINGERS[2], "The hand has 6 fingers.", 0),
    ("haloquest", "open", FINGERS[0], FINGERS[1][0], FINGERS[1], {}, FINGERS[2], "Five fingers.", 1),
    ("amber", "objects", "Describe this image.", "", AMBER_PRESENT, AMBER_EXTRA, "generative",
     "A dog runs on the grass under a blue sky.", 0),
    ("amber", "objects", "Describe this image.", "", AMBER_PRESENT, AMBER_EXTRA, "generative",
     "A dog chases a frisbee on the grass.", 1),
    ("amber", "objects", "Describe this image.", "", AMBER_PRESENT, AMBER_EXTRA, "generative",
     "A dog on the grass. There is no person around.", 0),
    ("amber", "objects", "Describe this image.", "", AMBER_PRESENT, AMBER_EXTRA, "generative",
     "Two cats sleep near a dog.", 1),
    ("amber", "yesno", "Is there direct contact between the dog and the grass?", "yes", ["yes"], {},
     "discriminative-relation", "Yes", 0),
    ("amber", "yesno", "Is the dog running?", "no", ["no"], {}, "discriminative-attribute-action", "Yes, it is.", 1),
]


def _label(case):
    source, answer_format, question, truth, references, extra, category, answer, _ = case
    return label_with_sources(source, answer_format, question, truth, answer, references, extra, category)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rules_never_disagree_with_the_reader(case):
    item = _label(case)
    assert item.label in (None, case[-1]), item.reason


def test_source_rules_decide_what_generic_rules_cannot():
    """Without the source's rule these would be unknown or wrong: MathVista rounding, HaloQuest's premise,
    AMBER's annotated-absent objects."""
    from halp.label import label_answer

    slope = next(c for c in CASES if c[7] == "The slope is 1.449")
    assert label_answer(slope[2], slope[3], slope[7]).label == 1  # generic: 1.449 != 1.45
    assert _label(slope).label == 0
    collar = next(c for c in CASES if c[7] == "The collar is red.")
    assert label_answer(collar[2], collar[3], collar[7]).label is None and _label(collar).label == 1
    frisbee = next(c for c in CASES if "frisbee" in c[7])
    assert label_answer(frisbee[2], frisbee[3], frisbee[7]).label is None and _label(frisbee).label == 1


def test_coverage_and_agreement_per_source(capsys):
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # rows, labelled, agreeing
    for case in CASES:
        item = _label(case)
        row = stats[case[0]]
        row[0] += 1
        if item.label is not None:
            row[1] += 1
            row[2] += int(item.label == case[-1])
    with capsys.disabled():
        print("\nsource          rows  labelled  coverage  agreement")
        for source, (rows, labelled, agreeing) in sorted(stats.items()):
            agreement = f"{agreeing / labelled:.0%}" if labelled else "n/a"
            print(f"{source:<15} {rows:>4}  {labelled:>8}  {labelled / rows:>8.0%}  {agreement:>9}")
    assert all(agreeing == labelled for _, labelled, agreeing in stats.values())
    assert all(labelled > 0 for _, labelled, _ in stats.values())
