"""The 7B-shaped, real-tokenizer checkpoint through every command (issue 18, item 5).

``gapkern.testing.real`` writes a Qwen2.5-VL-7B-Instruct-shaped folder (D = 3584, vocab 152064,
M-RoPE sections [16, 24, 24], the 1280-wide vision tower and its merger) with 2 language layers and
2 vision blocks, random bfloat16 weights, the Qwen2 BPE tokenizer with Qwen2.5-VL's special tokens and
chat template, and the released preprocessor / generation configs. Each command runs as a user runs
it, one process after the other (each holds one bfloat16 copy, ~3.3 GB), in bfloat16 with a frozen
language model. More runs are one line each in ``COMMANDS``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gapkern
from gapkern.testing.real import real_checkpoint, real_tokenizer

from bench_tsvs import write_tsv
from stages import images, line, read_jsonl, write_jsonl

BF16 = ("--device", "cpu", "--dtype", "bfloat16")


def gapkern_cli(*argv, timeout=900):
    """``python -m gapkern.cli ARGV`` with this checkout's gapkern; fails the test with its output on an error."""
    tree = os.path.dirname(os.path.dirname(gapkern.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"gapkern {' '.join(map(str, argv))}: exit {done.returncode}\n" \
                                 f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The checkpoint, four images and a sample file of four lines (one latent step each), in one tmp folder."""
    root = tmp_path_factory.mktemp("real")
    real_checkpoint(root / "ckpt")
    images(root)
    write_jsonl(root / "samples.jsonl", [line(i) for i in range(4)])
    return root


def test_latent_span_round_trips_through_the_real_tokenizer():
    """``<latent>`` + K pads + ``</latent><parser>...</parser>``: each marker one token at the id gapkern adds
    it with (after Qwen2.5-VL's 151665 tokens), the parser text Qwen2 BPE, and decoding gives the text back."""
    from gapkern.data import teacher_response
    from gapkern.models.tokens import add_latent_tokens

    tok = real_tokenizer()
    assert len(tok) == 151665
    cfg = add_latent_tokens(tok, latent_budget=4)
    assert (cfg.latent_start_id, cfg.latent_end_id, cfg.latent_pad_id) == (151665, 151666, 151667)
    text = teacher_response(line(0), cfg)
    ids = tok(text)["input_ids"]
    span = [151665] + [151667] * 4 + [151666, tok.convert_tokens_to_ids("<parser>")]
    start = ids.index(151665)
    assert ids[start:start + len(span)] == span
    assert tok.decode(ids) == text


def test_response_text_keeps_the_span_markers():
    """A response's text drops EOS and padding but keeps the latent tokens, so the span and its parser
    description stay readable (and the parser text does not glue to the words around it)."""
    from gapkern.models.tokens import add_latent_tokens
    from gapkern.stages.responses import response_texts

    tok = real_tokenizer()
    cfg = add_latent_tokens(tok, latent_budget=2)
    body = "Look.<latent><latent_pad><latent_pad></latent><parser>a green square</parser>It is green."
    ids = tok(body + "<|im_end|>")["input_ids"] + [tok.pad_token_id] * 2
    assert tok.decode(ids, skip_special_tokens=True) == "Look.a green squareIt is green."  # what eval wrote
    assert response_texts(tok, torch.tensor([ids]), cfg.profile) == [body]


@pytest.mark.slow
def test_every_command_runs_on_the_7b_shaped_checkpoint(real, tmp_path):
    ckpt, samples = real / "ckpt", real / "samples.jsonl"
    out = gapkern_cli("fit-pca", "--model", ckpt, "--samples", samples, "--out", tmp_path / "pca", "--latent-images",
                      *BF16)
    assert "D=3584" in out
    pca = json.loads((tmp_path / "pca" / "pca.json").read_text())
    assert pca["dim"] == 3584 and pca["d"] >= 1

    gapkern_cli("curate", "--model", ckpt, "--samples", samples, "--out", tmp_path / "curated.jsonl",
                "--attempts", 2, "--max-new-tokens", 4, *BF16)
    curated = read_jsonl(tmp_path / "curated.jsonl")
    assert [len(c["attempts"]) for c in curated] == [2] * 4

    gapkern_cli("build-data", "--model", ckpt, "--samples", samples, "--out", tmp_path / "data", "--grid", 2, *BF16)
    assert json.loads((tmp_path / "data" / "build.json").read_text())["dim"] == 3584

    gapkern_cli("train", "--model", ckpt, "--data", tmp_path / "data", "--head", tmp_path / "pca" / "head.safetensors",
                "--out", tmp_path / "gap", "--max-steps", 2, "--save-steps", 1, "--logging-steps", 1, "--lr", 1e-3,
                "--freeze-lm", "--keep-checkpoints", 0)
    gap = tmp_path / "gap"
    # saved in the checkpoint's bfloat16 (not float32: twice the size), no checkpoint-N copy left, the head alone
    assert os.path.getsize(gap / "model.safetensors") < 1.01 * os.path.getsize(ckpt / "model.safetensors")
    assert not list(gap.glob("checkpoint-*")) and (gap / "head.safetensors").is_file()

    gapkern_cli("eval", "--model", gap, "--samples", samples, "--out", tmp_path / "eval", "--span-at", 1,
                "--max-new-tokens", 10, *BF16)
    predictions = [json.loads(x) for x in (tmp_path / "eval").rglob("predictions*.jsonl") for x in x.read_text().splitlines()]
    assert predictions and all("<latent>" in p["prediction"] for p in predictions)  # the forced span, readable

    gapkern_cli("diagnose", "--model", gap, "--samples", samples, "--out", tmp_path / "diag", "--span-at", 1,
                "--max-new-tokens", 8, "--limit", 2, *BF16)
    gapkern_cli("generate", "--model", gap, "--image", real / "img" / "0.png", "--span-at", 1,
                "--max-new-tokens", 8, *BF16)
    # the monet layout on the same checkpoint (Monet's runner: the start position takes the first latent)
    printed = gapkern_cli("generate", "--model", gap, "--image", real / "img" / "0.png", "--span-at", 1,
                          "--span-layout", "monet", "--max-new-tokens", 14, *BF16)
    assert "monet layout" in printed
    # a benchmark's own file: a VLMEvalKit TSV, judged by VLMEvalKit's rules
    tsv = write_tsv(tmp_path, "HRBench4K")
    gapkern_cli("eval", "--model", gap, "--samples", tsv, "--rules", "vlmevalkit", "--out", tmp_path / "tsv",
                "--max-new-tokens", 6, *BF16)
    scores = json.loads(next((tmp_path / "tsv").rglob("scores.json")).read_text())
    assert "HRBench4K" in json.dumps(scores)
