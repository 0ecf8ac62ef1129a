"""``gapkern eval`` (SPEC 4.6): configurations side by side, judged predictions, scores, the table, resuming."""
from __future__ import annotations

import json
import os

import pytest
import torch

import gapkern
import gapkern.stages.responses
from gapkern.cli import main
from gapkern.data import image_inputs, load_samples, visual_embeddings
from gapkern.evaluate import evaluate, extract_answer, is_correct, score, score_table
from gapkern.testing import tiny_qwen2_5_vl, tiny_tokenizer
from gapkern.stages.responses import ema_start

from stages import checkpoint, images, line, read_jsonl, torchrun, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
# new positions: text, the forced start at 1, K = 2 latents, the forced end, text
OPTIONS = ["--max-new-tokens", "6", "--span-at", "1", "--latent-budget", "2", "--batch", "2"]


def lines():
    out = [line(i) for i in range(3)]  # multiple choice, perception task "colour"
    out.append({k: v for k, v in line(3, answer=12, category="reasoning", task="count").items()
                if k not in ("choices", "image")})  # no image, a number
    out += [{k: v for k, v in line(i, answer="green", task="name").items() if k != "choices"} for i in (4, 5)]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("eval"))
    checkpoint(folder / "plain")  # output-as-input: a plain Qwen2.5-VL, no head
    checkpoint(folder / "gap", gap_budget=2)  # a gapkern checkpoint with a PCA head
    write_jsonl(folder / "test.jsonl", lines())
    return folder


def evaluate_cli(capsys, folder, out, *extra, models=("plain", "gap"), samples="test.jsonl", code=0):
    argv = ["eval", "--model", ",".join(str(folder / m) for m in models), "--samples", str(folder / samples),
            "--out", str(out), *OPTIONS, *extra]
    got = main(argv)
    captured = capsys.readouterr()
    assert got == code, captured.err
    return captured.out if code == 0 else captured.err


def outputs(out) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes)."""
    found = {}
    for root, _, files in os.walk(out):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


# ---- the command ---------------------------------------------------------------------------------------------


def test_configurations_are_judged_scored_and_tabled(capsys, folder, tmp_path):
    """Lines answered as the model answers them are correct, in that configuration only where the predictions
    differ; the scores and the table are those of the predictions."""
    names = ["base/none", "base/ema", "gap/none", "gap/ema"]
    evaluate_cli(capsys, folder, tmp_path / "first", "--names", "base,gap", "--calibration", "none,ema")
    first = {name: read_jsonl(tmp_path / "first" / name / "predictions.jsonl") for name in names}
    answered = lines()
    for i in (4, 5):  # free text, answered as gap/ema answered it (the answer is not in the prompt)
        answered[i]["answer"] = first["gap/ema"][i]["answer"]
        assert answered[i]["answer"]
    write_jsonl(folder / "answered.jsonl", answered)

    printed = evaluate_cli(capsys, folder, tmp_path / "out", "--names", "base,gap", "--calibration", "none,ema",
                           samples="answered.jsonl")
    samples = load_samples(str(folder / "answered.jsonl"))
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert list(scores) == names
    for name in names:
        records = read_jsonl(tmp_path / "out" / name / "predictions.jsonl")
        assert [r["prediction"] for r in records] == [r["prediction"] for r in first[name]]  # same prompts
        for record, sample in zip(records, samples, strict=True):
            assert {k: record[k] for k in ("id", "task", "category")} == {k: sample[k] for k in
                                                                          ("id", "task", "category")}
            assert record["expected"] == sample["answer"]
            assert record["answer"] == extract_answer(record["prediction"])
            assert record["correct"] is is_correct(record["prediction"], sample)
            assert record["latents"] == 2  # the forced span, K = 2
        assert {k: scores[name][k] for k in ("tasks", "counts", "categories", "avg_p", "avg_r")} == score(records)
        settings = json.loads((tmp_path / "out" / name / "settings.json").read_text())
        assert settings["gap"]["calibration"] == scores[name]["calibration"] == name.split("/")[1]
        assert settings["head"] == scores[name]["head"] == ("none" if name.startswith("base") else "checkpoint")
    assert scores["gap/ema"]["tasks"]["name"] == 1.0
    assert scores["gap/ema"]["avg_p"] == pytest.approx((scores["gap/ema"]["tasks"]["colour"] + 1.0) / 2)
    assert scores["gap/ema"]["avg_r"] == scores["gap/ema"]["tasks"]["count"]
    assert any(a["prediction"] != b["prediction"] for a, b in zip(first["gap/none"], first["gap/ema"]))
    table = (tmp_path / "out" / "scores.md").read_text()
    assert table == score_table(scores) and table in printed
    assert table.splitlines()[0] == "| configuration | colour | name | count | Avg-P | Avg-R |"
    cells = [cell.strip() for cell in table.splitlines()[5].strip("|").split("|")]
    assert cells[:3] == ["gap/ema", f"{100 * scores['gap/ema']['tasks']['colour']:.1f}", "100.0"]


def test_names_default_to_folders_and_only_keeps_some(capsys, folder, tmp_path):
    printed = evaluate_cli(capsys, folder, tmp_path, "--calibration", "none,rms,ema", "--only", "gap/rms,plain/none")
    assert list(json.loads((tmp_path / "scores.json").read_text())) == ["plain/none", "gap/rms"]
    assert sorted(os.listdir(tmp_path)) == ["gap", "plain", "scores.json", "scores.md"]
    assert "| plain/none |" in printed and "| gap/rms |" in printed


def test_without_calibration_each_checkpoint_runs_its_own(capsys, folder, tmp_path):
    evaluate_cli(capsys, folder, tmp_path)
    assert list(json.loads((tmp_path / "scores.json").read_text())) == ["plain/none", "gap/none"]


def test_span_layout_option_decodes_and_is_recorded(capsys, folder, tmp_path):
    """--span-layout monet replaces the checkpoint's layout: recorded in settings.json and scores.json's run;
    the forced span still holds K = 2 latents (start, one placeholder, end)."""
    evaluate_cli(capsys, folder, tmp_path, "--span-layout", "monet", models=("gap",))
    settings = json.loads((tmp_path / "gap" / "none" / "settings.json").read_text())
    assert settings["gap"]["span_layout"] == "monet" and settings["gap"]["latent_budget"] == 2
    assert [r["latents"] for r in read_jsonl(tmp_path / "gap" / "none" / "predictions.jsonl")] == [2] * 6
    evaluate_cli(capsys, folder, tmp_path / "gap-layout", models=("gap",))
    settings = json.loads((tmp_path / "gap-layout" / "gap" / "none" / "settings.json").read_text())
    assert settings["gap"]["span_layout"] == "gap"


class Killed(BaseException):
    """Stands for the kill: nothing in eval may catch it."""


@pytest.mark.parametrize("cut", ["after-lines", "mid-line"])
def test_killed_run_resumes_to_the_same_files(capsys, folder, tmp_path, monkeypatch, cut):
    run = ("--names", "base,gap", "--calibration", "none,ema")
    evaluate_cli(capsys, folder, tmp_path / "whole", *run)
    whole = outputs(tmp_path / "whole")

    real, calls = gapkern.stages.responses.generate_responses, []

    def dies_in_the_sixth_batch(model, tokenizer, samples, **kw):
        calls.append([s["id"] for s in samples])
        if len(calls) == 6:  # base/none 3 batches, base/ema 2 done, the third dies
            raise Killed
        return real(model, tokenizer, samples, **kw)

    monkeypatch.setattr(gapkern.stages.responses, "generate_responses", dies_in_the_sixth_batch)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        main(["eval", "--model", f"{folder / 'plain'},{folder / 'gap'}", "--samples", str(folder / "test.jsonl"),
              "--out", str(out), *OPTIONS, *run])
    part = out / "base" / "ema" / "predictions.jsonl.parts" / "part-00000.jsonl"
    written = part.read_bytes().splitlines(keepends=True)
    assert len(written) == 4 and (out / "base" / "none" / "predictions.jsonl").exists()
    assert not (out / "scores.json").exists()
    part.write_bytes(b"".join(written[:3]) + (written[3][:25] if cut == "mid-line" else b""))

    calls.clear()
    monkeypatch.setattr(gapkern.stages.responses, "generate_responses",
                        lambda *a, **kw: (calls.append([s["id"] for s in a[2]]), real(*a, **kw))[1])
    evaluate_cli(capsys, folder, out, *run)
    assert outputs(out) == whole
    assert calls == [["q2", "q3"], ["q4", "q5"]] + [["q0", "q1"], ["q2", "q3"], ["q4", "q5"]] * 2
    calls.clear()
    evaluate_cli(capsys, folder, out, *run)  # finished: nothing to generate, the same files
    assert calls == [] and outputs(out) == whole


def test_a_finished_configuration_with_other_settings_is_an_error(capsys, folder, tmp_path):
    evaluate_cli(capsys, folder, tmp_path, models=("gap",))
    err = evaluate_cli(capsys, folder, tmp_path, "--max-new-tokens", "5", models=("gap",), code=2)
    assert err.startswith("gapkern eval: error: --out: ") and "other settings (max_new_tokens 6 -> 5)" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, option", [
    (["--calibration", "none,foo"], "--calibration"), (["--calibration", "ema,ema"], "--calibration"),
    (["--samples", "missing.jsonl"], "--samples"), (["--model", "nowhere"], "--model"),
    (["--only", "plain/rms"], "--only"), (["--names", "one"], "--names"), (["--names", "a,a"], "--names"),
    (["--head", "missing.safetensors"], "--head"), (["--head", "narrow"], "--head"),
    (["--span-at", "6"], "--span-at"), (["--batch", "0"], "--batch"), (["--temperature", "-1"], "--temperature"),
    (["--latent-budget", "0"], "--latent-budget"), (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_options_are_one_line_errors(capsys, folder, tmp_path, argv, option):
    if argv == ["--head", "narrow"]:
        head = gapkern.PCALatentHead(torch.linalg.qr(torch.randn(32, 4))[0].contiguous(), torch.zeros(32))
        head.save(str(tmp_path / "narrow.safetensors"))
        argv = ["--head", str(tmp_path / "narrow.safetensors")]
    argv = [str(folder / a) if a in ("missing.jsonl", "nowhere") else a for a in argv]
    base = {"--model": f"{folder / 'plain'},{folder / 'gap'}", "--samples": str(folder / "test.jsonl"),
            "--out": str(tmp_path / "out")}
    base.update(dict(zip(argv[::2], argv[1::2])))
    options = [x for k, v in base.items() for x in (k, v)]
    rest = [x for k, v in zip(OPTIONS[::2], OPTIONS[1::2]) if k not in base for x in (k, v)]
    code = main(["eval", *options, *rest])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"gapkern eval: error: {option}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_two_ranks_evaluate_what_one_evaluates(capsys, folder, tmp_path):
    run = ["--model", str(folder / "gap"), "--samples", str(folder / "test.jsonl"), *OPTIONS,
           "--calibration", "none,ema"]
    evaluate_cli(capsys, folder, tmp_path / "one", "--calibration", "none,ema", models=("gap",))
    done = torchrun("eval", *run, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")  # the ema target is the same on every rank


# ---- the library ---------------------------------------------------------------------------------------------


def test_score_table_rows_columns_and_missing_cells():
    scores = {
        "a|b": score([{"task": "vista", "category": "reasoning", "correct": True},
                      {"task": "hr", "category": "perception", "correct": False},
                      {"task": "hr", "category": "perception", "correct": True}]),
        "c": {"tasks": {"star": 1 / 3}, "avg_p": 1 / 3, "avg_r": None},  # hand-made: no categories, no counts
    }
    assert score_table(scores) == (
        "| configuration | hr | star | vista | Avg-P | Avg-R |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| a\\|b | 50.0 | - | 100.0 | 50.0 | 100.0 |\n"
        "| c | - | 33.3 | - | 33.3 | - |\n")


@pytest.fixture(scope="module")
def tiny(folder):
    model, ids = tiny_qwen2_5_vl()
    gapkern.patch(model, None, ids.gap_config(calibration="ema", latent_budget=2))
    return model, tiny_tokenizer(ids), load_samples(str(folder / "test.jsonl"))


def test_ema_start_is_the_running_target_over_the_files_batches(tiny):
    model, _, samples = tiny
    expected = 0.0
    for i in range(0, len(samples), 4):
        norms = [visual_embeddings(model, **image_inputs(path, model.config.vision_config))[0].norm(dim=-1)
                 for s in samples[i:i + 4] for path in s["images"]]
        mean = float(torch.cat(norms).mean())
        expected = mean if expected == 0 else 0.99 * expected + 0.01 * mean
    assert float(ema_start(model, samples, batch=4)) == pytest.approx(expected, rel=1e-5)
    model.gap.tau_ema.fill_(5.0)  # a target observed before: kept
    try:
        assert float(ema_start(model, samples, batch=4)) == 5.0
    finally:
        model.gap.tau_ema.zero_()


def test_evaluate_starts_every_batch_from_one_target_and_restores_it(tiny, tmp_path, monkeypatch):
    model, tokenizer, samples = tiny
    real, starts = gapkern.stages.responses.generate_responses, []
    monkeypatch.setattr(gapkern.stages.responses, "generate_responses",
                        lambda *a, **kw: (starts.append(kw["tau_ema"]), real(*a, **kw))[1])
    config = model.gap.config  # calibration ema
    records = evaluate(model, tokenizer, samples, str(tmp_path / "p.jsonl"), calibration="rms", batch=3,
                       max_new_tokens=5, span_at=0, keep_settings=str(tmp_path / "settings.json"), progress=False)
    assert records == read_jsonl(tmp_path / "p.jsonl") and [r["id"] for r in records] == [s["id"] for s in samples]
    assert json.loads((tmp_path / "settings.json").read_text())["gap"]["calibration"] == "rms"
    expected = float(ema_start(model, samples, batch=3))
    assert len(starts) == 2 and [float(t) for t in starts] == [expected] * 2 and expected > 0
    assert float(model.gap.tau_ema) == 0.0 and model.gap.config is config  # as before, though each prefill moved it
    assert all(r["latents"] == 2 for r in records)


def test_evaluate_computes_the_start_target_once_for_the_modes_of_one_model(tiny, tmp_path, monkeypatch):
    model, tokenizer, samples = tiny
    responses = gapkern.stages.responses
    real_start, real_generate, computed, used = responses.ema_start, responses.generate_responses, [], []
    monkeypatch.setattr(gapkern.stages.responses, "ema_start", lambda *a, **kw: computed.append(1) or real_start(*a, **kw))
    monkeypatch.setattr(gapkern.stages.responses, "generate_responses",
                        lambda *a, **kw: (used.append(kw["tau_ema"]), real_generate(*a, **kw))[1])
    starts, found = {}, {}
    for mode in ("none", "rms", "ema"):
        found[mode] = evaluate(model, tokenizer, samples, str(tmp_path / f"{mode}.jsonl"), calibration=mode, batch=3,
                               max_new_tokens=5, span_at=0, progress=False, starts=starts)
    assert len(computed) == 1 and len(starts) == 1 and used[:2] == [None, None]
    assert [float(t) for t in used[2:]] == [float(real_start(model, samples, batch=3))] * 4
    alone = evaluate(model, tokenizer, samples, str(tmp_path / "alone.jsonl"), calibration="ema", batch=3,
                     max_new_tokens=5, span_at=0, progress=False)  # no shared dict: computed for this run
    assert len(computed) == 2 and alone == found["ema"] and float(model.gap.tau_ema) == 0.0
