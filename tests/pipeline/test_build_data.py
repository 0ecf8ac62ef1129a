"""``gapkern build-data``: validated samples, latent targets (SPEC 4.2) and build settings in one folder."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from gapkern.build import load_build
from gapkern.cli import main
from gapkern.commands.build_data import default_grid
from gapkern.data import image_inputs, load_samples, merged_grid, pool_targets
from gapkern.testing import tiny_qwen2_5_vl

from stages import checkpoint, images, line, read_jsonl, torchrun, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("build"))
    checkpoint(folder / "model")
    checkpoint(folder / "gap9", gap_budget=9)
    lines = [line(i) for i in range(5)]
    for i, one in enumerate(lines):  # crops of at least 4x4 merged cells: g up to 4 (issue 17 item 4)
        one["steps"][1]["latent"] = {"image": f"img/{(0, 3)[i % 2]}.png", "box": [0, 0, 112 + 14 * i, 112]}
    lines[2]["steps"].append({"latent": {"image": "img/0.png"}, "parser": "the whole image"})  # no box
    lines[3]["steps"] = [{"text": "no latent step here"}]
    write_jsonl(folder / "train.jsonl", lines)
    return folder


@pytest.fixture
def vision_calls(monkeypatch):
    """How many images went through the vision tower (every get_image_features call, counted by image)."""
    calls = []
    real = modeling_qwen2_5_vl.Qwen2_5_VLModel.get_image_features

    def counting(self, pixel_values, image_grid_thw, *args, **kw):
        calls.append(len(image_grid_thw))
        return real(self, pixel_values, image_grid_thw, *args, **kw)

    monkeypatch.setattr(modeling_qwen2_5_vl.Qwen2_5_VLModel, "get_image_features", counting)
    return calls


def build(capsys, folder, out, *extra, samples="train.jsonl", model="model"):
    code = main(["build-data", "--model", str(folder / model), "--samples", str(folder / samples),
                 "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def expected_target(model, step, g):
    inputs = image_inputs(step["latent"]["image"], model.config.vision_config, box=step["latent"].get("box"))
    with torch.no_grad():
        embeds = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    return pool_targets(embeds, merged_grid(inputs["image_grid_thw"], model.config.vision_config), g)


@pytest.mark.parametrize("extra, g", [((), 4), (("--grid", "3"), 3)])
def test_build_data_writes_samples_targets_and_settings(capsys, folder, tmp_path, extra, g):
    out = build(capsys, folder, tmp_path / "data", *extra, "--shard-size", "2", "--batch-images", "2")
    built = load_build(str(tmp_path / "data"))
    samples = load_samples(str(folder / "train.jsonl"))
    assert built.samples == samples  # validated: image paths absolute, wherever the folder goes
    assert built.settings == {"format": "gapkern-build/1", "model": str(folder / "model"),
                              "samples": str(folder / "train.jsonl"), "g": g, "K": g * g, "profile": "gap",
                              "dim": 64, "lines": 5, "latent_lines": 4, "latent_steps": 5}
    model, _ = tiny_qwen2_5_vl(seed=0)  # the weights the checkpoint was saved with
    keys = []
    for sample in samples:
        for i, step in enumerate(sample["steps"]):
            if "latent" in step:
                key = f"{sample['id']}/{i}"
                keys.append(key)
                target = built.targets[key]
                assert target.shape == (g * g, 64) and target.dtype == torch.float32
                torch.testing.assert_close(target, expected_target(model, step, g), rtol=1e-5, atol=1e-5)
    assert sorted(built.targets.keys()) == sorted(keys) and "q2/3" in keys
    assert sorted(os.listdir(tmp_path / "data" / "targets")) == ["index.json"] + [
        f"targets-0000{i}.safetensors" for i in range(2)]  # 4 lines with latents, 2 a shard
    assert f"targets     K={g * g} ({g}x{g}) x D=64" in out and "shards      2 computed now, 0 done" in out


def test_default_grid_is_the_square_root_of_the_latent_budget(capsys, folder, tmp_path):
    assert [default_grid(k) for k in (16, 9, 4, 1, 8, 12, None)] == [4, 3, 2, 1, 4, 4, 4]
    build(capsys, folder, tmp_path / "data", "--profile", "monet", model="gap9")
    settings = load_build(str(tmp_path / "data")).settings
    assert (settings["g"], settings["K"], settings["profile"]) == (3, 9, "monet")


def test_rerun_skips_finished_shards(capsys, folder, tmp_path, vision_calls):
    data = tmp_path / "data"
    build(capsys, folder, data, "--shard-size", "1")
    assert sum(vision_calls) == 5  # one image per latent step
    first = {name: (data / "targets" / name).read_bytes() for name in os.listdir(data / "targets")}
    vision_calls.clear()
    out = build(capsys, folder, data, "--shard-size", "1")
    assert vision_calls == [] and "0 computed now, 4 done by an earlier run" in out
    os.remove(data / "targets" / "targets-00002.safetensors")  # line q2: two latent steps
    os.remove(data / "build.json")
    build(capsys, folder, data, "--shard-size", "1")
    assert sum(vision_calls) == 2
    assert {name: (data / "targets" / name).read_bytes() for name in os.listdir(data / "targets")} == first
    vision_calls.clear()
    build(capsys, folder, data, "--shard-size", "1", "--grid", "2")  # other settings: nothing is reused
    assert sum(vision_calls) == 5


def test_curated_lines_get_targets_only_when_hard(capsys, folder, tmp_path):
    lines = [dict(one, attempts=["A"], n_correct=int(not hard), hard=hard)
             for one, hard in zip(read_jsonl(folder / "train.jsonl"), [True, False, True, True, False])]
    write_jsonl(folder / "curated.jsonl", lines)
    build(capsys, folder, tmp_path / "data", samples="curated.jsonl")
    built = load_build(str(tmp_path / "data"))
    assert sorted(built.targets.keys()) == ["q0/1", "q2/1", "q2/3"]  # q3 is hard but has no latent step
    assert [s["hard"] for s in built.samples] == [True, False, True, True, False]
    assert built.settings["latent_lines"] == 2


def test_malformed_line_fails_with_file_line_field_and_writes_nothing(capsys, folder, tmp_path):
    bad = line(7)
    bad["steps"][1]["latent"]["box"] = [0, 0, 500, 56]  # wider than the 224 px image
    path = write_jsonl(folder / "bad-box.jsonl", [line(0), line(1), bad])
    code = main(["build-data", "--model", str(folder / "model"), "--samples", path, "--out", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"gapkern build-data: error: --samples: {path}:3:steps[1].latent.box: " in err
    assert not (tmp_path / "data").exists()
    with pytest.raises(FileNotFoundError, match="no build.json"):
        load_build(str(tmp_path))


@pytest.mark.parametrize("argv, option", [(["--grid", "0"], "--grid"), (["--shard-size", "0"], "--shard-size"),
                                          (["--batch-images", "-1"], "--batch-images")])
def test_bad_options_are_one_line_errors(capsys, folder, tmp_path, argv, option):
    code = main(["build-data", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                 "--out", str(tmp_path / "data"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"gapkern build-data: error: {option}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()


def test_two_ranks_build_what_one_builds(capsys, folder, tmp_path):
    build(capsys, folder, tmp_path / "one", "--shard-size", "1")
    done = torchrun("build-data", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                    "--out", str(tmp_path / "two"), "--shard-size", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_build(str(tmp_path / "one")), load_build(str(tmp_path / "two"))
    assert one.settings == two.settings and one.samples == two.samples
    assert one.targets.keys() == two.targets.keys()
    for key in one.targets.keys():
        torch.testing.assert_close(two.targets[key], one.targets[key], rtol=0, atol=0)
    assert json.loads((tmp_path / "two" / "targets" / "index.json").read_text())["shards"] == [
        f"targets-0000{i}.safetensors" for i in range(4)]
