"""benchmarks/report.py: a pytest-benchmark JSON becomes a Markdown table, a small JSON and a PNG."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(group, impl, median, inner=1, key="impl", **info):
    return {"group": group, "name": f"test_x[{impl}]", "param": impl,
            "extra_info": {key: impl, "inner_calls": inner, "D": 512, "d": 64, "B": 1, "dtype": "torch.float32",
                           "bytes_moved": 1000, **info},
            "stats": {"median": median, "rounds": 5, "data": [median] * 5}}


def raw():
    step = "latent_step D512 d64 B1"
    return {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "gpu": None,
                         "gapkern_versions": {"torch": "2.13.0", "triton": "3.9.0"}},
        "commit_info": {"id": "abc"}, "datetime": "2026-11-28T00:00:00",
        "benchmarks": [
            bench(step, "triton", 20e-6, inner=4, op="latent_step"),  # 5 µs per call
            bench(step, "eager", 10e-6, op="latent_step"),
            bench(step, "compiled", 15e-6, op="latent_step"),
            bench("decode step", "text", 2e-3, key="mode", op="decode_step"),
            bench("decode step", "latent", 1.5e-3, key="mode", op="decode_step"),
            bench("train_step", "gapkern", 8e-3, op="train_step"),
            bench("train_head", "gapkern", 2e-3, op="train_head"),
            bench("train_head", "torch", 3e-3, op="train_head"),  # no torch step timed: no share
        ],
    }


def test_summary_has_per_call_times_bandwidth_and_group_ratios(report):
    rows = {(r["group"], r["impl"]): r for r in report.summarize(raw())["rows"]}
    triton = rows["latent_step D512 d64 B1", "triton"]
    assert triton["us"] == pytest.approx(5.0)  # the median over the inner calls of a round
    assert triton["gbps"] == pytest.approx(1000 / 5e-6 / 1e9)
    assert triton["ratios"] == {"x eager": pytest.approx(2.0), "x compile": pytest.approx(3.0)}
    assert rows["latent_step D512 d64 B1", "eager"]["ratios"] == {"x compile": pytest.approx(1.5)}
    assert rows["decode step", "latent"]["ratios"]["latent / text"] == pytest.approx(0.75)
    assert rows["train_head", "gapkern"]["ratios"] == {"share of train_step": pytest.approx(0.25)}
    assert rows["train_head", "torch"]["ratios"] == {}
    assert triton["shape"] == {"D": 512, "d": 64, "B": 1, "dtype": "torch.float32"}


def test_writes_markdown_summary_and_png_and_rerenders_the_summary(report, tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(raw()))
    assert report.main([str(src)]) == 0
    md = (tmp_path / "run.md").read_text()
    assert "Test CPU x2" in md and "triton 3.9.0" in md
    assert "| latent_step | D=512 d=64 B=1 float32 | triton | 5.0 |" in md
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert "data" not in json.dumps(summary)  # no raw rounds kept
    assert report.main([str(tmp_path / "run.summary.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.md").read_text() == md


def test_bad_input_is_one_line_error_and_writes_nothing(report, tmp_path, capsys):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps({"something": 1}))
    assert report.main([str(src)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "pytest-benchmark" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]
