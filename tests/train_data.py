"""Training inputs written with gapkern's own writers: images, a sample file, target shards, a curated file."""
from __future__ import annotations

import json
import os

import PIL.Image
import torch

from gapkern.data import TargetWriter, latent_keys, load_samples


def write_image(path, size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return str(path)


def write_targets(folder, samples, k, dim, seed=0, dtype=torch.float32):
    """Random (k, dim) targets for every latent step, finished with an index; returns {key: tensor}."""
    g = torch.Generator().manual_seed(seed)
    writer = TargetWriter(str(folder), samples, meta={"g": int(k ** 0.5)}, shard_size=2)
    values = {}
    for index, chunk in writer.pending():
        tensors = {key: torch.randn(k, dim, generator=g).to(dtype) for s in chunk for key in latent_keys(s)}
        writer.write(index, tensors)
        values.update(tensors)
    writer.finish()
    return values


def task_lines(n, seed=0):
    """``n`` multiple-choice lines over the tiny vocabulary: one image each, a latent step between two text steps."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        words = (16 + torch.randint(112, (6,), generator=g)).tolist()
        answer = "AB"[i % 2]
        lines.append({
            "id": f"t{i}", "image": f"img/t{i}.png", "question": f"w{words[0]} w{words[1]}",
            "choices": [f"w{words[2]}", f"w{words[3]}"], "answer": answer, "category": "perception", "task": "tiny",
            "steps": [{"text": f"w{words[4]}"}, {"latent": {"image": f"img/t{i}.png"}, "parser": f"w{words[5]}"},
                      {"text": f"w{words[2 + i % 2]}"}],
        })
    return lines


def make_data(folder, checkpoint, n=8, g=2, hard_every=2, seed=0):
    """A curated sample file (every ``hard_every``-th line hard) and its ``gapkern build-data`` folder, built
    with :func:`gapkern.build.build_data` from the checkpoint's vision tower (K = g*g).
    Returns (data folder, curated file, samples as built)."""
    from gapkern.build import build_data
    from gapkern.models import GapQwen2_5_VLForConditionalGeneration

    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    lines = task_lines(n, seed)
    for i in range(n):
        write_image(os.path.join(folder, "img", f"t{i}.png"), seed=seed * 1000 + i)
    curated = [dict(line, attempts=[], n_correct=0 if i % hard_every == 0 else 3, hard=i % hard_every == 0)
               for i, line in enumerate(lines)]
    path = write_jsonl(os.path.join(folder, "curated.jsonl"), curated)
    samples = load_samples(path)
    model = GapQwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    data = os.path.join(folder, "data")
    build_data(model, samples, data, g=g, profile="gap", model_path=checkpoint, source=path, progress=False)
    return data, path, samples


def make_checkpoint(folder, seed=0, init_std=0.02):
    """A plain tiny Qwen2.5-VL checkpoint with the tiny tokenizer, and a PCA head file beside it.
    Returns (checkpoint folder, head file)."""
    from gapkern.testing import tiny_head, tiny_qwen2_5_vl, tiny_tokenizer

    folder = os.fspath(folder)
    model, ids = tiny_qwen2_5_vl(seed=seed, init_std=init_std)
    path = os.path.join(folder, "base")
    model.save_pretrained(path)
    tiny_tokenizer(ids).save_pretrained(path)
    head = os.path.join(folder, "head.safetensors")
    tiny_head(model, rank=8, seed=seed).save(head)
    return path, head
