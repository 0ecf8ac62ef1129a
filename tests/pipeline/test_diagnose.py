"""``gapkern diagnose`` (SPEC 4.7): per-layer norms against the inputs', the latents before and after calibration."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration

import gapkern
from gapkern.cli import main
from gapkern.data import image_inputs, load_samples, visual_embeddings
from gapkern.diagnose import FORCED_SPAN_AT, diagnose, diagnosis_table, hidden_norms, write_diagnosis
from gapkern.models import StepTrace
from gapkern.testing import ForceTokens, tiny_qwen2_5_vl, tiny_tokenizer
from gapkern.prompts import prompt_batch

from stages import checkpoint, images, line, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
K, NEW, BATCH = 3, 8, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("diagnose"))
    checkpoint(folder / "plain")  # output-as-input: no head, the latent is the final-normed hidden state
    lines = [line(i) for i in range(5)]
    lines[3] = {k: v for k, v in lines[3].items() if k != "image"}  # a line without image: rms falls back to ema
    write_jsonl(folder / "test.jsonl", lines)
    write_jsonl(folder / "text.jsonl", [lines[3]])
    return folder


def run_cli(capsys, folder, out, *extra, samples="test.jsonl", code=0):
    got = main(["diagnose", "--model", str(folder / "plain"), "--samples", str(folder / samples), "--out", str(out),
                "--latent-budget", str(K), "--max-new-tokens", str(NEW), "--batch", str(BATCH), *extra])
    captured = capsys.readouterr()
    assert got == code, captured.err
    return captured.out if code == 0 else captured.err


def visual_norms(model, sample) -> torch.Tensor:
    """The merger outputs' norms of a sample's images, computed apart from any prompt."""
    found = [visual_embeddings(model, **image_inputs(path, model.config.vision_config))[0].norm(dim=-1)
             for path in sample["images"]]
    return torch.cat(found) if found else torch.zeros(0)


def traced(model, tokenizer, samples, mode, span_at):
    """What generate's trace records for the diagnosis' batches, each started from the ema target computed by
    hand: per batch (raw norms, fed norms, visual norms per row, the start target)."""
    start = 0.0
    for i in range(0, len(samples), BATCH):
        norms = torch.cat([visual_norms(model, s) for s in samples[i:i + BATCH]])
        if norms.numel():
            start = float(norms.mean()) if start == 0 else 0.99 * start + 0.01 * float(norms.mean())
    gapkern.patch(model, None, gapkern.GapConfig.from_tokenizer(tokenizer, latent_budget=K, calibration=mode))
    batches = []
    for i in range(0, len(samples), BATCH):
        inputs = prompt_batch(model, tokenizer, samples[i:i + BATCH])
        length = inputs["input_ids"].shape[1]
        schedule = {} if span_at is None else {(row, span_at): model.gap.config.latent_start_id
                                               for row in range(inputs["input_ids"].shape[0])}
        model.gap.tau_ema.fill_(start)
        trace = StepTrace()
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False, trace=trace,
                       logits_processor=LogitsProcessorList([ForceTokens(length, schedule)]))
        batches.append((trace.raw_norms, trace.fed_norms, trace.visual_norms, start))
    return batches


def flat(rows):
    return [v for row in rows for v in row]


def test_latent_ratios_match_generates_trace_and_calibration_closes_the_gap(capsys, folder, tmp_path):
    printed = run_cli(capsys, folder, tmp_path)
    found = json.loads((tmp_path / "diagnosis.json").read_text())
    png = (tmp_path / "diagnosis.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert [e["layer"] for e in found["layers"]] == [1, 2] and found["lines"] == 5
    span_at = found["latents"]["span_at"]

    tokenizer = AutoTokenizer.from_pretrained(folder / "plain")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "plain").eval()
    samples = load_samples(str(folder / "test.jsonl"))
    visual_in = None
    for mode in ("none", "rms", "ema"):
        batches = traced(model, tokenizer, samples, mode, span_at)
        raw = [v for b in batches for v in flat(b[0])]
        fed = [v for b in batches for v in flat(b[1])]
        visual = [v for b in batches for v in flat(b[2])]
        visual_in = sum(visual) / len(visual)
        assert found["input"]["visual"] == pytest.approx(visual_in, rel=1e-5)
        got = found["latents"]["modes"][mode]
        assert got["count"] == len(raw) == len(fed) > 0
        assert got["before"] == pytest.approx(sum(raw) / len(raw), rel=1e-5)
        assert got["after"] == pytest.approx(sum(fed) / len(fed), rel=1e-5)
        assert got["before_ratio"] == pytest.approx(sum(raw) / len(raw) / visual_in, rel=1e-5)
        assert got["after_ratio"] == pytest.approx(sum(fed) / len(fed) / visual_in, rel=1e-5)
        for raw_rows, fed_rows, visual_rows, start in batches:
            batch_mean = sum(flat(visual_rows)) / len(flat(visual_rows))
            for fed_row, visual_row in zip(fed_rows, visual_rows):
                if mode == "ema" or (mode == "rms" and not visual_row):  # rms' row without image: the ema target
                    assert fed_row == pytest.approx([0.99 * start + 0.01 * batch_mean] * len(fed_row), rel=1e-5)
                elif mode == "rms":
                    assert fed_row == pytest.approx([sum(visual_row) / len(visual_row)] * len(fed_row), rel=1e-5)
    modes = found["latents"]["modes"]
    assert modes["none"]["before_ratio"] < 0.5 and modes["none"]["after_ratio"] == modes["none"]["before_ratio"]
    for mode in ("rms", "ema"):  # the gap closed: the fed latents sit at the visual input norm
        assert modes[mode]["before_ratio"] < 0.5 and modes[mode]["after_ratio"] == pytest.approx(1.0, abs=0.02)
    assert printed.startswith(diagnosis_table(found)) and "diagnosis.png" in printed


def test_hidden_norms_match_output_hidden_states(folder):
    model, ids = tiny_qwen2_5_vl()
    tokenizer = tiny_tokenizer(ids)
    samples = load_samples(str(folder / "test.jsonl"))
    unnormed = copy.deepcopy(model)
    unnormed.model.language_model.norm = torch.nn.Identity()  # its last hidden state: the last layer's, unnormed
    sums = torch.zeros(4, 2, dtype=torch.float64)  # input, layer 1, layer 2, layer 2 normed x (text, visual)
    counts = torch.zeros(2)
    for sample in samples:  # one at a time: no padding
        inputs = prompt_batch(model, tokenizer, [sample])
        with torch.no_grad():
            states = model.model(**inputs, output_hidden_states=True).hidden_states
            last = unnormed.model(**inputs, output_hidden_states=True).hidden_states[-1]
        visual = inputs["input_ids"][0] == model.config.image_token_id
        for i, hidden in enumerate([states[0], states[1], last, states[2]]):
            norms = hidden[0].double().norm(dim=-1)
            sums[i] += torch.stack([norms[~visual].sum(), norms[visual].sum()])
        counts += torch.tensor([float((~visual).sum()), float(visual.sum())])
        embeds = model.get_input_embeddings()(inputs["input_ids"][0])
        assert torch.allclose(states[0][0][~visual], embeds[~visual])  # text inputs: token embeddings
        assert torch.allclose(states[0][0][visual].norm(dim=-1), visual_norms(model, sample), rtol=1e-5)
    means = (sums / counts).tolist()

    found = hidden_norms(model, tokenizer, samples, batch=3, progress=False)  # left-padded batches
    assert [found["input"]["text_positions"], found["input"]["visual_positions"]] == counts.long().tolist()
    rows = [found["input"], *found["layers"], found["final_norm"]]
    assert [[row["text"], row["visual"]] for row in rows] == [pytest.approx(m, rel=1e-5) for m in means]
    assert found["final_norm"]["text"] == pytest.approx(8.0, rel=1e-3)  # RMSNorm (weight 1) of width 64


def test_spans_are_forced_for_a_model_that_writes_none(folder, tmp_path):
    model, ids = tiny_qwen2_5_vl()
    tokenizer = tiny_tokenizer(ids)
    samples = load_samples(str(folder / "test.jsonl"))[:2]
    config = ids.gap_config(latent_budget=K, calibration="rms")
    gapkern.patch(model, None, config)
    model.gap.tau_ema.fill_(3.0)
    never = [ids.latent_start]  # a model that was never trained to write spans
    found = diagnose(model, tokenizer, samples, calibrations=("none", "ema"), batch=BATCH, max_new_tokens=NEW,
                     suppress=never, progress=False)
    assert found["latents"]["span_at"] == FORCED_SPAN_AT
    assert [m["count"] for m in found["latents"]["modes"].values()] == [2 * K, 2 * K]
    assert found["latents"]["modes"]["ema"]["after"] == pytest.approx(0.99 * 3.0 + 0.01 * found["input"]["visual"],
                                                                      rel=1e-5)  # a saved target is where it starts
    assert model.gap.config == config and float(model.gap.tau_ema) == 3.0  # both as they were

    found = diagnose(model, tokenizer, samples, calibrations=("none",), batch=BATCH, max_new_tokens=NEW,
                     span_at=None, suppress=never, progress=False)
    assert found["latents"]["span_at"] is None and found["latents"]["modes"]["none"] == {
        "count": 0, "before": None, "after": None, "visual": found["latents"]["modes"]["none"]["visual"],
        "before_ratio": None, "after_ratio": None}
    json_path, png_path = write_diagnosis(found, str(tmp_path))
    assert json.loads(open(json_path).read()) == found and open(png_path, "rb").read(4) == b"\x89PNG"
    assert "never forced" in diagnosis_table(found)


def test_limit_and_explicit_span(capsys, folder, tmp_path):
    run_cli(capsys, folder, tmp_path, "--limit", "2", "--calibration", "ema", "--span-at", "2")
    found = json.loads((tmp_path / "diagnosis.json").read_text())
    assert found["lines"] == 2 and found["latents"]["span_at"] == 2 and list(found["latents"]["modes"]) == ["ema"]
    assert found["latents"]["modes"]["ema"]["count"] == 2 * K and found["head"] == "none"


def test_span_layout_option(capsys, folder, tmp_path):
    """--span-layout monet on a plain checkpoint: recorded; the spans forced at 2 still hold K latents each."""
    run_cli(capsys, folder, tmp_path, "--limit", "2", "--calibration", "none", "--span-at", "2",
            "--span-layout", "monet")
    found = json.loads((tmp_path / "diagnosis.json").read_text())
    assert found["span_layout"] == "monet" and found["latents"]["modes"]["none"]["count"] == 2 * K
    run_cli(capsys, folder, tmp_path / "gap", "--limit", "1", "--calibration", "none", "--span-at", "2")
    assert json.loads((tmp_path / "gap" / "diagnosis.json").read_text())["span_layout"] == "gap"


@pytest.mark.parametrize("argv, option", [
    (["--calibration", "rms,nope"], "--calibration"), (["--limit", "0"], "--limit"),
    (["--span-at", str(NEW)], "--span-at"), (["--batch", "0"], "--batch"), (["--head", "missing"], "--head"),
    (["--samples", "text.jsonl"], "--samples")])
def test_bad_options_are_one_line_errors(capsys, folder, tmp_path, argv, option):
    samples = argv[1] if argv[0] == "--samples" else "test.jsonl"
    extra = [] if argv[0] == "--samples" else argv
    err = run_cli(capsys, folder, tmp_path / "out", *extra, samples=samples, code=2)
    assert err.startswith(f"gapkern diagnose: error: {option}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()



def test_finding_whether_the_model_writes_spans_moves_no_target(folder):
    """The first-batch probe runs generate in the model's own mode (ema here, nothing observed yet): the
    calibrated runs still start from the target of the whole file."""
    model, ids = tiny_qwen2_5_vl()
    samples = load_samples(str(folder / "test.jsonl"))
    gapkern.patch(model, None, ids.gap_config(latent_budget=K, calibration="ema"))
    options = dict(calibrations=("rms", "ema"), batch=BATCH, max_new_tokens=NEW, progress=False)
    auto = diagnose(model, tiny_tokenizer(ids), samples, **options)
    assert float(model.gap.tau_ema) == 0.0
    again = diagnose(model, tiny_tokenizer(ids), samples, span_at=auto["latents"]["span_at"], **options)
    assert auto["latents"] == again["latents"] and auto["latents"]["modes"]["ema"]["count"] > 0
