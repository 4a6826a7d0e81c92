"""A procedural visual world: scenes of coloured shapes, rendered with exact per-object masks.

Every scene is drawn from a seeded `numpy.random.Generator`, so the same seed gives the same pixels.
Ground truth is computed from the objects and their rendered masks (never from the pixels after noise),
so it is exact: which objects exist, their colour and shape, how many there are, which is left of or
above which (only asked when the centres differ by a clear margin), and which touch (their masks,
one of them dilated by one pixel, intersect).

Difficulty changes how hard the pixels are, never what is true: more and smaller objects, overlap
(occlusion, each object stays at least half visible), clutter strokes that are not objects, low
contrast (object colours pulled towards the background) and pixel noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: The image side in pixels: 4x4 merged Qwen-VL tokens of 28 pixels.
IMAGE_SIZE = 112
#: The side of one merged vision token's square (2x2 patches of 14 pixels) and the tokens per image side.
TOKEN_SIDE = 28
TOKEN_GRID = IMAGE_SIZE // TOKEN_SIDE
#: An object counts as visible in a token's square when at least this many of its visible pixels lie there.
MIN_TOKEN_PIXELS = 8
SHAPES = ("circle", "square", "triangle", "star")
#: Colour names are basic colour terms (halp.label knows them as a closed class).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 210, 45),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
#: Columns of `Scene.token_targets`: one per colour, one per shape, and the object-centre bit.
TOKEN_TARGETS = len(COLOURS) + len(SHAPES) + 1
#: The columns of `Scene.token_targets` by what they say (`halp.world.model.pretrain_vision` scores each group).
TARGET_GROUPS: dict[str, slice] = {
    "colour": slice(0, len(COLOURS)),
    "shape": slice(len(COLOURS), len(COLOURS) + len(SHAPES)),
    "centre": slice(len(COLOURS) + len(SHAPES), TOKEN_TARGETS),
}
#: Scene frequency of each colour and shape. Not uniform, so that POPE's "popular" negatives (frequent
#: objects that are absent) differ from its "random" ones.
COLOUR_WEIGHTS = np.array([0.26, 0.22, 0.18, 0.14, 0.11, 0.09])
SHAPE_WEIGHTS = np.array([0.35, 0.3, 0.2, 0.15])
#: A left/above relation is asked only when the centres differ by at least this many pixels.
RELATION_MARGIN = 8
#: Each object keeps at least this fraction of its pixels visible under later objects.
MIN_VISIBLE = 0.5


@dataclass(frozen=True)
class Difficulty:
    name: str
    objects: tuple[int, int]  # inclusive range of the object count
    size: tuple[int, int]  # inclusive range of the object's bounding-box side, pixels
    overlap: bool  # objects may occlude each other
    clutter: int  # number of thin strokes that are not objects
    contrast: float  # 1: full colour; lower pulls objects towards the background
    noise: float  # standard deviation of Gaussian pixel noise


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty("easy", (1, 3), (24, 32), overlap=False, clutter=0, contrast=1.0, noise=0.0),
    "medium": Difficulty("medium", (2, 5), (18, 28), overlap=False, clutter=2, contrast=0.85, noise=10.0),
    "hard": Difficulty("hard", (3, 7), (13, 22), overlap=True, clutter=5, contrast=0.6, noise=22.0),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x0: int
    y0: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.size / 2, self.y0 + self.size / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    masks: np.ndarray  # (n_objects, H, W) bool: each object's full (unoccluded) mask
    difficulty: str
    background: tuple[int, int, int]

    def visible_masks(self) -> np.ndarray:
        """(n_objects, H, W) bool: each object's pixels that no later (drawn on top) object covers."""
        visible = self.masks.copy()
        for index in range(len(visible) - 1):
            visible[index] &= ~self.masks[index + 1 :].any(axis=0)
        return visible

    def token_targets(self) -> np.ndarray:
        """(TOKEN_GRID**2, len(COLOURS) + len(SHAPES) + 1) float32: what each merged vision token's square shows.

        Rows follow the merged tokens' order (row-major over the squares of TOKEN_SIDE pixels, as Qwen2-VL's
        processor and merger order them); columns: which colours are visible there, which shapes, and whether
        an object's centre lies there. Visible means at least MIN_TOKEN_PIXELS unoccluded pixels of an
        object. The vision pretraining stage (`halp.world.model.pretrain_vision`) learns these.
        """
        colours, shapes = list(COLOURS), list(SHAPES)
        targets = np.zeros((TOKEN_GRID * TOKEN_GRID, TOKEN_TARGETS), dtype=np.float32)
        side = self.masks.shape[-1] // TOKEN_GRID
        for item, visible in zip(self.objects, self.visible_masks(), strict=True):
            # Pixels per square: (grid_rows, side, grid_cols, side) summed over each square's pixels.
            counts = visible.reshape(TOKEN_GRID, side, TOKEN_GRID, side).sum(axis=(1, 3)).reshape(-1)
            shown = counts >= MIN_TOKEN_PIXELS
            targets[shown, colours.index(item.colour)] = 1
            targets[shown, len(colours) + shapes.index(item.shape)] = 1
            x, y = item.centre
            row, column = min(int(y // side), TOKEN_GRID - 1), min(int(x // side), TOKEN_GRID - 1)
            targets[row * TOKEN_GRID + column, -1] = 1
        return targets

    def touching(self, a: int, b: int) -> bool:
        """Whether objects a and b touch or overlap: a's mask grown by one pixel meets b's."""
        grown = np.array(Image.fromarray(self.masks[a].astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
        return bool((grown & self.masks[b]).any())


def _outline(shape: str, x0: int, y0: int, size: int) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1), (x0 + (size - 1) / 2, y0)]
    if shape == "star":
        cx, cy, outer, inner = x0 + (size - 1) / 2, y0 + (size - 1) / 2, (size - 1) / 2, (size - 1) / 5
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None


def object_mask(item: SceneObject, side: int = IMAGE_SIZE) -> np.ndarray:
    """The object's pixels as a bool (side, side) array."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    box = [item.x0, item.y0, item.x0 + item.size - 1, item.y0 + item.size - 1]
    if item.shape == "circle":
        draw.ellipse(box, fill=255)
    elif item.shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon(_outline(item.shape, item.x0, item.y0, item.size), fill=255)
    return np.array(mask) > 0


def _choice(rng: np.random.Generator, options: tuple[str, ...], weights: np.ndarray) -> str:
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


def make_scene(rng: np.random.Generator, difficulty: str, side: int = IMAGE_SIZE, objects: int | None = None) -> Scene:
    """Draw one scene: distinct (colour, shape) objects placed by rejection sampling, then rendered.

    `objects`: the number of objects, instead of one drawn from the difficulty's range (the training
    curriculum's one-object scenes).
    """
    spec = DIFFICULTIES[difficulty]
    wanted = int(rng.integers(spec.objects[0], spec.objects[1] + 1)) if objects is None else objects
    background = tuple(int(v) for v in rng.integers(70, 150, size=3))
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    used: set[tuple[str, str]] = set()
    attempts = 0
    while len(objects) < wanted and attempts < 400:
        attempts += 1
        colour = _choice(rng, tuple(COLOURS), COLOUR_WEIGHTS)
        shape = _choice(rng, SHAPES, SHAPE_WEIGHTS)
        if (colour, shape) in used:
            continue
        size = int(rng.integers(spec.size[0], spec.size[1] + 1))
        x0, y0 = int(rng.integers(0, side - size + 1)), int(rng.integers(0, side - size + 1))
        candidate = SceneObject(shape, colour, x0, y0, size)
        mask = object_mask(candidate, side)
        if spec.overlap:
            # The new object is drawn on top: every earlier one must stay at least MIN_VISIBLE visible.
            cover = mask.copy()
            hidden_too_much = False
            for index in range(len(masks) - 1, -1, -1):
                if (masks[index] & ~cover).sum() < MIN_VISIBLE * masks[index].sum():
                    hidden_too_much = True
                    break
                cover |= masks[index]
            if hidden_too_much:
                continue
        else:
            # Without overlap, objects keep a gap of at least two pixels (so they never touch).
            grown = np.array(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))) > 0
            if any((grown & m).any() for m in masks):
                continue
        objects.append(candidate)
        masks.append(mask)
        used.add((colour, shape))
    image = render(rng, objects, masks, background, spec, side)
    stacked = np.stack(masks) if masks else np.zeros((0, side, side), dtype=bool)
    return Scene(image, objects, stacked, difficulty, background)


def render(
    rng: np.random.Generator,
    objects: list[SceneObject],
    masks: list[np.ndarray],
    background: tuple[int, int, int],
    spec: Difficulty,
    side: int = IMAGE_SIZE,
) -> Image.Image:
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = background
    if spec.clutter:
        strokes = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(strokes)
        for _ in range(spec.clutter):
            x, y = rng.integers(0, side, size=2)
            dx, dy = rng.integers(-20, 21, size=2)
            draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=255, width=1)
        shade = np.asarray(background, dtype=np.float32) * float(rng.uniform(0.5, 1.5))
        canvas[np.array(strokes) > 0] = shade.clip(0, 255)
    base = np.asarray(background, dtype=np.float32)
    for item, mask in zip(objects, masks, strict=True):
        colour = np.asarray(COLOURS[item.colour], dtype=np.float32)
        canvas[mask] = base + spec.contrast * (colour - base)
    if spec.noise:
        canvas += rng.normal(0.0, spec.noise, size=canvas.shape).astype(np.float32)
    return Image.fromarray(canvas.clip(0, 255).round().astype(np.uint8), "RGB")
