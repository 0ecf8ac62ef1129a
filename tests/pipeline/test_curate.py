"""``gapkern curate`` (SPEC 4.4): seeded attempts per line, judged answers, resumable output, ranks."""
from __future__ import annotations

import json
import os

import pytest
import torch

import gapkern.curate
from gapkern.cli import main
from gapkern.curate import SeededSampler, derive_seed
from gapkern.data import load_samples
from gapkern.evaluate import extract_answer, is_correct

from stages import checkpoint, images, line, read_jsonl, torchrun, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
N, NEW = 3, 5  # attempts per line, new tokens per attempt: tiny and quick


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("curate"))
    checkpoint(folder / "model")
    lines = [line(i) for i in range(7)]
    lines[4] = {k: v for k, v in line(4, answer=12).items() if k not in ("choices", "image")}
    lines[5] = {k: v for k, v in line(5, answer="green").items() if k != "choices"}
    write_jsonl(folder / "train.jsonl", lines)  # q4: no image, a number answer; q5: a free-text answer
    return folder


def curate(capsys, folder, out, *extra, samples="train.jsonl", code=0):
    argv = ["curate", "--model", str(folder / "model"), "--samples", str(folder / samples), "--out", str(out),
            "--n", str(N), "--max-new-tokens", str(NEW), *extra]
    got = main(argv)
    captured = capsys.readouterr()
    assert got == code, captured.err
    return captured.out if code == 0 else captured.err


# ---- the sampler ---------------------------------------------------------------------------------------------


def test_seeded_sampler_draws_a_row_from_its_seed_and_position_only():
    scores = torch.randn(3, 50)
    batch = SeededSampler([11, 22, 33], prompt_len=4, temperature=0.7)
    alone = SeededSampler([22], prompt_len=9, temperature=0.7)  # another batch: another padded prompt length
    for step in range(5):
        picked = batch(torch.zeros(3, 4 + step, dtype=torch.long), scores)
        assert ((picked == 0).sum(1) == 1).all() and torch.isinf(picked).sum() == 3 * 49  # one-hot
        again = alone(torch.zeros(1, 9 + step, dtype=torch.long), scores[1:2])
        assert picked[1].argmax() == again[0].argmax()
    skipped = alone(torch.zeros(1, 9 + 3, dtype=torch.long), scores[1:2])  # step 3 without steps 0-2 first
    assert skipped[0].argmax() == batch(torch.zeros(3, 4 + 3, dtype=torch.long), scores)[1].argmax()


def test_seeded_sampler_samples_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    for temperature in (1.0, 0.5):
        sampler = SeededSampler(list(range(4000)), prompt_len=1, temperature=temperature)
        picks = sampler(torch.zeros(4000, 1, dtype=torch.long), logits.expand(4000, -1)).argmax(1)
        freq = torch.bincount(picks, minlength=5).double() / 4000
        expected = torch.softmax(logits.double() / temperature, 0)
        assert freq[4] == 0
        assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / 4000).sqrt().max()
    greedy = SeededSampler([1, 2], prompt_len=1, temperature=0)
    assert greedy(torch.zeros(2, 1, dtype=torch.long), torch.tensor([[0.0, 3.0, 1.0]] * 2)).argmax(1).tolist() == [1, 1]


def test_derive_seed_is_stable_and_separates_its_parts():
    assert derive_seed(0, "q1") == derive_seed(0, "q1") != derive_seed(1, "q1")
    assert derive_seed(0, "q1", 2) != derive_seed(0, "q12") and 0 <= derive_seed("x") < 2 ** 63
    assert derive_seed(0, "q1") == 1955606021599562717  # a stored run's seeds must not move between versions


# ---- the command ---------------------------------------------------------------------------------------------


def test_curate_adds_attempts_judged_answers_and_hard(capsys, folder, tmp_path):
    out = curate(capsys, folder, tmp_path / "cur.jsonl", "--batch", "3")
    lines = read_jsonl(tmp_path / "cur.jsonl")
    samples = load_samples(str(folder / "train.jsonl"))
    assert [one["id"] for one in lines] == [s["id"] for s in samples]
    for one, sample in zip(lines, samples):
        assert {k: v for k, v in one.items() if k not in ("attempts", "n_correct", "hard")} == sample
        assert len(one["attempts"]) == N and all(isinstance(a, str) for a in one["attempts"])
        assert one["n_correct"] == sum(is_correct(a, sample) for a in one["attempts"])
        assert one["hard"] == (one["n_correct"] == 0)
    hard = sum(one["hard"] for one in lines)
    assert f"hard        {hard} of 7 lines" in out and "sampled     7 line(s) now, 0 done" in out
    assert not os.path.exists(str(tmp_path / "cur.jsonl") + ".parts")
    assert oct(os.stat(tmp_path / "cur.jsonl").st_mode & 0o777) != oct(0o600)


def test_attempts_depend_on_the_seed_and_the_id_only(capsys, folder, tmp_path):
    """A line's attempts are the same in another batch and another file; a line answered like one of its
    attempts counts it correct (a random tiny model is never right otherwise)."""
    curate(capsys, folder, tmp_path / "a.jsonl", "--batch", "7")
    first = {one["id"]: one for one in read_jsonl(tmp_path / "a.jsonl")}
    said = extract_answer(first["q5"]["attempts"][1])
    assert said
    lines = [read_jsonl(folder / "train.jsonl")[5], line(0)]
    lines[0]["answer"] = said  # q5 first now, and answered as one of its attempts did: the prompt is the same
    write_jsonl(folder / "answered.jsonl", lines)
    curate(capsys, folder, tmp_path / "b.jsonl", "--batch", "1", samples="answered.jsonl")
    second = {one["id"]: one for one in read_jsonl(tmp_path / "b.jsonl")}
    assert second["q5"]["attempts"] == first["q5"]["attempts"] and second["q0"]["attempts"] == first["q0"]["attempts"]
    assert second["q5"]["n_correct"] >= 1 and second["q5"]["hard"] is False
    curate(capsys, folder, tmp_path / "c.jsonl", "--batch", "7", "--seed", "1")
    other = {one["id"]: one for one in read_jsonl(tmp_path / "c.jsonl")}
    assert any(other[k]["attempts"] != first[k]["attempts"] for k in first)


class Killed(BaseException):
    """Stands for the kill: nothing in curate may catch it."""


@pytest.mark.parametrize("cut", ["after-lines", "mid-line"])
def test_killed_run_resumes_to_the_same_output(capsys, folder, tmp_path, monkeypatch, cut):
    curate(capsys, folder, tmp_path / "whole.jsonl", "--batch", "2")
    whole = (tmp_path / "whole.jsonl").read_bytes()

    real, calls = gapkern.curate.sample_attempts, []

    def dies_on_the_third_batch(model, tokenizer, samples, **kw):
        calls.append([s["id"] for s in samples])
        if len(calls) == 3:
            raise Killed
        return real(model, tokenizer, samples, **kw)

    monkeypatch.setattr(gapkern.curate, "sample_attempts", dies_on_the_third_batch)
    out = tmp_path / "cur.jsonl"
    with pytest.raises(Killed):
        main(["curate", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
              "--out", str(out), "--n", str(N), "--max-new-tokens", str(NEW), "--batch", "2"])
    part = tmp_path / "cur.jsonl.parts" / "part-00000.jsonl"
    written = part.read_bytes().splitlines(keepends=True)
    assert len(written) == 4 and not out.exists()  # two batches of two lines
    kept = written[:3]  # as if the kill came while line 4 was being written
    part.write_bytes(b"".join(kept) + (written[3][:25] if cut == "mid-line" else b""))

    calls.clear()
    monkeypatch.setattr(gapkern.curate, "sample_attempts", lambda *a, **kw: (calls.append(a[2]), real(*a, **kw))[1])
    printed = curate(capsys, folder, out, "--batch", "2")
    assert out.read_bytes() == whole
    assert [[s["id"] for s in batch] for batch in calls] == [["q2", "q3"], ["q4", "q5"], ["q6"]]
    assert "sampled     4 line(s) now, 3 done by an earlier run" in printed
    assert not (tmp_path / "cur.jsonl.parts").exists()


def test_resume_refuses_other_settings_and_a_finished_file_is_kept(capsys, folder, tmp_path, monkeypatch):
    def killed(*args, **kw):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(gapkern.curate, "sample_attempts", killed)
        with pytest.raises(Killed):
            curate(capsys, folder, tmp_path / "cur.jsonl")
    settings = json.loads((tmp_path / "cur.jsonl.parts" / "settings.json").read_text())
    assert {k: settings[k] for k in ("model", "n", "temperature", "max_new_tokens", "seed")} == {
        "model": str(folder / "model"), "n": N, "temperature": 1.0, "max_new_tokens": NEW, "seed": 0}
    err = curate(capsys, folder, tmp_path / "cur.jsonl", "--seed", "3", code=2)
    assert "--out: " in err and "other settings (seed 0 -> 3)" in err and err.count("\n") == 1
    edited = read_jsonl(folder / "train.jsonl")
    edited[6]["question"] = "Another question?"
    write_jsonl(folder / "edited.jsonl", edited)
    err = curate(capsys, folder, tmp_path / "cur.jsonl", samples="edited.jsonl", code=2)
    assert "other settings (samples " in err
    curate(capsys, folder, tmp_path / "cur.jsonl")  # the same settings: it resumes (from nothing)
    done = (tmp_path / "cur.jsonl").read_bytes()
    assert "0 line(s) now, 7 done" in curate(capsys, folder, tmp_path / "cur.jsonl")
    assert (tmp_path / "cur.jsonl").read_bytes() == done
    write_jsonl(folder / "two.jsonl", [line(0), line(1)])
    err = curate(capsys, folder, tmp_path / "cur.jsonl", samples="two.jsonl", code=2)
    assert "is not the curation of these samples" in err and err.count("\n") == 1


def test_a_damaged_part_file_is_a_one_line_error(capsys, folder, tmp_path):
    curate(capsys, folder, tmp_path / "cur.jsonl", "--batch", "7")
    parts = tmp_path / "again.jsonl.parts"
    parts.mkdir()
    (parts / "part-00001.jsonl").write_text((tmp_path / "cur.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    err = curate(capsys, folder, tmp_path / "again.jsonl", "--batch", "7", code=2)
    assert f"--out: {parts / 'part-00001.jsonl'}:2 is not a curated line" in err and err.count("\n") == 1


def test_a_gap_checkpoint_curates_with_its_own_config(capsys, folder, tmp_path):
    checkpoint(tmp_path / "gap", gap_budget=2)
    code = main(["curate", "--model", str(tmp_path / "gap"), "--samples", str(folder / "train.jsonl"),
                 "--out", str(tmp_path / "cur.jsonl"), "--n", "2", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert [len(one["attempts"]) for one in read_jsonl(tmp_path / "cur.jsonl")] == [2] * 7


def test_span_layout_and_profile_options_are_part_of_the_run(capsys, folder, tmp_path, monkeypatch):
    """--profile / --span-layout patch the plain model (its start token still never sampled); the GapConfig
    joins the settings a resumed run must match."""
    def killed(*args, **kw):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(gapkern.curate, "sample_attempts", killed)
        with pytest.raises(Killed):
            curate(capsys, folder, tmp_path / "cur.jsonl", "--profile", "monet", "--span-layout", "gap")
    gap = json.loads((tmp_path / "cur.jsonl.parts" / "settings.json").read_text())["gap"]
    assert (gap["profile"], gap["span_layout"], gap["latent_budget"]) == ("monet", "gap", 10)
    err = curate(capsys, folder, tmp_path / "cur.jsonl", "--profile", "monet", code=2)
    assert "--out: " in err and "other settings (gap " in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, option", [(["--n", "0"], "--attempts"), (["--temperature", "-1"], "--temperature"),
                                          (["--batch", "0"], "--batch"), (["--max-new-tokens", "0"],
                                                                          "--max-new-tokens")])
def test_bad_options_are_one_line_errors(capsys, folder, tmp_path, argv, option):
    code = main(["curate", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                 "--out", str(tmp_path / "cur.jsonl"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"gapkern curate: error: {option}: ") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_two_ranks_curate_what_one_curates(capsys, folder, tmp_path):
    curate(capsys, folder, tmp_path / "one.jsonl", "--batch", "2")
    done = torchrun("curate", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                    "--out", str(tmp_path / "two.jsonl"), "--attempts", str(N), "--max-new-tokens", str(NEW),
                    "--batch", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [x["id"] for x in two] == [x["id"] for x in one]  # rank 0 merged in input order
    assert two == one  # each line's draws depend on its seed only (here, numerics agree too)


def test_a_finished_file_is_not_reused_for_other_settings(capsys, folder, tmp_path):
    """Issue 17 item 2: a finished OUT rerun with another --attempts / --seed / --model or other answers (same
    ids) is refused, as eval refuses it; the same settings still find it done."""
    out = tmp_path / "cur.jsonl"
    curate(capsys, folder, out, "--batch", "7")
    done = out.read_bytes()
    assert json.loads((tmp_path / "cur.jsonl.settings.json").read_text())["n"] == N
    for extra, what in [(["--n", str(N + 1)], f"n {N} -> {N + 1}"), (["--seed", "5"], "seed 0 -> 5")]:
        err = curate(capsys, folder, out, "--batch", "7", *extra, code=2)
        assert "is a finished run with other settings" in err and what in err and err.count("\n") == 1, err
    checkpoint(tmp_path / "other")
    err = main(["curate", "--model", str(tmp_path / "other"), "--samples", str(folder / "train.jsonl"),
                "--out", str(out), "--n", str(N), "--max-new-tokens", str(NEW)])
    assert err == 2 and "other settings (model " in capsys.readouterr().err
    answered = read_jsonl(folder / "train.jsonl")
    answered[0]["answer"] = "C"
    write_jsonl(folder / "answered-c.jsonl", answered)
    err = curate(capsys, folder, out, samples="answered-c.jsonl", code=2)
    assert "other settings (samples " in err
    assert out.read_bytes() == done
    assert "0 line(s) now, 7 done" in curate(capsys, folder, out, "--batch", "7")
