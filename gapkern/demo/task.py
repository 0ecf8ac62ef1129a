"""The demo's procedural task: small coloured squares on a 3 x 3 grid, multiple-choice questions about them.

Each image is 84 x 84 pixels, 3 x 3 cells of 28 pixels: one merged visual
token per cell for Qwen2.5-VL (14-pixel patches, merged 2 x 2). A square is
LARGE (22 px) or SMALL (4 px), centred in its cell, in one of four colours;
size is an attribute a tiny model can learn to read in minutes, where
position binding and fine shape differences are not (DEMO_NOTES).

- ``colour`` (perception): one small square and two large ones, three
  different colours. "What colour is the small square?"; choices red, green,
  blue, yellow. The small square is a faint part of its cell's one merged
  token; the latent step's crop of that cell (2 x 2 merged tokens) holds it.
- ``count`` (reasoning): four squares, each large or small, at least one
  large. "How many small squares are there?"; choices 0, 1, 2, 3.

The teacher's steps look at the evidence: a latent step per square that
answers the question, its ``box`` the square's cell and its ``parser`` a
description ("a large red square"), between short text steps. Both tasks
have four choices in a fixed order: chance is 25%.
"""
from __future__ import annotations

import json
import os
import random

from .._io import atomic_write_text

__all__ = ["COLOURS", "CELL", "GRID", "TASKS", "make_line", "write_split", "texts"]

COLOURS = {"red": (230, 30, 30), "green": (30, 190, 40), "blue": (40, 70, 230), "yellow": (235, 220, 40)}
SIZES = {"large": 22, "small": 4}
CELL, GRID = 28, 3
BACKGROUND = (128, 128, 128)
COUNTS = ("0", "1", "2", "3")
TASKS = {"colour": "perception", "count": "reasoning"}


def _box(cell: int) -> list[int]:
    row, col = divmod(cell, GRID)
    return [col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL]


def _colour_line(rng: random.Random):
    cells = rng.sample(range(GRID * GRID), 3)
    colours = rng.sample(list(COLOURS), 3)
    squares = [(cells[0], colours[0], "small"), (cells[1], colours[1], "large"), (cells[2], colours[2], "large")]
    asked = squares[0]
    _, colour, size = asked
    line = {"question": f"What colour is the {size} square?", "choices": list(COLOURS),
            "answer": chr(ord("A") + list(COLOURS).index(colour)),
            "steps": [{"text": f"Find the {size} square."}, _latent(asked), {"text": f"It is {colour}."}]}
    return squares, line


def _count_line(rng: random.Random):
    cells = sorted(rng.sample(range(GRID * GRID), 4))  # reading order: the steps visit the squares in it
    small = rng.randrange(4)
    sizes = ["small"] * small + ["large"] * (4 - small)
    rng.shuffle(sizes)
    squares = [(cell, rng.choice(list(COLOURS)), size) for cell, size in zip(cells, sizes)]
    found = [s for s in squares if s[2] == "small"]
    end = "There is none." if not found else f"That makes {small}."
    line = {"question": "How many small squares are there?", "choices": list(COUNTS), "answer": "ABCD"[small],
            "steps": [{"text": "Look for the small squares."}, *(_latent(s) for s in found), {"text": end}]}
    return squares, line


def _latent(square) -> dict:
    cell, colour, size = square
    return {"latent": {"image": None, "box": _box(cell)}, "parser": f"a {size} {colour} square"}


MAKERS = {"colour": _colour_line, "count": _count_line}


def draw(squares, small: int = SIZES["small"]) -> "PIL.Image.Image":  # noqa: F821
    """The 84 x 84 RGB image of ``squares``: (cell, colour, size) each; a small square's side is ``small`` px."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (GRID * CELL, GRID * CELL), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for cell, colour, size in squares:
        x0, y0, _, _ = _box(cell)
        side = small if size == "small" else SIZES[size]
        off = (CELL - side) // 2
        pen.rectangle([x0 + off, y0 + off, x0 + off + side - 1, y0 + off + side - 1], fill=COLOURS[colour])
    return img


def make_line(task: str, index: int, rng: random.Random, image: str):
    """One sample line (SPEC 4.1) of ``task`` and its squares; ``image`` the path relative to the sample file."""
    squares, line = MAKERS[task](rng)
    for step in line["steps"]:
        if "latent" in step:
            step["latent"]["image"] = image
    return squares, {"id": f"{task}-{index}", "image": image, "category": TASKS[task], "task": task, **line}


def write_split(folder: str, name: str, per_task: int, seed: int, small: int = SIZES["small"]) -> str:
    """``per_task`` lines of each task into ``folder/NAME.jsonl``, their images under ``folder/img/NAME/``;
    ``small``: the small squares' side in pixels (the plan's ``small_square``).

    Lines alternate between the tasks. Returns the sample file's path. The
    images are written first, the sample file last and atomically.
    """
    rng = random.Random(f"gapkern-demo/{name}/{seed}")
    os.makedirs(os.path.join(folder, "img", name), exist_ok=True)
    lines = []
    for i in range(per_task):
        for task in TASKS:
            image = f"img/{name}/{task}-{i}.png"
            squares, line = make_line(task, i, rng, image)
            draw(squares, small).save(os.path.join(folder, image))
            lines.append(line)
    path = os.path.join(folder, f"{name}.jsonl")
    text = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write_text(path, text)
    return path


def texts() -> list[str]:
    """Every question, choice and step text the task can produce (the demo tokenizer's vocabulary comes from them)."""
    out = [f"What colour is the {size} square?" for size in SIZES]
    out += ["How many small squares are there?", "Look for the small squares.", "There is none."]
    out += [f"Find the {size} square." for size in SIZES] + [f"It is {c}." for c in COLOURS]
    out += [f"That makes {n}." for n in COUNTS[1:]] + list(COLOURS) + list(COUNTS)
    out += [f"a {size} {colour} square" for size in SIZES for colour in COLOURS]
    return out
