"""VLMEvalKit's TSV layouts for the six benchmarks of the paper, written by the tests (open-compass/VLMEvalKit at
e8e78f05: ``vlmeval/dataset/image_base.py`` 146-180 and 255-290, ``vlmeval/dataset/image_mcq.py`` 212-247)."""
from __future__ import annotations

import base64
import csv
import io
import os

import PIL.Image


def png64(colour, size=(28, 28)):
    """A base64 PNG of ``colour`` with a seeded speckle: images that vary across their patches, as fit-pca needs
    (uniform images span no direction, which it refuses as rounding noise)."""
    import numpy as np

    pixels = np.full((size[1], size[0], 3), colour, dtype=np.int16)
    pixels += np.random.default_rng(sum(colour)).integers(-40, 41, pixels.shape, dtype=np.int16)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RED, BLUE = png64((255, 0, 0)), png64((0, 0, 255))

# each benchmark's columns as VLMEvalKit ships them (rows written here, images base64 or a row's index)
TSVS = {
    "HRBench4K": (["index", "question", "answer", "category", "cycle_category", "A", "B", "C", "D", "image"],
                  [[0, "What colour is the car?", "A", "single", "0", "red", "blue", "green", "white", RED],
                   [1, "What colour is the car?", "B", "single", "1", "blue", "red", "white", "green", "0"]]),
    "HRBench8K": (["index", "question", "answer", "category", "cycle_category", "A", "B", "C", "D", "image"],
                  [[0, "Where is the sign?", "C", "cross", "0", "left", "right", "top", "bottom", BLUE]]),
    "MMStar": (["index", "question", "answer", "category", "l2_category", "A", "B", "C", "D", "image"],
               [[5, "How many cats?", "D", "coarse perception", "image scene", "1", "2", "3", "4", RED]]),
    "MME-RealWorld-Lite": (["index", "question", "multi-choice options", "A", "B", "C", "D", "E", "answer",
                            "category", "l2-category", "image"],
                           [[7, "What is written?", "(A) stop\n(B) go", "stop", "go", "wait", "yield", "none", "A",
                             "Perception/OCR with Complex Context", "text recognition", f"[{RED!r}, {BLUE!r}]"]]),
    "MathVista_MINI": (["index", "question", "answer", "question_type", "answer_type", "choices", "answer_option",
                        "precision", "task", "skills", "image"],
                       [[1, "Hint: integer answer.\nQuestion: How many dots?", "14", "free_form", "integer", "",
                         "", "", "figure question answering", "['arithmetic reasoning']", RED],
                        [2, "What fraction is blue?", "8/11", "multi_choice", "text", "['3/11', '8/11', '6/11']",
                         "B", "", "math word problem", "['algebraic reasoning']", BLUE]]),
    "WeMath": (["index", "ID", "split", "knowledge concept", "question", "option", "answer", "key", "A", "B", "C",
                "D", "E", "image", "hint"],
               [[3, "1", "testmini", "angles", "What is the angle?", "A;B", "C", "2steps_1", "30", "45", "60",
                 "90", "120", BLUE, "Use the figure."]]),
}


def write_tsv(folder, name, header=None, rows=None):
    header, rows = (header, rows) if header else TSVS[name]
    path = os.path.join(folder, f"{name}.tsv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path
