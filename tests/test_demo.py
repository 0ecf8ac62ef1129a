"""``gapkern demo``: the task is what its lines say, the tokenizer covers it, and the small run goes end to end."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import PIL.Image
import pytest

from gapkern.cli import main
from gapkern.config import GapConfig
from gapkern.data import load_samples, teacher_response
from gapkern.demo import FolderError, run_demo
from gapkern.demo import task
from gapkern.demo.model import demo_tokenizer
from gapkern.demo.plan import PLANS
from gapkern.demo.stages import STAGES
from gapkern.prompts import prompt_text

TRAININGS = ("base", "text", "gap")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    return load_samples(task.write_split(str(folder), "train", 12, seed=3))


@pytest.fixture(scope="module")
def small(tmp_path_factory, one_thread):
    """One small demo run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo") / "out"
    lines = []
    result = run_demo(str(out), size="small", seed=0, progress=False, echo=lines.append)
    return out, result, lines


def _pixels(path, box=None):
    with PIL.Image.open(path) as img:
        img = img.convert("RGB")
        return np.asarray(img if box is None else img.crop(tuple(box)))


def _squares(pixels) -> list[tuple[str, int]]:
    """(colour, side in pixels) of each square in a crop or image, from its pixels."""
    found = []
    for name, rgb in task.COLOURS.items():
        mask = (pixels == np.array(rgb)).all(-1)
        if mask.any():
            labels = mask.sum()
            found.append((name, int(math.isqrt(int(labels)))))
    return found


def test_lines_say_what_their_images_show(split):
    sizes = {v: k for k, v in task.SIZES.items()}
    for sample in split:
        latent = [s for s in sample["steps"] if "latent" in s]
        for step in latent:  # each crop holds exactly the square its parser names
            (colour, side), = _squares(_pixels(step["latent"]["image"], step["latent"]["box"]))
            assert step["parser"] == f"a {sizes[side]} {colour} square"
        whole = _squares(_pixels(sample["images"][0]))
        letter = sample["answer"]
        picked = sample["choices"][ord(letter) - ord("A")]
        if sample["task"] == "colour":
            asked = sample["question"].split()[-2]  # "What colour is the large square?"
            assert (picked, task.SIZES[asked]) in whole and len(latent) == 1
        else:
            assert sample["task"] == "count" and sample["category"] == "reasoning"
            large = sum(side == task.SIZES["large"] for _, side in whole) if len(whole) == 3 else None
            assert len(latent) == int(picked)  # one latent step per large square
            if large is not None:  # three different colours: each square countable from the pixels
                assert large == int(picked)


def test_both_tasks_are_balanced_multiple_choice(split):
    for name, category in task.TASKS.items():
        lines = [s for s in split if s["task"] == name]
        assert len(lines) == 12 and all(s["category"] == category and len(s["choices"]) == 4 for s in lines)
    answers = [s["answer"] for s in split]
    assert len(set(answers)) >= 3  # not one letter for everything


def test_the_tokenizer_covers_every_prompt_and_response(split):
    tokenizer, ids = demo_tokenizer()
    config = GapConfig.from_tokenizer(tokenizer, latent_budget=4)
    unknown = tokenizer.convert_tokens_to_ids("<unk>")
    for sample in split:
        for latent in (True, False):
            text = prompt_text(tokenizer, sample) + teacher_response(sample, config, latent=latent)
            encoded = tokenizer(text)["input_ids"]
            assert unknown not in encoded and max(encoded) < ids.vocab_size
            decoded = tokenizer.decode(encoded, skip_special_tokens=True)
            assert f"<answer> {sample['answer']} </answer>" in decoded  # what gapkern.evaluate reads


def test_the_small_demo_runs_every_stage(small):
    out, result, lines = small
    assert result["state"] == "new" and list(result["record"]["stages"]) == list(STAGES)
    assert len([line for line in lines if line.startswith("[")]) == len(STAGES)
    half, steps = PLANS["small"].steps // 2, PLANS["small"].steps
    files = ["demo.json", "report.md", "losses.png", "task/train.jsonl", "task/eval.jsonl", "init/config.json",
             "init/tokenizer.json", "base/model.safetensors", "pca/head.safetensors", "pca/pca.json", "pca/pca.png",
             "curate/curated.jsonl", "data/build.json", "gap/model.safetensors", "text/model.safetensors",
             "eval/scores.json", "eval/scores.md",
             "eval/base/predictions.jsonl", f"eval/gap-ema-step-{half}/predictions.jsonl",
             f"gap/checkpoint-{half}/model.safetensors", f"text/checkpoint-{half}/model.safetensors",
             "diagnose/gap/diagnosis.png", "diagnose/base/diagnosis.json", "diagnose/base/table.txt"]
    for name in files:
        assert os.path.getsize(out / name) > 0, name
    assert not os.path.exists(out / "gap" / f"checkpoint-{steps}")  # the final model, kept once
    for name in ("losses.png", "pca/pca.png", "diagnose/gap/diagnosis.png", "diagnose/base/diagnosis.png"):
        with PIL.Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100


def _history(out, name):
    with open(out / name / "trainer_state.json") as f:
        return [e for e in json.load(f)["log_history"] if "loss" in e]


@pytest.mark.parametrize("name", TRAININGS)
def test_the_small_demo_losses_are_finite_and_decrease(small, name):
    out, result, _ = small
    history = _history(out, name)
    assert len(history) >= 3
    text = [e["text_loss"] for e in history]
    assert all(math.isfinite(v) for v in text) and text[-1] < text[0]
    if name == "gap":  # the hard lines train their latent spans
        assert result["record"]["stages"]["build-data"]["latent_lines"] >= 8
        latent = [e["latent_loss"] for e in history]  # one log a step; 0 for a batch without a latent slot
        assert all(math.isfinite(v) and v >= 0 for v in latent)
        trained = [v for v in latent if v > 0]
        assert len(trained) >= 6 and sum(trained[-3:]) < sum(trained[:3])
    else:
        assert all(e["latent_loss"] == 0 for e in history)


def test_the_report_holds_the_score_table(small):
    out, result, _ = small
    scores = json.loads((out / "eval" / "scores.json").read_text())
    steps = PLANS["small"].steps
    assert list(scores) == ["base", *(f"{model}, step {step}" for step in (steps // 2, steps)
                                      for model in ("text-only", "GAP none", "GAP ema"))]
    report = (out / "report.md").read_text()
    assert result["table"] in report and "Avg-P" in result["table"] and "chance (" in result["table"]
    for name, one in scores.items():
        assert set(one["tasks"]) == set(task.TASKS)
        assert f"| {name} | {100 * one['tasks']['colour']:.1f} | {100 * one['tasks']['count']:.1f} |" in report


def test_a_rerun_resumes_without_redoing_a_stage(small):
    out, first, _ = small
    lines = []
    again = run_demo(str(out), size="small", seed=0, progress=False, echo=lines.append)
    assert again["state"] == "resumed" and again["table"] == first["table"]
    stages = [line for line in lines if line.startswith("[")]
    assert len(stages) == len(STAGES) and all(line.endswith("done by an earlier run") for line in stages)


def test_another_folder_or_other_settings_are_refused(small, tmp_path):
    out, _, _ = small
    with pytest.raises(FolderError, match="seed 0 \\(asked 1\\)"):
        run_demo(str(out), size="small", seed=1, echo=lambda line: None)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="not a gapkern demo folder"):
        run_demo(str(tmp_path), size="small", echo=lambda line: None)
    assert os.listdir(tmp_path) == ["notes.txt"]  # nothing written
    with pytest.raises(FolderError, match="is a file"):
        run_demo(str(tmp_path / "notes.txt"), size="small", echo=lambda line: None)


def test_the_command_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--size", "small"]) == 2
    assert "not a gapkern demo folder" in capsys.readouterr().err


@pytest.mark.parametrize("log_lines", [True, False])
@pytest.mark.parametrize("bar", [True, False])
def test_train_without_log_lines_prints_no_log(tmp_path, capsys, one_thread, log_lines, bar):
    """The demo trains with log_lines=False: the logs stay in trainer_state.json, not one printed line each."""
    from transformers import AutoTokenizer

    from gapkern.build import load_build
    from gapkern.head import PCALatentHead
    from gapkern.models import GapQwen2_5_VLForConditionalGeneration
    from gapkern.train import attach_gap, train, training_arguments
    from train_data import make_checkpoint, make_data

    base, head = make_checkpoint(tmp_path)
    data = load_build(make_data(tmp_path, base, n=4, g=2)[0])
    model = GapQwen2_5_VLForConditionalGeneration.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    attach_gap(model, tokenizer, PCALatentHead.load(head), latent_budget=4)
    out = str(tmp_path / "out")
    args = training_arguments(out, max_steps=3, logging_steps=1, save_strategy="no", disable_tqdm=not bar)
    capsys.readouterr()
    train(model, tokenizer, data.samples, out, targets=data.targets, args=args, log_lines=log_lines)
    printed = capsys.readouterr()
    assert ("'text_loss'" in printed.out + printed.err) == log_lines
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert len([e for e in json.load(f)["log_history"] if "loss" in e]) == 3
