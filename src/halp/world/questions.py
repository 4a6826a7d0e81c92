"""Questions about a scene, of the study's types, each with its exact answer.

Types (the `question_type` column):

- `existence`: "Is there a red circle in the image?" yes/no. Negatives follow POPE (`subtype`): `random`
  (any absent colour-shape pair), `popular` (an absent pair among the most frequent ones of the world),
  `adversarial` (an absent pair sharing the colour or the shape of a present object).
- `attribute_colour`: "What colour is the square?" (the scene has exactly one square).
- `attribute_shape`: "What shape is the red object?" (exactly one red object).
- `counting`: "How many circles are there?", "How many red objects are there?", "How many objects are there?"
- `spatial`: "Is the red circle left of the blue square?", "... above ...", "Is the red circle touching the
  blue square?" yes/no; left/above are asked only when the centres differ by RELATION_MARGIN pixels or more.
- `multiple_choice`: the colour or shape question with four lettered options; the answer is the letter.
- `false_premise`: the colour or shape question about something the scene does not have; the answer is
  `none`.

Answers come from a closed vocabulary (`ANSWERS`), so the label of a model's answer is exact: it is wrong
exactly when its text, lowercased and stripped, differs from the ground truth (`is_wrong`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from halp.world.scene import COLOUR_WEIGHTS, COLOURS, RELATION_MARGIN, SHAPE_WEIGHTS, SHAPES, Scene

QUESTION_TYPES = (
    "existence",
    "attribute_colour",
    "attribute_shape",
    "counting",
    "spatial",
    "multiple_choice",
    "false_premise",
)
LETTERS = ("A", "B", "C", "D")
ANSWERS = ("yes", "no", "none", *[str(n) for n in range(10)], *COLOURS, *SHAPES, *LETTERS)
#: The most frequent colour-shape pairs of the world (by the product of their weights): POPE's "popular".
POPULAR = tuple(
    sorted(
        ((c, s) for c in COLOURS for s in SHAPES),
        key=lambda pair: -COLOUR_WEIGHTS[list(COLOURS).index(pair[0])] * SHAPE_WEIGHTS[SHAPES.index(pair[1])],
    )[:8]
)


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    question_type: str
    subtype: str


def canonical(text: str) -> str:
    """Lowercase, surrounding whitespace and a final full stop removed: the only freedom an answer has."""
    return text.strip().lower().removesuffix(".").strip()


#: The other correct spellings of a count (halp.label reads these as the same number).
NUMBER_SPELLINGS = {
    "0": {"zero", "none", "no"}, "1": {"one"}, "2": {"two"}, "3": {"three"}, "4": {"four"}, "5": {"five"},
    "6": {"six"}, "7": {"seven"}, "8": {"eight"}, "9": {"nine"},
}  # fmt: skip
_OPTION = re.compile(r"\b([A-D])\. (\w+)")


def is_wrong(answer: str, ground_truth: str, question: str = "") -> int:
    """1 when the answer is not the ground truth, else 0. An empty answer is wrong.

    Answers are compared canonically (`canonical`); the only other correct spellings in this closed world are
    a count's number word (and `none`/`no` for 0), and the text of the correct option of a multiple-choice
    question instead of its letter.
    """
    said, truth = canonical(answer), canonical(ground_truth)
    if said == truth:
        return 0
    if said in NUMBER_SPELLINGS.get(truth, ()):
        return 0
    options = {letter.lower(): text for letter, text in _OPTION.findall(question)}
    return int(not (truth in options and said == options[truth]))


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _plural(shape: str) -> str:
    return f"{shape}s"


def existence(rng: np.random.Generator, scene: Scene) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if present and rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
        return Question(f"Is there a {colour} {shape} in the image?", "yes", "existence", "positive")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    kind = _pick(rng, ["random", "popular", "adversarial"])
    pool = absent
    if kind == "popular":
        pool = [pair for pair in POPULAR if pair not in present] or absent
    elif kind == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        pool = [(c, s) for c, s in absent if c in colours or s in shapes] or absent
    colour, shape = _pick(rng, pool)
    return Question(f"Is there a {colour} {shape} in the image?", "no", "existence", kind)


def _unique_shapes(scene: Scene) -> list:
    shapes = [o.shape for o in scene.objects]
    return [o for o in scene.objects if shapes.count(o.shape) == 1]


def _unique_colours(scene: Scene) -> list:
    colours = [o.colour for o in scene.objects]
    return [o for o in scene.objects if colours.count(o.colour) == 1]


def attribute_colour(rng: np.random.Generator, scene: Scene) -> Question | None:
    candidates = _unique_shapes(scene)
    if not candidates:
        return None
    item = _pick(rng, candidates)
    return Question(f"What colour is the {item.shape}?", item.colour, "attribute_colour", "colour")


def attribute_shape(rng: np.random.Generator, scene: Scene) -> Question | None:
    candidates = _unique_colours(scene)
    if not candidates:
        return None
    item = _pick(rng, candidates)
    return Question(f"What shape is the {item.colour} object?", item.shape, "attribute_shape", "shape")


def counting(rng: np.random.Generator, scene: Scene) -> Question:
    kind = _pick(rng, ["shape", "colour", "all"])
    if kind == "shape":
        shape = _pick(rng, list(SHAPES))
        count = sum(o.shape == shape for o in scene.objects)
        return Question(f"How many {_plural(shape)} are there?", str(count), "counting", "shape")
    if kind == "colour":
        colour = _pick(rng, list(COLOURS))
        count = sum(o.colour == colour for o in scene.objects)
        return Question(f"How many {colour} objects are there?", str(count), "counting", "colour")
    return Question("How many objects are there?", str(len(scene.objects)), "counting", "all")


def spatial(rng: np.random.Generator, scene: Scene) -> Question | None:
    n = len(scene.objects)
    if n < 2:
        return None
    relation = _pick(rng, ["left", "above", "touching"])
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    order = rng.permutation(len(pairs))
    for index in order:
        a, b = pairs[int(index)]
        first, second = scene.objects[a], scene.objects[b]
        (ax, ay), (bx, by) = first.centre, second.centre
        if relation == "left":
            if abs(ax - bx) < RELATION_MARGIN:
                continue
            truth, phrase = ax < bx, "left of"
        elif relation == "above":
            if abs(ay - by) < RELATION_MARGIN:
                continue
            truth, phrase = ay < by, "above"
        else:
            truth, phrase = scene.touching(a, b), "touching"
        text = f"Is the {first.name} {phrase} the {second.name}?"
        return Question(text, "yes" if truth else "no", "spatial", relation)
    return None


def multiple_choice(rng: np.random.Generator, scene: Scene) -> Question | None:
    ask_colour = bool(rng.random() < 0.5)
    base = attribute_colour(rng, scene) if ask_colour else attribute_shape(rng, scene)
    if base is None:
        base = attribute_shape(rng, scene) if ask_colour else attribute_colour(rng, scene)
        ask_colour = not ask_colour
    if base is None:
        return None
    vocabulary = list(COLOURS) if ask_colour else list(SHAPES)
    distractors = [v for v in vocabulary if v != base.answer]
    options = [base.answer, *[distractors[int(i)] for i in rng.choice(len(distractors), 3, replace=False)]]
    options = [options[int(i)] for i in rng.permutation(4)]
    listed = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))
    letter = LETTERS[options.index(base.answer)]
    return Question(f"{base.question} {listed}", letter, "multiple_choice", "colour" if ask_colour else "shape")


def false_premise(rng: np.random.Generator, scene: Scene) -> Question | None:
    if rng.random() < 0.5:
        missing = [s for s in SHAPES if all(o.shape != s for o in scene.objects)]
        if missing:
            shape = _pick(rng, missing)
            return Question(f"What colour is the {shape}?", "none", "false_premise", "colour")
    missing = [c for c in COLOURS if all(o.colour != c for o in scene.objects)]
    if not missing:
        return None
    colour = _pick(rng, missing)
    return Question(f"What shape is the {colour} object?", "none", "false_premise", "shape")


GENERATORS = {
    "existence": existence,
    "attribute_colour": attribute_colour,
    "attribute_shape": attribute_shape,
    "counting": counting,
    "spatial": spatial,
    "multiple_choice": multiple_choice,
    "false_premise": false_premise,
}


def ask(rng: np.random.Generator, scene: Scene, question_type: str | None = None) -> Question:
    """One question about `scene`: of `question_type`, or of a uniformly drawn type that the scene allows."""
    types = [question_type] if question_type else [QUESTION_TYPES[int(i)] for i in rng.permutation(len(QUESTION_TYPES))]
    for kind in types:
        question = GENERATORS[kind](rng, scene)
        if question is not None:
            return question
    # existence and counting always apply, so only a fixed type can end here.
    raise ValueError(f"a scene with {len(scene.objects)} object(s) allows no {question_type} question")
