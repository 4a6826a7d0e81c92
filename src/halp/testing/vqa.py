"""A synthetic VQA set: images of coloured shapes on varied backgrounds, questions about them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = [(64, 64), (96, 48), (48, 112), (128, 80), (72, 72), (200, 120)]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
QUESTIONS = [
    "Is there a red shape in the image?",
    "How many shapes are there?",
    "What color is the shape?",
    "Is the picture bright or dark?",
    "Describe the image.",
]


def make_image(rng: np.random.Generator, size: tuple[int, int], colour: str, bright: bool) -> Image.Image:
    width, height = size
    base = 200 if bright else 40
    pixels = rng.integers(base - 30, base + 30, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.ellipse([x0, y0, x0 + width // 3, y0 + height // 3], fill=COLOURS[colour])
    return image


def make_vqa_set(directory: str | Path, n: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write `n` rows (CSV) and their PNG images (several sizes and aspect ratios); return (table, images)."""
    directory = Path(directory)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = directory / "vqa.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "image_id", "question", "answer", "category"])
        for index in range(n):
            colour = list(COLOURS)[index % len(COLOURS)]
            bright = bool(index % 3)
            image_id = f"img_{index:04d}.png"
            make_image(rng, SIZES[index % len(SIZES)], colour, bright).save(images_dir / image_id)
            question = QUESTIONS[index % len(QUESTIONS)]
            answer = {
                0: "yes" if colour == "red" else "no",
                1: "1",
                2: colour,
                3: "bright" if bright else "dark",
                4: f"a {colour} shape",
            }[index % len(QUESTIONS)]
            writer.writerow([f"q{index:04d}", image_id, question, answer, f"cat{index % 2}"])
    return table, images_dir
