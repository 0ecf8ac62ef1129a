"""The sample file (SPEC 4.1, 4.4): its schema, the teacher response and the question of a line.

- ``load_samples``: reads a JSONL sample file, validates every line, and
  resolves image paths against the file's folder; a bad line is an error
  ``file:line:field: what was expected``.
- ``teacher_response``: ``<think>`` + steps + ``</think><answer>`` + answer
  + ``</answer>``, a latent step being start + K x pad + end + open + parser
  + close in the profile's tokens (``latent=False`` drops latent steps whole).
- ``question_text``: the user turn's text of a sample; every prompt of the
  GAP path (curation, training, evaluation) is built from it.
- ``uses_latents``: whether a line trains with its latent steps (SPEC 4.4).
"""
from __future__ import annotations

import json
import math
import os

from ..config import PROFILES
from .schema import ANSWER_FORMAT, CATEGORIES, SampleError

__all__ = ["SampleError", "CATEGORIES", "load_samples", "teacher_response", "question_text", "ANSWER_FORMAT",
           "uses_latents"]

KEYS = frozenset({"id", "image", "images", "question", "choices", "answer", "category", "task", "steps", "meta"})
CURATED = {"attempts": list, "n_correct": int, "hard": bool}  # what curation adds to a line (SPEC 4.4)


def load_samples(path: str, *, images: str | None = None, category: str | None = None) -> list[dict]:
    """Every sample of a JSONL file, validated; image paths made absolute and ``image`` given as ``images``.

    Blank lines are skipped. Ids must be unique (they key the latent targets). A VLMEvalKit TSV (``.tsv``) is
    read by :func:`gapkern.data.benchfiles.load_tsv`, its images decoded once into the folder ``images`` (default:
    beside the TSV); ``category``: for a benchmark outside its built-in table.
    """
    from .benchfiles import is_tsv, load_tsv

    if is_tsv(path):
        return load_tsv(path, images=images, category=category)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no sample file at {path!r}")
    folder, samples, seen, sizes = os.path.dirname(os.path.abspath(path)), [], {}, {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            check = _Check(f"{path}:{number}", folder, sizes)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                check.fail("line", f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SampleError(f"{path}:{number}:line: not valid JSON ({e.msg} at column {e.colno})") from None
            sample = check.sample(obj)
            if sample["id"] in seen:
                check.fail("id", f"{sample['id']!r} is already the id of line {seen[sample['id']]}")
            seen[sample["id"]] = number
            samples.append(sample)
    if not samples:
        raise ValueError(f"path: {path!r} holds no samples")
    return samples


class _Check:
    """Validation of one line; ``fail`` raises SampleError naming file, line and field."""

    def __init__(self, where: str, folder: str, sizes: dict):
        self.where, self.folder, self.sizes = where, folder, sizes

    def fail(self, field: str, message: str):
        raise SampleError(f"{self.where}:{field}: {message}")

    def sample(self, obj) -> dict:
        if not isinstance(obj, dict):
            self.fail("line", f"expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - KEYS - set(CURATED))
        if unknown:
            self.fail(unknown[0], f"unknown key (expected {', '.join(sorted(KEYS))}; put extras under 'meta')")
        for field, kind in CURATED.items():
            if field in obj and (not isinstance(obj[field], kind) or kind is int and isinstance(obj[field], bool)):
                self.fail(field, f"expected a {kind.__name__} (as curate writes it), got {obj[field]!r}")
        out = dict(obj)
        for field in ("id", "question", "task"):
            self.text(out, field)
        if "image" in out and "images" in out:
            self.fail("image", "give 'image' or 'images', not both")
        images = [out.pop("image")] if "image" in out else out.get("images", [])
        field = "image" if "image" in obj else "images"
        if not isinstance(images, list):
            self.fail(field, f"expected a list of paths, got {type(images).__name__}")
        out["images"] = [self.image(f"{field}[{i}]" if field == "images" else field, p) for i, p in enumerate(images)]
        self.answer(out)
        if out.get("category") not in CATEGORIES:
            self.fail("category", f"expected one of {', '.join(CATEGORIES)}, got {out.get('category')!r}")
        if "steps" in out:
            if not isinstance(out["steps"], list):
                self.fail("steps", f"expected a list of steps, got {type(out['steps']).__name__}")
            out["steps"] = [self.step(f"steps[{i}]", s) for i, s in enumerate(out["steps"])]
        return out

    def text(self, obj: dict, field: str, where: str | None = None) -> str:
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            self.fail(where or field, f"expected a non-empty string, got {value!r}")
        return value

    def image(self, field: str, value) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"expected an image path, got {value!r}")
        path = os.path.join(self.folder, value)  # an absolute value stays as it is
        if not os.path.isfile(path):
            self.fail(field, f"no file at {path!r}")
        self.image_size(field, path)
        return path

    def answer(self, out: dict) -> None:
        choices, answer = out.get("choices"), out.get("answer")
        if choices is not None:
            if (not isinstance(choices, list) or not 2 <= len(choices) <= 26
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                self.fail("choices", f"expected a list of 2 to 26 non-empty strings, got {choices!r}")
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            if answer not in letters:
                self.fail("answer", f"expected a letter {letters[0]}-{letters[-1]} (one per choice), got {answer!r}")
        elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            self.fail("answer", f"expected a non-empty string or a number, got {answer!r}")
        elif isinstance(answer, float) and not math.isfinite(answer):
            self.fail("answer", f"expected a finite number, got {answer!r}")

    def step(self, field: str, step) -> dict:
        if not isinstance(step, dict):
            self.fail(field, f"expected an object with 'text', or 'latent' and 'parser', got {step!r}")
        if set(step) == {"text"}:
            self.text(step, "text", f"{field}.text")
            return step
        if set(step) != {"latent", "parser"}:
            self.fail(field, f"expected the keys 'text', or 'latent' and 'parser', got {sorted(step)}")
        self.text(step, "parser", f"{field}.parser")
        latent = step["latent"]
        if not isinstance(latent, dict) or "image" not in latent or not set(latent) <= {"image", "box"}:
            self.fail(f"{field}.latent", f"expected an object with 'image' and an optional 'box', got {latent!r}")
        path = self.image(f"{field}.latent.image", latent["image"])
        out = {"image": path}
        if "box" in latent:
            out["box"] = self.box(f"{field}.latent.box", latent["box"], path)
        return {"latent": out, "parser": step["parser"]}

    def box(self, field: str, box, path: str) -> list:
        numbers = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        if not numbers or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
            self.fail(field, f"expected [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1, got {box!r}")
        x0, y0, x1, y1 = (round(v) for v in box)  # the pixels _read_crop cuts
        if not (x0 < x1 and y0 < y1):
            self.fail(field, f"{box!r} rounds to an empty crop ({x1 - x0}x{y1 - y0} pixels)")
        size = self.image_size(field, path)
        if size is not None and (box[2] > size[0] or box[3] > size[1]):
            self.fail(field, f"{box!r} reaches outside the {size[0]}x{size[1]} image {path!r}")
        return box

    def image_size(self, field: str, path: str):
        """(width, height) of the image, decoded once per file (a damaged or truncated one fails here, not in a
        stage); None without Pillow (then checked on use)."""
        if path not in self.sizes:
            try:
                from PIL import Image
            except ImportError:
                return None
            try:
                with Image.open(path) as img:
                    img.load()
                    self.sizes[path] = img.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self.fail(field, f"cannot read the image {path!r} ({type(e).__name__}: {e})")
        return self.sizes[path]


def teacher_response(sample: dict, config, *, latent: bool = True) -> str:
    """``<think>`` + the steps joined by newlines + ``</think><answer>`` + answer + ``</answer>``.

    A latent step is ``start + K * pad + end + open + parser + close`` in the
    tokens of ``config.profile``, ``K = config.latent_budget``. With
    ``latent=False`` every latent step (its span and its description) is left
    out: the plain-text form easy lines train on (SPEC 4.4).
    """
    profile = getattr(config, "profile", None)
    if profile not in PROFILES:
        raise ValueError(f"config: expected a GapConfig with a profile among {', '.join(PROFILES)}, got {config!r}")
    start, end, pad, open_, close = PROFILES[profile]
    parts = []
    for step in sample.get("steps") or []:
        if "text" in step:
            parts.append(step["text"])
        elif latent:
            parts.append(start + pad * config.latent_budget + end + open_ + step["parser"] + close)
    return f"<think>{chr(10).join(parts)}</think><answer>{sample['answer']}</answer>"


def question_text(sample: dict) -> str:
    """The user turn's text: the question, one line per choice (``A. red``), then :data:`ANSWER_FORMAT`.

    The images come before this text in the same turn (one image entry each,
    in ``images`` order). Curation, training and evaluation all build their
    prompts from this one function, so the model is asked the same way in each.
    """
    from ..protocol import user_text

    return user_text(sample, None)


def uses_latents(sample: dict) -> bool:
    """Whether a line trains with its latent steps: a hard line, or any line that was not curated (SPEC 4.4)."""
    return sample.get("hard", True) is not False
