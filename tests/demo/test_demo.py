"""``gapkern demo``: the task is what its lines say, the tokenizer covers it, and the small run goes end to end."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

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
from gapkern.data.prompts import prompt_text

TRAININGS = ("base", "text", "oai", "pca-all", "gap", "full")
LATENT = ("oai", "pca-all", "gap", "full")


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
            asked = sample["question"].split()[-2]  # "What colour is the small square?"
            assert asked == "small" and len(latent) == 1 and len(whole) == 3  # two large distractors
            assert (picked, task.SIZES[asked]) in whole
        else:
            assert sample["task"] == "count" and sample["category"] == "reasoning"
            small = sum(side == task.SIZES["small"] for _, side in whole) if len(whole) == 4 else None
            assert len(latent) == int(picked)  # one latent step per small square
            if small is not None:  # four different colours: each square countable from the pixels
                assert small == int(picked)


@pytest.mark.parametrize("side", [1, 2, 3])
def test_the_plan_sizes_the_small_square(tmp_path, side):
    """``Plan.small_square`` (what the difficulty rule's version 2 moves) is the small squares' side in the images the
    task writes, and the latent crop still holds the square its step names."""
    samples = load_samples(task.write_split(str(tmp_path), "train", 6, seed=3, small=side))
    colour = [s for s in samples if s["task"] == "colour"]
    for sample in colour:
        whole = dict((c, n) for c, n in _squares(_pixels(sample["images"][0])))
        asked = sample["choices"][ord(sample["answer"]) - ord("A")]
        assert whole[asked] == side and sorted(whole.values()) == [side, task.SIZES["large"], task.SIZES["large"]]
        step, = [s for s in sample["steps"] if "latent" in s]
        assert _squares(_pixels(step["latent"]["image"], step["latent"]["box"])) == [(asked, side)]


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
    files = ["demo.json", "report.md", "losses.png", "accuracy.png", "task/train.jsonl", "task/eval.jsonl",
             "init/config.json", "init/tokenizer.json", "base/model.safetensors", "pca/head.safetensors",
             "pca/head-full.safetensors", "pca/pca.json", "pca/pca.png", "curate/curated.jsonl", "data/build.json",
             "data-all/build.json", *(f"{name}/model.safetensors" for name in TRAININGS),
             "eval/scores.json", "eval/scores.md", "eval/base/predictions.jsonl",
             "eval/output-as-input-ema/predictions.jsonl", "eval/full-dim-head-none/predictions.jsonl",
             "diagnose/gap/diagnosis.png", "diagnose/oai/diagnosis.json", "diagnose/oai/table.txt"]
    for name in files:
        assert os.path.getsize(out / name) > 0, name
    for name in ("losses.png", "accuracy.png", "pca/pca.png", "diagnose/gap/diagnosis.png",
                 "diagnose/oai/diagnosis.png"):
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
    if name in LATENT:  # the arms with latent lines train their latent spans
        assert result["record"]["stages"]["build-data"]["all"]["latent_lines"] >= 8
        latent = [e["latent_loss"] for e in history]  # one log a step; 0 for a batch without a latent slot
        assert all(math.isfinite(v) and v >= 0 for v in latent)
        trained = [v for v in latent if v > 0]
        if name in ("oai", "pca-all"):  # every line with a latent step trains its spans
            assert len(trained) >= 6 and sum(trained[-3:]) < sum(trained[:3])
        else:  # the hard lines only: as many logs with latent slots as the curation left hard lines
            assert bool(trained) == (result["record"]["stages"]["build-data"]["hard"]["latent_lines"] > 0)
    else:
        assert all(e["latent_loss"] == 0 for e in history)


def test_the_report_holds_every_arm_and_calibration(small):
    out, result, _ = small
    scores = json.loads((out / "eval" / "scores.json").read_text())
    arms = ["output-as-input", "PCA, all latent", "GAP", "full-dim head"]
    assert list(scores) == ["base", "text-only", *(f"{arm}, {mode}" for arm in arms for mode in ("none", "ema"))]
    record = json.loads((out / "demo.json").read_text())["stages"]["eval"]["scores"]
    report = (out / "report.md").read_text()
    assert result["table"] in report and "Avg-P" in result["table"] and "Dimensionality ablation" in report
    for name, one in scores.items():
        assert record[name] == one and set(one["tasks"]) == set(task.TASKS)
        lines = [json.loads(line) for line in (out / "eval" / one["predictions"]).read_text().splitlines()]
        opened = sum(line["latents"] > 0 for line in lines)
        assert one["span_rate"] == opened / len(lines) and one["span_lines"] == opened
        assert one["latents_per_line"] == sum(line["latents"] for line in lines) / len(lines)
        assert (one["norms"] is None) == (opened == 0)
        if name in ("base", "text-only"):
            assert opened == 0
        if one["norms"]:  # measured at the spans that opened: one norm per latent written
            assert one["norms"]["count"] == sum(line["latents"] for line in lines)
        assert f"| {name} | {100 * one['tasks']['colour']:.1f} | {100 * one['tasks']['count']:.1f} |" in report
        if one["span_lines"]:  # the report names the arms that opened spans, with their rate
            assert f"{name} {100 * one['span_rate']:.1f}%" in report.split("Spans at inference: ")[1].split("\n")[0]


def test_demo_json_holds_every_configuration_for_a_script(small):
    """demo.json's ``configurations``: every arm x calibration with its scores and span rate; where a span opened,
    the norm ratios at those spans (and none where none opened)."""
    out, result, _ = small
    record = json.loads((out / "demo.json").read_text())
    scores = record["stages"]["eval"]["scores"]
    table = record["configurations"]
    arms = ["output-as-input", "PCA, all latent", "GAP", "full-dim head"]
    assert list(table) == ["base", "text-only", *(f"{arm}, {mode}" for arm in arms for mode in ("none", "ema"))]
    for name, row in table.items():
        one = scores[name]
        assert row["tasks"] == one["tasks"] and row["span_rate"] == one["span_rate"]
        assert (row["avg_p"], row["avg_r"], row["latents_per_line"]) == (one["avg_p"], one["avg_r"],
                                                                         one["latents_per_line"])
        n = one["counts"]["colour"]
        assert row["avg_p_se"] == pytest.approx(math.sqrt(one["avg_p"] * (1 - one["avg_p"]) / n))
        assert row["calibration"] == ("none" if name in ("base", "text-only") else name.rsplit(", ", 1)[1])
        if one["span_lines"]:
            assert row["norm_ratio"] == {"before": one["norms"]["before_ratio"], "after": one["norms"]["after_ratio"]}
        else:
            assert row["norm_ratio"] is None
    assert table["output-as-input, ema"]["norm_ratio"]["after"] == pytest.approx(1.0, rel=0.05)


def test_the_all_latent_arms_open_spans_and_ema_moves_the_norm(small):
    """Trained with a span on every line that has a latent step, output-as-input opens spans at greedy decoding,
    and ema brings its latents to the visual input norm (calibration none leaves them where the hidden state is)."""
    _, result, _ = small
    scores = result["record"]["stages"]["eval"]["scores"]
    none, ema = scores["output-as-input, none"], scores["output-as-input, ema"]
    assert none["span_rate"] > 0 and ema["span_rate"] > 0
    assert ema["norms"]["after_ratio"] == pytest.approx(1.0, rel=0.05)
    assert none["norms"]["after_ratio"] == pytest.approx(none["norms"]["before_ratio"])
    assert abs(none["norms"]["after_ratio"] - 1.0) > 0.05


def test_binomial_errors_and_the_difficulty_rule():
    from gapkern.demo.difficulty import check
    from gapkern.demo.report import se

    one = {"tasks": {"colour": 0.5, "count": 0.9}, "counts": {"colour": 100, "count": 400},
           "categories": {"colour": "perception", "count": "reasoning"}}
    assert se(one, "avg_p") == pytest.approx(0.05) and se(one, "avg_r") == pytest.approx(0.015)
    text = dict(one, tasks={"colour": 0.95, "count": 0.9})
    assert check({"base": one, "text-only": text}, "colour") == {
        "base 30-60% on perception": True, "text-only < 90% on perception": False, "no configuration at 100%": True}
    full = dict(one, tasks={"colour": 0.2, "count": 1.0})
    assert check({"base": full, "text-only": full}, "colour") == {
        "base 30-60% on perception": False, "text-only < 90% on perception": True, "no configuration at 100%": False}


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


def test_the_record_keeps_its_own_keys(tmp_path):
    from gapkern.demo.folder import Folder

    folder = Folder(str(tmp_path / "out"), {"size": "small"})
    folder.open()
    folder.put("configurations", {"base": {"span_rate": 0.0}})
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["configurations"] == {"base": {"span_rate": 0.0}}
    with pytest.raises(ValueError, match="'stages' is the record's own"):
        folder.put("stages", {})


def test_spread_is_mean_and_standard_deviation():
    from gapkern.demo.seeds import spread

    runs = [{"GAP, none": {"avg_p": 0.5, "avg_r": 0.25, "span_rate": 0.0}},
            {"GAP, none": {"avg_p": 0.7, "avg_r": 0.25, "span_rate": 0.5}}]
    found = spread(runs)["GAP, none"]
    assert found["avg_p"]["mean"] == pytest.approx(0.6) and found["avg_p"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert found["avg_r"] == {"mean": 0.25, "sd": 0.0, "values": [0.25, 0.25]}
    assert spread(runs[:1])["GAP, none"]["span_rate"]["sd"] == 0.0


def test_the_command_runs_seeds_and_refuses_no_seed(tmp_path, capsys, one_thread):
    assert main(["demo", "--out", str(tmp_path / "none"), "--size", "small", "--seeds", "0"]) == 2
    assert "--seeds: expected a count of at least 1, got 0" in capsys.readouterr().err
    out = tmp_path / "seeds"
    assert main(["demo", "--out", str(out), "--size", "small", "--seed", "5", "--seeds", "2"]) == 0
    found = json.loads((out / "seeds.json").read_text())
    assert found["seeds"] == [5, 6] and sorted(os.listdir(out)) == ["seed-5", "seed-6", "seeds.json", "seeds.md"]
    for s in (5, 6):
        assert json.loads((out / f"seed-{s}" / "demo.json").read_text())["settings"]["seed"] == s
    each = [json.loads((out / f"seed-{s}" / "demo.json").read_text())["configurations"] for s in (5, 6)]
    assert list(found["scores"]) == list(each[0])
    for name, keys in found["scores"].items():
        assert keys["span_rate"]["values"] == [run[name]["span_rate"] for run in each]
    assert "| GAP, none |" in (out / "seeds.md").read_text()


def _demo_files(out) -> dict:
    """Every file of a demo folder, name -> content, with what differs between two equal runs into the same
    folder taken out: the stage times (demo.json's ``seconds``, report.md's "Stage times" line and its minutes),
    the Trainer's timings of each training (trainer_state.json's last entry: train_runtime,
    train_samples_per_second, train_steps_per_second) and whether it showed a progress bar (training_args.bin's
    disable_tqdm: the commands show one, the fixture's library call does not)."""
    import io
    import re

    import torch

    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                raw = f.read()
            if name == "demo.json":
                raw = json.loads(raw)
                for stage in raw["stages"].values():
                    stage.pop("seconds")
            elif name == "trainer_state.json":
                raw = json.loads(raw)
                raw["log_history"] = [{k: v for k, v in e.items() if k not in timing} for e in raw["log_history"]]
            elif name == "training_args.bin":  # the killed runs were commands (a bar), the fixture's had none
                raw = torch.load(io.BytesIO(raw), weights_only=False).to_dict()
                raw.pop("disable_tqdm")
            elif name == "report.md":
                raw = re.sub(r"Stage times: .*", "", re.sub(r"[\d.]+ minutes", "", raw.decode()))
            found[os.path.relpath(path, out)] = raw
    return found


def test_a_demo_killed_between_and_inside_stages_resumes_to_the_uninterrupted_result(small, tmp_path):
    """SIGKILL after stage init wrote its folder but before demo.json recorded it (between stages: the rerun
    redoes init from scratch), then SIGINT inside curate after its first line (the rerun's curate resumes from
    its parts); the third run finishes with every file of the uninterrupted demo, byte for byte but for times.
    It runs in the uninterrupted demo's folder (set aside meanwhile): files hold their folder's path (build.json,
    training_args.bin, the sample digests of the curated settings)."""
    out, _, _ = small
    want = tmp_path / "uninterrupted"
    os.replace(out, want)
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
        for point, signal in (("stage@init", "KILL"), ("line", "INT")):
            killed = subprocess.run([sys.executable, os.path.join(root, "tests", "kill_at.py"), point, signal, "--",
                                     "demo", "--out", str(out), "--size", "small"], capture_output=True, text=True,
                                    env=env, timeout=600, cwd=str(tmp_path))
            assert "signalled" in killed.stderr and killed.returncode != 0, killed.stderr[-2000:]
        stages = json.loads((out / "demo.json").read_text())["stages"]
        assert list(stages) == list(STAGES)[:list(STAGES).index("curate")]  # stopped inside curate
        assert os.path.isdir(out / "curate" / "curated.jsonl.parts")
        assert main(["demo", "--out", str(out), "--size", "small"]) == 0
        got, expected = _demo_files(out), _demo_files(want)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(want, out)  # the other tests read the uninterrupted demo
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
