"""``gapkern generate`` in-process and as the console script, and the decode-loop trace it prints from."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessorList

import gapkern
from gapkern.cli import main
from gapkern.models import StepTrace
from gapkern.testing import ForceTokens, tiny_head, tiny_prompts, tiny_qwen2_5_vl, tiny_tokenizer
from gapkern.testing import naive_generate

from stages import checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def field(out: str, label: str) -> str:
    """The rest of the printed line that starts with ``label``."""
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return line.strip()[len(label):].strip()


def norms(out: str, label: str) -> list[float]:
    """mean, min, max from a 'mean X (min Y, max Z)' line."""
    return [float(x) for x in re.match(r"mean (\S+) \(min (\S+), max (\S+)\)", field(out, label)).groups()]


def steps(out: str) -> tuple[int, int]:
    found = re.search(r"text [\d.]+ ms \((\d+) steps\), latent [\d.]+ ms \((\d+) steps\)", out)
    assert found, out
    return int(found[1]), int(found[2])


# ---- the tiny model (no arguments) -------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", ["rms", "none"])
def test_tiny_generate_prints_tokens_norms_and_step_times(capsys, calibration):
    code, out, _ = run(capsys, "--max-new-tokens", "12", "--latent-budget", "3", "--calibration", calibration)
    assert code == 0
    # span forced at new position 2: 3 latents, then the forced end token
    assert field(out, "new tokens").startswith("12:")
    assert "<latent> <latent_pad>x3 </latent>" in field(out, "new tokens")
    assert field(out, "latents") == "3 written; L2 norms:"
    labels = ("visual input embeddings", "before calibration", "after calibration")
    visual, before, after = (norms(out, label) for label in labels)
    if calibration == "rms":  # every calibrated latent carries the mean visual-input norm of the prompt
        assert float(field(out, "calibration target")) == pytest.approx(visual[0], rel=1e-3)
        assert after == pytest.approx([visual[0]] * 3, rel=1e-3)
        assert before != pytest.approx(after, rel=1e-2)
    else:
        assert field(out, "calibration target") == "none"
        assert after == pytest.approx(before, rel=1e-3)
    # 11 decode steps: positions 0-2 and 7-10 sample text, 3-6 write latents or the forced end token
    assert steps(out) == (7, 4)
    assert "latent/text" in out


def test_tiny_generate_monet_layout(capsys):
    """--span-layout monet: the span forced at 2 is start, K-1 placeholders, end (K latents over K+1 positions);
    the steps that feed a latent count as latent steps though the monet layout samples there too."""
    code, out, _ = run(capsys, "--max-new-tokens", "12", "--latent-budget", "3", "--span-layout", "monet")
    assert code == 0, out
    assert field(out, "gap") == "profile gap, monet layout, K=3 latents per span, calibration rms"
    assert "<latent> <latent_pad>x2 </latent>" in field(out, "new tokens")
    assert field(out, "latents").startswith("3 written")
    # 11 decode steps: the ones after positions 2-4 feed latents 1-3, the others follow a token
    assert steps(out) == (8, 3)


def test_console_script_runs_the_readme_command():
    script = shutil.which("gapkern", path=os.path.dirname(sys.executable)) or shutil.which("gapkern")
    if script is None:
        pytest.skip("the gapkern console script is not installed (pip install -e .)")
    done = subprocess.run([script, "generate", "--max-new-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert field(done.stdout, "new tokens").startswith("6:") and "time per step" in done.stdout


# ---- --model: local checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gap_checkpoint(tmp_path_factory):
    """A gapkern-saved tiny model: PCA head, GapConfig (K=2, ema) and the running target, plus its tokenizer."""
    return checkpoint(tmp_path_factory.mktemp("gap"), gap_budget=2, calibration="ema", tau_ema=5.0)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A plain Qwen2.5-VL folder (no GAP parts); the tokenizer is saved apart, in ``tokenizer/``."""
    path = tmp_path_factory.mktemp("plain")
    model, ids = tiny_qwen2_5_vl(seed=1)
    model.save_pretrained(path / "weights")
    shutil.copytree(path / "weights", path / "with_tokenizer")
    tiny_tokenizer(ids).save_pretrained(path / "with_tokenizer")
    return path


def test_model_loads_a_gap_checkpoint_with_its_head_and_config(capsys, gap_checkpoint):
    code, out, _ = run(capsys, "--model", str(gap_checkpoint), "--span-at", "1", "--max-new-tokens", "8")
    assert code == 0, out
    assert "GapQwen2_5_VLForConditionalGeneration" in field(out, "model")
    assert field(out, "head") == "PCA rank 8, whitened"
    assert field(out, "gap") == "profile gap, gap layout, K=2 latents per span, calibration ema"
    assert "<latent> <latent_pad>x2 </latent>" in field(out, "new tokens")
    # ema: the saved target 5.0 moves 1% of the way to this prompt's visual mean, and the latents carry it
    visual, after = norms(out, "visual input embeddings")[0], norms(out, "after calibration")
    target = 0.99 * 5.0 + 0.01 * visual
    assert float(field(out, "calibration target")) == pytest.approx(target, rel=1e-3)
    assert after == pytest.approx([target] * 3, rel=1e-3)  # mean, min, max


def test_model_overrides_the_checkpoint_config(capsys, gap_checkpoint):
    code, out, _ = run(capsys, "--model", str(gap_checkpoint), "--head", "none", "--calibration", "none",
                       "--latent-budget", "3", "--span-at", "0", "--max-new-tokens", "6")
    assert code == 0, out
    assert field(out, "head") == "output-as-input (no head)"
    assert field(out, "gap") == "profile gap, gap layout, K=3 latents per span, calibration none"
    assert "<latent> <latent_pad>x3 </latent>" in field(out, "new tokens")


def test_model_plain_checkpoint_gets_the_profile_tokens(capsys, plain_checkpoint):
    """The monet profile's tokens are not in the tokenizer: they are added (Monet's order: pad, start, end, open,
    close) and the embeddings resized; the profile decodes in its own (monet) layout: K=2 latents over start,
    one placeholder, end."""
    code, out, _ = run(capsys, "--model", str(plain_checkpoint / "with_tokenizer"), "--profile", "monet",
                       "--latent-budget", "2", "--span-at", "0", "--max-new-tokens", "5")
    assert code == 0, out
    assert "Qwen2_5_VLForConditionalGeneration" in field(out, "model")
    assert field(out, "head") == "output-as-input (no head)"
    assert field(out, "gap") == "profile monet, monet layout, K=2 latents per span, calibration rms"
    assert "<abs_vis_token> <abs_vis_token_pad>x1 </abs_vis_token>" in field(out, "new tokens")
    assert field(out, "latents").startswith("2 written")
    visual, after = norms(out, "visual input embeddings")[0], norms(out, "after calibration")
    assert after == pytest.approx([visual] * 3, rel=1e-3)


def assert_usage_error(code, out, err, *words, loading=False):
    """rc 2, nothing on stdout, one error line on stderr (the last, after progress lines when ``loading``)."""
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    if loading:
        assert lines[0].startswith("loading "), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("gapkern generate: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err


def test_model_bad_path_is_a_one_line_error(capsys, tmp_path):
    assert_usage_error(*run(capsys, "--model", str(tmp_path / "missing")), "--model", "missing")


def test_model_folder_without_tokenizer_is_a_one_line_error(capsys, plain_checkpoint):
    assert_usage_error(*run(capsys, "--model", str(plain_checkpoint / "weights")), "--model", "tokenizer")


def test_other_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert_usage_error(*run(capsys, "--head", str(tmp_path / "head.safetensors")), "--head")
    assert_usage_error(*run(capsys, "--image", str(tmp_path / "cat.png")), "--image")
    assert_usage_error(*run(capsys, "--max-new-tokens", "0"), "--max-new-tokens")


@pytest.mark.parametrize("argv,words", [
    (["--temperature", "-1"], ["--temperature", "-1.0"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--span-at", "6", "--max-new-tokens", "6"], ["--span-at", "[0, 6)", "got 6"]),
    (["--span-at", "-2"], ["--span-at", "got -2"]),
    (["--profile", "monet"], ["--profile", "gap profile", "'monet'"]),
    (["--device", "meta"], ["--device", "'meta'"]),
])
def test_values_that_were_ignored_are_one_line_errors(capsys, argv, words):
    """Silently ignored before: a negative or NaN temperature decoded greedily, a span outside the
    run was never forced, the tiny model ran the gap profile for --profile monet."""
    assert_usage_error(*run(capsys, *argv), *words)


@pytest.fixture(scope="module")
def bad_heads(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads")
    model, _ = tiny_qwen2_5_vl(seed=0)
    tiny_head(model).save(str(path / "good.safetensors"))
    data = (path / "good.safetensors").read_bytes()
    (path / "damaged.safetensors").write_bytes(data[:-20])
    gapkern.PCALatentHead(torch.eye(32, 4), torch.zeros(32)).save(str(path / "d32.safetensors"))
    return path


@pytest.mark.parametrize("name,words", [
    ("damaged", ["--head", "damaged.safetensors", "not a readable safetensors file"]),
    ("d32", ["--head", "d32.safetensors", "hidden size 32", "64"]),
])
def test_bad_head_files_are_one_line_errors(capsys, bad_heads, name, words):
    assert_usage_error(*run(capsys, "--head", str(bad_heads / f"{name}.safetensors")), *words)


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_gap(**fields):
    def edit(path):
        data = json.loads((path / "config.json").read_text())
        data["gap"].update(fields)
        (path / "config.json").write_text(json.dumps(data))
    return edit


def drop_gap_tensors(path):
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("gap.")}, path / "model.safetensors",
              metadata={"format": "pt"})


@pytest.mark.parametrize("case,edit,words,loading", [
    ("config-not-json", lambda p: (p / "config.json").write_text("{not json"), ["config.json", "not a JSON"], False),
    ("config-a-list", lambda p: (p / "config.json").write_text("[1]"), ["config.json", "JSON list"], False),
    ("tokenizer-not-json", lambda p: (p / "tokenizer.json").write_text("nope"), ["tokenizer", "does not load"],
     False),
    ("no-weights", lambda p: (p / "model.safetensors").unlink(), ["model.safetensors"], True),
    ("weights-truncated", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]),
     ["weights file", "damaged"], True),
    ("gap-tensors-missing", drop_gap_tensors, ["gap.head.weight", "gap.head.basis"], True),
    ("gap-ids-outside-vocab", edit_gap(latent_pad_id=999), ["latent_pad_id=999", "vocabulary"], True),
    ("gap-key-misspelt", edit_gap(latent_budjet=4), ["'latent_budjet'"], True),
])
def test_damaged_checkpoints_are_one_line_errors(capsys, tmp_path, gap_checkpoint, case, edit, words, loading):
    path = broken_copy(gap_checkpoint, tmp_path / case, edit)
    code, out, err = run(capsys, "--model", str(path), "--max-new-tokens", "3")
    assert_usage_error(code, out, err, "--model", *words, loading=loading)


def test_bogus_backend_is_a_one_line_error():
    """GAPKERN_BACKEND is read at import: a bad one failed with a traceback at the first latent."""
    env = {**os.environ, "GAPKERN_BACKEND": "bogus", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", "generate", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert_usage_error(done.returncode, done.stdout, done.stderr, "GAPKERN_BACKEND", "'bogus'", "torch")


# ---- the trace -------------------------------------------------------------------------------------------------

K = 2
ROWS = [(4, None), (2, (56, 56)), (3, (56, 84))]


@pytest.mark.parametrize("pca", [False, True], ids=["output-as-input", "pca-head"])
def test_trace_times_every_step_and_records_latent_norms(pca):
    model, ids = tiny_qwen2_5_vl(seed=0)
    batch = tiny_prompts(ids, ROWS, seed=1)
    # row 1 ends at once; rows 0 and 2 open overlapping spans, so some steps sample no text at all
    sched = {(0, 0): ids.latent_start, (2, 1): ids.latent_start, (1, 0): ids.eos}
    procs = LogitsProcessorList([ForceTokens(batch["input_ids"].shape[1], sched, banned=[ids.latent_start])])
    head = tiny_head(model) if pca else None
    kw = dict(max_new_tokens=10, do_sample=False, logits_processor=procs, return_dict_in_generate=True)
    gapkern.patch(model, head, ids.gap_config(latent_budget=K, calibration="none"))
    raw = model.generate(**batch, **kw)
    gapkern.patch(model, head, ids.gap_config(latent_budget=K, calibration="rms"))
    try:
        plain = model.generate(**batch, **kw)
        trace = StepTrace()
        traced = model.generate(**batch, trace=trace, **kw)
        _, _, text_steps = naive_generate(model, batch, model.gap.config, model.gap.head, None, 10, procs)
    finally:
        gapkern.unpatch(model)
    assert torch.equal(traced.sequences, plain.sequences)  # tracing changes nothing
    for a, b in zip(traced.latents, plain.latents):
        assert torch.equal(a, b)
    # one time per decode step (the last position runs none), classed as the naive loop classes it
    assert len(trace.text_s) == sum(text_steps[:-1])
    assert len(trace.latent_s) == len(text_steps) - 1 - len(trace.text_s)
    assert trace.latent_s and all(t > 0 for t in trace.text_s + trace.latent_s)
    # before calibration: the uncalibrated latents; after: the rms target, the row's mean visual norm
    assert [len(n) for n in trace.raw_norms] == [len(z) for z in traced.latents] == [K, 0, K]
    for b in (0, 2):  # a span's first latent follows the same hidden state in both runs (later ones do not)
        assert trace.raw_norms[b][0] == pytest.approx(raw.latents[b][0].double().norm().item(), rel=1e-5)
        assert trace.raw_norms[b][0] != pytest.approx(trace.fed_norms[b][0], rel=1e-2)
        fed = torch.tensor(trace.fed_norms[b], dtype=torch.float64)
        torch.testing.assert_close(fed, traced.latents[b].double().norm(dim=-1), rtol=1e-5, atol=0)
    assert trace.visual_norms[0] == [] and len(trace.visual_norms[2]) == 6
    mean2 = sum(trace.visual_norms[2]) / 6
    torch.testing.assert_close(torch.tensor(trace.fed_norms[2]), torch.full((K,), mean2), rtol=1e-4, atol=0)
