"""Shared set-up of the stage tests: a tiny checkpoint folder, images on disk, a sample file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import PIL.Image
import torch

import gapkern
from gapkern.models import GapQwen2_5_VLForConditionalGeneration
from gapkern.testing import tiny_head, tiny_qwen2_5_vl, tiny_tokenizer

SIZES = [(224, 224), (112, 168), (140, 84), (200, 150)]  # (width, height); merged grids 8x8, 6x4, 3x5, 5x7


def checkpoint(path, *, gap_budget=None, calibration="none", tau_ema=None, seed=0):
    """A tiny Qwen2.5-VL saved with its tokenizer; ``gap_budget``: a gapkern checkpoint with that K, the PCA
    head of ``tiny_head``, ``calibration`` and (ema) the running target ``tau_ema``."""
    if gap_budget is None:
        model, ids = tiny_qwen2_5_vl(seed=seed)
    else:
        model, ids = tiny_qwen2_5_vl(seed=seed, model_class=GapQwen2_5_VLForConditionalGeneration)
        model.set_gap(tiny_head(model), ids.gap_config(latent_budget=gap_budget, calibration=calibration))
        if tau_ema is not None:
            model.gap.tau_ema.fill_(tau_ema)
    model.save_pretrained(path)
    tiny_tokenizer(ids).save_pretrained(path)
    return str(path)


def images(folder):
    os.makedirs(folder / "img", exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(SIZES):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        PIL.Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
    return folder


def line(i, **change):
    """Sample line i: image i % 4, a latent step on a crop of image (i + 1) % 4, multiple choice."""
    out = {"id": f"q{i}", "image": f"img/{i % 4}.png", "question": f"Which colour is shape {i}?",
           "choices": ["red", "green", "blue"], "answer": "B", "category": "perception", "task": "colour",
           "steps": [{"text": "Look at the top left."},
                     {"latent": {"image": f"img/{(i + 1) % 4}.png", "box": [0, 0, 56 + 14 * i, 56]},
                      "parser": "a green square"},
                     {"text": "It is green."}]}
    out.update(change)
    return out


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for one in lines:
            f.write((one if isinstance(one, str) else json.dumps(one)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(one) for one in f if one.strip()]


def torchrun(*argv, ranks=2, timeout=300):
    """``torchrun --nproc-per-node RANKS -m gapkern.cli ARGV`` on the CPU (gloo), one thread per rank."""
    tree = os.path.dirname(os.path.dirname(gapkern.__file__))  # this checkout's gapkern, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "gapkern.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def stage_folder(folder, lines: int):
    """``folder`` with the stage tests' images, a plain checkpoint (``model``), a gap one (``gap``, K = 4) and
    ``train.jsonl`` of ``lines`` sample lines: what the bad-input and fault tests run every stage on."""
    images(folder)
    checkpoint(folder / "model")
    checkpoint(folder / "gap", gap_budget=4)
    write_jsonl(folder / "train.jsonl", [line(i) for i in range(lines)])
    return folder
