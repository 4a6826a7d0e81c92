"""Small copies of the six benchmarks in their published layouts (a few rows each, images drawn with PIL).

The layouts follow the sources' dataset cards, repositories and lmms-eval task definitions (see docs/data.md);
the hub forms are written by the `datasets` library itself, so their Parquet carries the Image feature exactly as
the hub's does. Used by tests and benchmarks; every function returns (path for --from, image folder or None).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


def image_bytes(seed: int, size: tuple[int, int] = (20, 16), fmt: str = "PNG") -> bytes:
    """A small image that differs per seed (colour and a bar), encoded as `fmt`."""
    image = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 29) % 256))
    ImageDraw.Draw(image).rectangle([seed % size[0], 0, seed % size[0] + 3, size[1] - 1], fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _pil(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(seed)))


def _save(folder: Path, name: str, seed: int) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt="JPEG" if name.endswith(".jpg") else "PNG"))


def pope_hub(root: Path, categories: tuple[str, ...] = ("adversarial", "popular", "random"), per: int = 4
             ) -> tuple[Path, None]:
    """lmms-lab/POPE: data/test-00000-of-00001.parquet with id, question_id, question, answer, image_source, image,
    category; question_id restarts per category, as in the authors' files."""
    import datasets

    rows: dict[str, list] = {key: [] for key in ("id", "question_id", "question", "answer", "image_source", "image",
                                                 "category")}
    objects = ("dog", "car", "person", "chair")
    for c, category in enumerate(categories):
        for q in range(per):
            rows["id"].append(str(len(rows["id"])))
            rows["question_id"].append(str(q + 1))
            rows["question"].append(f"Is there a {objects[q % 4]} in the image?")
            rows["answer"].append("yes" if q % 2 == 0 else "no")
            rows["image_source"].append(f"COCO_val2014_{c:06d}{q:06d}")
            rows["image"].append(_pil(10 * c + q))
            rows["category"].append(category)
    features = datasets.Features({**{k: datasets.Value("string") for k in rows if k != "image"},
                                  "image": datasets.Image()})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    (root / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root, None


def pope_json(root: Path) -> tuple[Path, Path]:
    """The authors' coco_pope_<sampling>.json (JSON Lines: question_id, image, text, label) and a COCO folder."""
    images = root / "val2014"
    for s, sampling in enumerate(("adversarial", "random")):
        lines = []
        for q in range(3):
            name = f"COCO_val2014_{s:06d}{q:06d}.jpg"
            _save(images, name, 40 + 10 * s + q)
            lines.append(json.dumps({"question_id": q + 1, "image": name, "text": f"Is there a cup {q}?",
                                     "label": "no" if q else "yes"}))
        (root / f"coco_pope_{sampling}.json").write_text("\n".join(lines) + "\n")
    return root, images


def mme_hub(root: Path) -> tuple[Path, None]:
    """lmms-lab/MME: Parquet with question_id (the image path, shared by its two questions), image, question,
    answer (Yes/No), category."""
    import datasets

    rows: dict[str, list] = {key: [] for key in ("question_id", "image", "question", "answer", "category")}
    for i, category in enumerate(("existence", "count", "celebrity")):
        for k, answer in enumerate(("Yes", "No")):
            rows["question_id"].append(f"{category}/{i:04d}.png")
            rows["image"].append(_pil(60 + i))
            rows["question"].append(f"Is this {category} case {k}? Please answer yes or no.")
            rows["answer"].append(answer)
            rows["category"].append(category)
    features = datasets.Features({**{k: datasets.Value("string") for k in rows if k != "image"},
                                  "image": datasets.Image()})
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root, None


def mme_folder(root: Path) -> tuple[Path, None]:
    """MME_Benchmark_release_version: `existence/<img>.jpg` + `<img>.txt`, and `artwork/images/` +
    `artwork/questions_answers_YN/` (question<TAB>answer lines, a yes and a no per image)."""
    base = root / "MME_Benchmark_release_version"
    for i in range(2):
        _save(base / "existence", f"00000{i}.jpg", 70 + i)
        (base / "existence" / f"00000{i}.txt").write_text(
            "Is there a bus in this image? Please answer yes or no.\tYes\n"
            "Is there a boat in this image? Please answer yes or no.\tNo\n"
        )
        _save(base / "artwork" / "images", f"{i + 10}.jpg", 80 + i)
        (base / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (base / "artwork" / "questions_answers_YN" / f"{i + 10}.txt").write_text(
            "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
            "Is this artwork created by Turner? Please answer yes or no.\tYes\n"
        )
    return base, None


def hallusionbench_json(root: Path) -> tuple[Path, None]:
    """The authors' HallusionBench.json beside hallusion_bench/ (filename relative to the JSON's folder); one
    question without a figure (visual_input 0)."""
    items = []
    for set_id in range(2):
        for figure_id in range(2):
            filename = f"./hallusion_bench/VD/chart/{set_id}_{figure_id}.png"
            _save(root, filename.removeprefix("./"), 90 + 2 * set_id + figure_id)
            items.append({
                "category": "VD", "subcategory": "chart", "visual_input": "1" if figure_id == 0 else "2",
                "set_id": str(set_id), "figure_id": str(figure_id), "sample_note": "bar chart",
                "question_id": "0", "question": f"Is the bar of set {set_id} above 10?",
                "gt_answer_details": "The bar is above 10." if figure_id == 0 else "The bar is below 10.",
                "gt_answer": "1" if figure_id == 0 else "0", "filename": filename,
            })
    items.append({
        "category": "VS", "subcategory": "video", "visual_input": "0", "set_id": "0", "figure_id": "0",
        "sample_note": "no figure", "question_id": "0", "question": "Does the ball fall down in the video?",
        "gt_answer_details": "Yes, it falls.", "gt_answer": "1", "filename": None,
    })
    (root / "HallusionBench.json").write_text(json.dumps(items, indent=2))
    return root / "HallusionBench.json", None


def mathvista_hub(root: Path) -> tuple[Path, None]:
    """AI4Math/MathVista: data/testmini-*.parquet with pid, question, image (path), decoded_image, choices, unit,
    precision, answer, question_type, answer_type, metadata, query."""
    import datasets

    problems = [
        {"pid": "1", "question": "Which shape is largest?", "choices": ["circle", "square", "triangle"],
         "answer": "square", "question_type": "multi_choice", "answer_type": "text", "unit": None,
         "precision": None, "category": "general-vqa"},
        {"pid": "2", "question": "The line is about (_) centimeters long.", "choices": None, "answer": "7",
         "question_type": "free_form", "answer_type": "integer", "unit": "cm", "precision": None,
         "category": "math-targeted-vqa"},
        {"pid": "3", "question": "What is the slope of the line?", "choices": None, "answer": "1.45",
         "question_type": "free_form", "answer_type": "float", "unit": None, "precision": 2.0,
         "category": "math-targeted-vqa"},
        {"pid": "4", "question": "List the labels from left to right.", "choices": None, "answer": "[a, b]",
         "question_type": "free_form", "answer_type": "list", "unit": None, "precision": None,
         "category": "general-vqa"},
    ]
    rows: dict[str, list] = {key: [] for key in ("pid", "question", "image", "decoded_image", "choices", "unit",
                                                 "precision", "answer", "question_type", "answer_type", "metadata",
                                                 "query")}
    for index, problem in enumerate(problems):
        for key in ("pid", "question", "choices", "unit", "precision", "answer", "question_type", "answer_type"):
            rows[key].append(problem[key])
        rows["image"].append(f"images/{problem['pid']}.jpg")
        rows["decoded_image"].append(_pil(100 + index))
        rows["metadata"].append({"category": problem["category"], "context": "plot", "grade": "high school",
                                 "language": "english", "skills": ["arithmetic reasoning"], "source": "synthetic",
                                 "split": "testmini", "task": "figure question answering"})
        rows["query"].append(f"Hint: answer the question.\nQuestion: {problem['question']}")
    string = datasets.Value("string")
    features = datasets.Features({
        "pid": string, "question": string, "image": string, "decoded_image": datasets.Image(),
        "choices": datasets.Sequence(string), "unit": string, "precision": datasets.Value("float64"),
        "answer": string, "question_type": string, "answer_type": string,
        "metadata": {"category": string, "context": string, "grade": string, "language": string,
                     "skills": datasets.Sequence(string), "source": string, "split": string, "task": string},
        "query": string,
    })
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(root / "data" / "testmini-00000-of-00001.parquet")
    )
    return root, None


def amber_repo(root: Path) -> tuple[Path, Path]:
    """The AMBER repository's data/query/query_all.json and data/annotations.json, and an image folder."""
    images = root / "AMBER_images"
    queries, annotations = [], []
    for image_id in (1, 2):
        queries.append({"id": image_id, "image": f"AMBER_{image_id}.jpg", "query": "Describe this image."})
        annotations.append({"id": image_id, "type": "generative", "truth": ["dog", "grass", "sky"],
                            "hallu": ["cat", "frisbee", "person"]})
        _save(images, f"AMBER_{image_id}.jpg", 120 + image_id)
    kinds = ("discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
             "discriminative-relation")
    for offset, kind in enumerate(kinds):
        query_id = 3 + offset
        queries.append({"id": query_id, "image": f"AMBER_{1 + offset % 2}.jpg",
                        "query": f"Is there direct contact between the dog and the grass {offset}?"})
        annotations.append({"id": query_id, "type": kind, "truth": "yes" if offset % 2 == 0 else "no"})
    (root / "data" / "query").mkdir(parents=True, exist_ok=True)
    (root / "data" / "query" / "query_all.json").write_text(json.dumps(queries, indent=4))
    (root / "data" / "annotations.json").write_text(json.dumps(annotations, indent=4))
    return root, images


def haloquest_csv(root: Path) -> tuple[Path, Path]:
    """google/haloquest's haloquest-eval.csv (an unnamed row-number column first) and the fetched images."""
    import pandas as pd

    images = root / "haloquest_images"
    rows = [
        ("a1.png", "generated", "false premises", "What color is the cat's collar?",
         "The cat in the picture does not have a collar on"),
        ("b2.png", "real", "visually challenging", "How many fingers does the hand have?", "Six fingers; 6"),
        ("c3.png", "generated", "insufficient context", "What letters are on the license plate?",
         "The license plate is not visible in the picture.; We can not see the plate"),
        ("d4.png", "real", "false premises", "How many sharks are in the brochure?",
         "There are no sharks in the brochure"),
    ]
    for index, row in enumerate(rows):
        _save(images, row[0], 140 + index)
    frame = pd.DataFrame(
        [
            {"image_name": name, "url": f"https://example.invalid/{name}", "image type": kind,
             "hallucination type": halluc, "question": question, "groundtruth responses": refs, "split": "eval"}
            for name, kind, halluc, question, refs in rows
        ]
    )
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "haloquest-eval.csv")  # pandas writes the unnamed row-number column, as the release has
    return root, images


#: source -> fixture builder used by the round-trip test (one layout per source).
FIXTURES = {
    "amber": amber_repo,
    "haloquest": haloquest_csv,
    "pope": pope_hub,
    "mme": mme_folder,
    "hallusionbench": hallusionbench_json,
    "mathvista": mathvista_hub,
}


def hallusionbench_hub(root: Path) -> tuple[Path, None]:
    """lmms-lab/HallusionBench: image-*.parquet and non_image-*.parquet (the same columns plus `image`, null for
    the questions without a figure)."""
    import datasets

    string = datasets.Value("string")
    columns = ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note", "question_id",
               "question", "gt_answer_details", "gt_answer", "filename")
    features = datasets.Features({**{name: string for name in columns}, "image": datasets.Image()})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, figures in (("image", (0, 1)), ("non_image", ())):
        rows: dict[str, list] = {name: [] for name in (*columns, "image")}
        for figure_id in figures or (0,):
            values = {"category": "VS" if not figures else "VD", "subcategory": "map" if figures else "chart",
                      "visual_input": str(figure_id + 1) if figures else "0", "set_id": "3",
                      "figure_id": str(figure_id), "sample_note": "", "question_id": "1",
                      "question": "Is Texas the largest state?", "gt_answer_details": "No, Alaska is.",
                      "gt_answer": "0", "filename": f"./hallusion_bench/VD/map/3_{figure_id}.png" if figures else None}
            for name in columns:
                rows[name].append(values[name])
            rows["image"].append(_pil(160 + figure_id) if figures else None)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root, None


def mathvista_json(root: Path) -> tuple[Path, None]:
    """The MathVista repository's data/testmini.json (pid -> problem) beside data/images/."""
    data = root / "data"
    problems = {
        "7": {"question": "How many bars are there?", "image": "images/7.jpg", "choices": None, "unit": None,
              "precision": None, "answer": "4", "question_type": "free_form", "answer_type": "integer",
              "metadata": {"category": "math-targeted-vqa", "task": "figure question answering"}},
        "8": {"question": "Is the curve increasing?", "image": "images/8.jpg", "choices": ["Yes", "No"],
              "unit": None, "precision": None, "answer": "No", "question_type": "multi_choice",
              "answer_type": "text", "metadata": {"category": "general-vqa", "task": "textbook question answering"}},
    }
    for index, problem in enumerate(problems.values()):
        _save(data, problem["image"], 170 + index)
    (data / "testmini.json").write_text(json.dumps(problems, indent=2))
    return data, None
