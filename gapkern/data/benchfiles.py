"""VLMEvalKit's benchmark TSVs as sample files (SPEC 4.6), and their conversion to SPEC 4.1 JSONL + PNGs.

A TSV row: ``index``; ``image`` (base64, a list of them written as a Python
list, or, at most 64 characters, the ``index`` of the row whose image it
shares) or ``image_path``; ``question``; option columns ``A`` ... ``Z``;
``answer``; ``hint``; ``category`` and whatever else the benchmark keeps.
A sample's ``task`` is the benchmark's name (the file's stem unless given),
its ``category`` perception / reasoning from :data:`CATEGORY` (``category=``
for other benchmarks); every other column goes under ``meta`` (the TSV's own
``category`` among them). MathVista's rows keep its ``choices`` list as the
choices (``answer_option`` the letter) and its free-form numeric answers.
Images are decoded once into a folder (default: beside the TSV).
"""
from __future__ import annotations

import ast
import base64
import csv
import io
import json
import os
import string
import sys

__all__ = ["CATEGORY", "is_tsv", "load_tsv", "convert_tsv"]

CATEGORY = {"HRBench4K": "perception", "HRBench8K": "perception", "MMStar": "perception",
            "MME-RealWorld-Lite": "perception", "MathVista_MINI": "reasoning", "WeMath": "reasoning"}
REFERENCE_MAX = 64  # VLMEvalKit's rule: a shorter image field names another row's index
_OWN = ("index", "image", "image_path", "question", "answer") + tuple(string.ascii_uppercase)


def is_tsv(path: str) -> bool:
    return str(path).lower().endswith(".tsv")


def _rows(path: str):
    from .schema import SampleError

    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for field in ("index", "question", "answer"):
            if field not in (reader.fieldnames or []):
                raise SampleError(f"{path}:1:{field}: the header has no {field!r} column "
                                  f"(columns: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            yield reader.line_num, row


def _image_list(value: str) -> list[str]:
    value = value.strip()
    if len(value) > 1 and value[0] == "[" and value[-1] == "]":
        return [str(x) for x in ast.literal_eval(value)]
    return [value]


def _decode(b64: str, target: str, where: str) -> None:
    """One base64 image to a PNG file, written once (atomically; an existing readable file is kept)."""
    from PIL import Image

    from .schema import SampleError

    if os.path.isfile(target):
        return
    try:
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=False)))
        image.load()
    except (OSError, ValueError) as e:
        raise SampleError(f"{where}:image: not a base64-encoded image ({e})") from None
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    tmp = f"{target}.tmp{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, target)


def load_tsv(path: str, *, images: str | None = None, task: str | None = None,
             category: str | None = None) -> list[dict]:
    """The rows of a VLMEvalKit TSV as validated samples (``load_samples``' form: absolute ``images``)."""
    from .schema import CATEGORIES, SampleError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no sample file at {path!r}")
    task = task or os.path.splitext(os.path.basename(path))[0]
    category = CATEGORY.get(task, category)  # the table first: --category is for the benchmarks it lacks
    if category not in CATEGORIES:
        raise SampleError(f"{path}: task {task!r} is not one of the built-in benchmarks ({', '.join(CATEGORY)}); "
                          f"give its category ({' or '.join(CATEGORIES)}, --category)")
    folder = os.path.abspath(images or os.path.splitext(path)[0] + ".images")
    rows = list(_rows(path))
    fields = {row["index"]: row.get("image") or "" for _, row in rows}
    samples, seen = [], {}
    os.makedirs(folder, exist_ok=True)
    for number, row in rows:
        where = f"{path}:{number}"
        index = (row.get("index") or "").strip()
        if not index:
            raise SampleError(f"{where}:index: expected a non-empty index")
        if index in seen:
            raise SampleError(f"{where}:index: {index!r} is already the index of line {seen[index]}")
        seen[index] = number
        sample = _sample(row, where, task, category)
        sample["images"] = _images(row, fields, folder, where, os.path.dirname(os.path.abspath(path)))
        samples.append(sample)
    if not samples:
        raise ValueError(f"path: {path!r} holds no samples")
    return samples


def _images(row: dict, fields: dict, folder: str, where: str, tsv_folder: str) -> list[str]:
    from .schema import SampleError

    value, index = (row.get("image") or "").strip(), row["index"].strip()
    if not value:
        if not row.get("image_path"):
            return []
        paths = [os.path.join(tsv_folder, p) for p in _image_list(row["image_path"])]
        for p in paths:
            if not os.path.isfile(p):
                raise SampleError(f"{where}:image_path: no file at {p!r}")
        return paths
    if len(value) <= REFERENCE_MAX:
        shared = (fields.get(value) or "").strip()
        if len(shared) <= REFERENCE_MAX:
            raise SampleError(f"{where}:image: {value!r} refers to no row with an image (expected base64, or the "
                              "index of a row that holds one)")
        value, index = shared, value
    blobs = _image_list(value)
    names = [f"{index}.png"] if len(blobs) == 1 else [f"{index}_{i}.png" for i in range(len(blobs))]
    out = []
    for blob, name in zip(blobs, names):
        target = os.path.join(folder, name)
        _decode(blob, target, where)
        out.append(target)
    return out


def _sample(row: dict, where: str, task: str, category: str) -> dict:
    from .schema import SampleError

    question = (row.get("question") or "").strip()
    if not question:
        raise SampleError(f"{where}:question: expected a non-empty question")
    answer = (row.get("answer") or "").strip()
    meta = {k: v for k, v in row.items() if k not in _OWN and v not in (None, "")}
    choices = [row[c] for c in string.ascii_uppercase if (row.get(c) or "").strip()]
    letters = [c for c in string.ascii_uppercase if (row.get(c) or "").strip()]
    if letters and letters != list(string.ascii_uppercase[:len(letters)]):
        raise SampleError(f"{where}:{letters[-1]}: option columns must run A, B, ... without a gap, got "
                          f"{', '.join(letters)}")
    if not choices and meta.get("question_type") == "multi_choice" and meta.get("choices"):
        choices = [str(c) for c in ast.literal_eval(meta["choices"])]  # MathVista keeps its options as a list
        if answer in choices:
            meta["answer"] = answer
            answer = meta.get("answer_option") or chr(ord("A") + choices.index(answer))
    if choices and len(choices) >= 2:
        if answer not in string.ascii_uppercase[:len(choices)]:
            raise SampleError(f"{where}:answer: expected a letter A-{chr(ord('A') + len(choices) - 1)}, "
                              f"got {answer!r}")
    else:
        choices = None
        if not answer:
            raise SampleError(f"{where}:answer: expected a non-empty answer")
    sample = {"id": row["index"].strip(), "question": question, "answer": answer, "category": category,
              "task": task, "meta": meta}
    if choices:
        sample["choices"] = choices
    return sample


def convert_tsv(path: str, out: str, *, task: str | None = None, category: str | None = None) -> dict:
    """Write ``out`` (SPEC 4.1 JSONL) and its PNGs (``OUT_STEM.images/``, paths relative to ``out``) from a TSV."""
    from .._io import atomic_write_text

    folder = os.path.splitext(out)[0] + ".images"
    samples = load_tsv(path, images=folder, task=task, category=category)
    base = os.path.dirname(os.path.abspath(out))
    lines = []
    for sample in samples:
        line = {k: v for k, v in sample.items() if k != "images"}
        line["images"] = [os.path.relpath(p, base) for p in sample["images"]]
        lines.append(json.dumps(line, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"lines": len(samples), "images": folder, "task": samples[0]["task"], "category": samples[0]["category"]}
