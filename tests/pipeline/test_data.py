"""The sample file's checks, teacher responses, target pooling, image inputs and target shards (SPEC 4.1, 4.2)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

from gapkern import GapConfig
from gapkern.data import (SampleError, TargetReader, TargetWriter, image_inputs, latent_keys, load_samples,
                          merged_grid, pool_targets, teacher_response)
from gapkern.models.prompt import pixel_inputs, read_image

VISION = SimpleNamespace(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)  # Qwen2.5-VL's


def write_image(path, width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    PIL.Image.fromarray(pixels).save(path)
    return path


def good_line(**change):
    line = {"id": "q17", "image": "img/q17.png", "question": "Which color is the ring?",
            "choices": ["red", "green", "blue", "gray"], "answer": "B", "category": "perception", "task": "color",
            "steps": [{"text": "The ring is small; look at the lower left."},
                      {"latent": {"image": "img/q17.png", "box": [0, 112, 112, 224]},
                       "parser": "a green ring on a gray background"},
                      {"text": "It is green."}]}
    line.update(change)
    return {k: v for k, v in line.items() if v is not DROP}


DROP = object()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "q17.png", 224, 224)
    write_image(tmp_path / "img" / "wide.png", 100, 60, seed=1)
    return tmp_path


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


# ---- load_samples --------------------------------------------------------------------------------------


def test_load_samples_resolves_paths_and_keeps_the_fields(folder):
    lines = [good_line(), "", good_line(id="n1", image=DROP, images=["img/wide.png", "img/q17.png"], choices=DROP,
                                        answer=1234, category="reasoning", task="count", steps=DROP),
             good_line(id="t1", image=DROP, choices=DROP, answer="New York", steps=[])]
    samples = load_samples(write_jsonl(folder / "train.jsonl", lines))
    assert [s["id"] for s in samples] == ["q17", "n1", "t1"]
    first = samples[0]
    assert first["images"] == [str(folder / "img" / "q17.png")] and "image" not in first
    assert first["steps"][1] == {"latent": {"image": str(folder / "img" / "q17.png"), "box": [0, 112, 112, 224]},
                                 "parser": "a green ring on a gray background"}
    assert first["choices"] == ["red", "green", "blue", "gray"] and first["answer"] == "B"
    assert samples[1]["images"] == [str(folder / "img" / "wide.png"), str(folder / "img" / "q17.png")]
    assert samples[1]["answer"] == 1234 and "steps" not in samples[1]
    assert samples[2]["images"] == [] and samples[2]["steps"] == []
    # a file of loaded samples (absolute paths) loads again to the same samples, from anywhere
    again = write_jsonl(folder / "img" / "again.jsonl", samples)
    assert load_samples(again) == samples


BAD = [  # (the third line, the field its error names)
    ('{"id": "x",', "line"),
    ('["not", "an", "object"]', "line"),
    (good_line(id=DROP), "id"),
    (good_line(id=""), "id"),
    (good_line(id="a"), "id"),  # the id of line 1
    (good_line(id=7), "id"),
    (good_line(question=DROP), "question"),
    (good_line(question="  "), "question"),
    (good_line(task=DROP), "task"),
    (good_line(image="img/missing.png"), "image"),
    (good_line(image=3), "image"),
    (good_line(images=["img/q17.png"]), "image"),  # both
    (good_line(image=DROP, images="img/q17.png"), "images"),
    (good_line(image=DROP, images=["img/q17.png", "nope.png"]), "images[1]"),
    (good_line(choices="red"), "choices"),
    (good_line(choices=["red"]), "choices"),
    (good_line(choices=["red", ""]), "choices"),
    (good_line(answer="E"), "answer"),
    (good_line(answer="b"), "answer"),
    (good_line(answer=DROP), "answer"),
    (good_line(choices=DROP, answer=True), "answer"),
    (good_line(choices=DROP, answer=" "), "answer"),
    (good_line(choices=DROP, answer=[1]), "answer"),
    (good_line(category="vision"), "category"),
    (good_line(category=DROP), "category"),
    (good_line(steps={"text": "x"}), "steps"),
    (good_line(steps=["text"]), "steps[0]"),
    (good_line(steps=[{"text": ""}]), "steps[0].text"),
    (good_line(steps=[{"text": "a", "parser": "b"}]), "steps[0]"),
    (good_line(steps=[{"latent": {"image": "img/q17.png"}}]), "steps[0]"),
    (good_line(steps=[{"text": "a"}, {"latent": {"image": "img/q17.png"}, "parser": ""}]), "steps[1].parser"),
    (good_line(steps=[{"latent": "img/q17.png", "parser": "p"}]), "steps[0].latent"),
    (good_line(steps=[{"latent": {"image": "img/q17.png", "crop": [0, 0, 1, 1]}, "parser": "p"}]), "steps[0].latent"),
    (good_line(steps=[{"latent": {"image": "img/gone.png"}, "parser": "p"}]), "steps[0].latent.image"),
    (good_line(steps=[{"latent": {"image": "img/q17.png", "box": [0, 0, 10]}, "parser": "p"}]),
     "steps[0].latent.box"),
    (good_line(steps=[{"latent": {"image": "img/q17.png", "box": [10, 0, 10, 5]}, "parser": "p"}]),
     "steps[0].latent.box"),
    (good_line(steps=[{"latent": {"image": "img/q17.png", "box": [-1, 0, 10, 5]}, "parser": "p"}]),
     "steps[0].latent.box"),
    (good_line(steps=[{"latent": {"image": "img/wide.png", "box": [0, 0, 100, 61]}, "parser": "p"}]),
     "steps[0].latent.box"),  # the image is 100 x 60
    (good_line(steps=[{"latent": {"image": "img/q17.png", "box": [0, 0, "5", 5]}, "parser": "p"}]),
     "steps[0].latent.box"),
    (good_line(steps=[{"latent": {"image": "img/notes.txt", "box": [0, 0, 1, 1]}, "parser": "p"}]),
     "steps[0].latent.image"),  # every image is decoded on load (SPEC 4.1): a text file is no image
]


@pytest.mark.parametrize("line, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_malformed_line_names_file_line_and_field(folder, line, field):
    (folder / "img" / "notes.txt").write_text("not an image")
    lines = [good_line(id="a"), good_line(id="b", steps=DROP), line, good_line(id="c")]
    path = write_jsonl(folder / "bad.jsonl", lines)
    box_of_text = "notes.txt" in json.dumps(line)
    with pytest.raises(SampleError) as info:
        load_samples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3:{field}: "), message
    if box_of_text:
        assert "cannot read the image" in message


def test_a_box_needs_pillow_only_for_its_bounds(folder, monkeypatch):
    """Without Pillow the file's bounds are not known at load time: the box is kept, checked on use."""
    import builtins

    real_import = builtins.__import__

    def no_pil(name, *args, **kw):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    line = good_line(steps=[{"latent": {"image": "img/wide.png", "box": [0, 0, 100, 61]}, "parser": "p"}])
    assert load_samples(write_jsonl(folder / "f.jsonl", [line]))[0]["steps"][0]["latent"]["box"] == [0, 0, 100, 61]


def test_empty_or_missing_file(folder):
    with pytest.raises(FileNotFoundError, match="path: no sample file"):
        load_samples(str(folder / "nope.jsonl"))
    with pytest.raises(ValueError, match="holds no samples"):
        load_samples(write_jsonl(folder / "empty.jsonl", ["", "  "]))


# ---- teacher_response ----------------------------------------------------------------------------------


SAMPLE = {"id": "q", "answer": "B", "steps": [
    {"text": "Look lower left."},
    {"latent": {"image": "/x.png"}, "parser": "a green ring"},
    {"text": "It is green."},
    {"latent": {"image": "/x.png", "box": [0, 0, 5, 5]}, "parser": "gray"}]}


def test_teacher_response_gap_profile():
    config = GapConfig(latent_start_id=2, latent_end_id=3, latent_pad_id=4, latent_budget=3)
    assert teacher_response(SAMPLE, config) == (
        "<think>Look lower left.\n"
        "<latent><latent_pad><latent_pad><latent_pad></latent><parser>a green ring</parser>\n"
        "It is green.\n"
        "<latent><latent_pad><latent_pad><latent_pad></latent><parser>gray</parser></think><answer>B</answer>")


def test_teacher_response_monet_profile():
    config = GapConfig(latent_start_id=2, latent_end_id=3, latent_pad_id=4, latent_budget=2, profile="monet")
    span = "<abs_vis_token>" + "<abs_vis_token_pad>" * 2 + "</abs_vis_token>"
    assert teacher_response(SAMPLE, config) == (
        f"<think>Look lower left.\n{span}<observation>a green ring</observation>\nIt is green.\n"
        f"{span}<observation>gray</observation></think><answer>B</answer>")


@pytest.mark.parametrize("profile", ["gap", "monet"])
def test_teacher_response_without_latents_is_plain_text(profile):
    config = GapConfig(latent_start_id=2, latent_end_id=3, latent_pad_id=4, profile=profile)
    assert teacher_response(SAMPLE, config, latent=False) == (
        "<think>Look lower left.\nIt is green.</think><answer>B</answer>")
    assert teacher_response({"answer": 1234}, config) == "<think></think><answer>1234</answer>"
    with pytest.raises(ValueError, match="config: expected a GapConfig"):
        teacher_response(SAMPLE, SimpleNamespace(profile="other", latent_budget=4))


def test_latent_keys_are_id_and_step_index():
    assert latent_keys(SAMPLE) == ["q/1", "q/3"]
    assert latent_keys({"id": "z"}) == []


# ---- pool_targets --------------------------------------------------------------------------------------


def grid_embeds(h, w, dim=3, dtype=torch.float64):
    """Cell (r, c) holds [r*w + c, 10 (r*w + c), -(r*w + c)]: row-major merged-grid order."""
    index = torch.arange(h * w, dtype=dtype)
    return torch.stack([index, 10 * index, -index], 1)[:, :dim]


def mean_of_cells(embeds, w, rows, cols):
    return torch.stack([embeds[r * w + c] for r in rows for c in cols]).mean(0)


def test_pool_4x6_to_2x2_by_hand():
    embeds = grid_embeds(4, 6)
    pooled = pool_targets(embeds, (4, 6), 2)
    expected = torch.stack([mean_of_cells(embeds, 6, rows, cols)
                            for rows in ([0, 1], [2, 3]) for cols in ([0, 1, 2], [3, 4, 5])])
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)
    assert pooled[0, 0] == (0 + 1 + 2 + 6 + 7 + 8) / 6  # top-left cell, by hand


def test_pool_5x3_to_2x2_uses_overlapping_adaptive_bins():
    """5 rows -> [0..2], [2..4]; 3 columns -> [0..1], [1..2] (floor(i*n/g) .. ceil((i+1)*n/g) - 1)."""
    embeds = grid_embeds(5, 3)
    pooled = pool_targets(embeds, (5, 3), 2)
    expected = torch.stack([mean_of_cells(embeds, 3, rows, cols)
                            for rows in ([0, 1, 2], [2, 3, 4]) for cols in ([0, 1], [1, 2])])
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)


def test_pool_keeps_dtype_and_identity():
    embeds = torch.randn(12, 8).to(torch.bfloat16)
    pooled = pool_targets(embeds, (3, 4), 1)
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (1, 8)
    torch.testing.assert_close(pooled.float(), embeds.float().mean(0, keepdim=True).bfloat16().float())
    same = torch.randn(16, 5)
    torch.testing.assert_close(pool_targets(same, (4, 4), 4), same, rtol=0, atol=0)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(12), (3, 4), 2), "embeds: expected a float tensor"),
    ((torch.ones(12, 2, dtype=torch.long), (3, 4), 2), "embeds: expected a float tensor"),
    ((torch.randn(12, 2), (3, 5), 2), "grid: 3x5 = 15 cells, but embeds has 12 rows"),
    ((torch.randn(12, 2), (3,), 2), r"grid: expected \(h, w\)"),
    ((torch.randn(12, 2), (3, 4), 0), "g: expected a positive int"),
])
def test_pool_errors(args, message):
    with pytest.raises(ValueError, match=message):
        pool_targets(*args)


# ---- image inputs --------------------------------------------------------------------------------------


def test_image_inputs_whole_image_and_crop(folder):
    path = str(folder / "img" / "q17.png")
    whole = image_inputs(path, VISION)
    assert whole["image_grid_thw"].tolist() == [[1, 16, 16]] and merged_grid(whole["image_grid_thw"], VISION) == (8, 8)
    torch.testing.assert_close(whole["pixel_values"], pixel_inputs(read_image(path, 28, 56 * 56, 28 * 28 * 1280),
                                                                   VISION)["pixel_values"])
    # the crop equals the same crop saved as its own file (PNG is lossless) and read whole
    with PIL.Image.open(path) as img:
        img.crop((0, 112, 112, 224)).save(folder / "crop.png")
    crop = image_inputs(path, VISION, box=[0, 112, 112, 224])
    assert crop["image_grid_thw"].tolist() == [[1, 8, 8]] and merged_grid(crop["image_grid_thw"], VISION) == (4, 4)
    torch.testing.assert_close(crop["pixel_values"], image_inputs(str(folder / "crop.png"), VISION)["pixel_values"])
    with pytest.raises(ValueError, match="box: .* is not a crop of the 224x224 image"):
        image_inputs(path, VISION, box=[0, 0, 225, 10])


def test_visual_tokens_come_in_row_major_merged_grid_order(folder):
    """What pool_targets assumes: merged token k covers merged cell (k // w, k % w) of the image."""
    h, w, cell = 3, 5, 28  # 28 = patch 14 x merge 2
    red = torch.arange(h * w, dtype=torch.uint8).reshape(h, w) * 10
    pixels = torch.zeros(h * cell, w * cell, 3, dtype=torch.uint8)
    pixels[..., 0] = red.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    path = str(folder / "cells.png")
    PIL.Image.fromarray(pixels.numpy()).save(path)
    inputs = image_inputs(path, VISION)
    assert merged_grid(inputs["image_grid_thw"], VISION) == (h, w)
    tokens = inputs["pixel_values"].reshape(h * w, 4, 3, -1)  # (merged token, its 2x2 patches, channel, pixels)
    expected = (red.flatten().float() / 255 - 0.48145466) / 0.26862954
    torch.testing.assert_close(tokens[:, :, 0].amin((1, 2)), expected)
    torch.testing.assert_close(tokens[:, :, 0].amax((1, 2)), expected)


# ---- target shards -------------------------------------------------------------------------------------


def shard_samples(n=5):
    """Samples 0..n-1; sample 2 has no latent step, the others 1 or 2."""
    samples = []
    for i in range(n):
        steps = [{"text": "t"}] + [{"latent": {"image": "/x.png"}, "parser": "p"}] * (0 if i == 2 else 1 + i % 2)
        samples.append({"id": f"s{i}", "answer": "A", "steps": steps})
    return samples


def fake_target(key, shape=(4, 6)):
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    return torch.randn(*shape, generator=g)


def write_all(writer, done=None, **kw):
    for index, chunk in writer.pending(**kw):
        writer.write(index, {k: fake_target(k) for s in chunk for k in latent_keys(s)})
        if done is not None:
            done.append(index)


def test_shards_round_trip(tmp_path):
    samples = shard_samples()
    writer = TargetWriter(str(tmp_path), samples, meta={"g": 2, "model": "tiny"}, shard_size=2)
    assert len(writer.shards) == 2 and writer.keys == [["s0/1", "s1/1", "s1/2"], ["s3/1", "s3/2", "s4/1"]]
    write_all(writer)
    index = writer.finish()
    assert index["shape"] == [4, 6] and index["dtype"] == "float32" and index["meta"] == {"g": 2, "model": "tiny"}
    reader = TargetReader(str(tmp_path))
    assert len(reader) == 6 and "s3/2" in reader and "s2/1" not in reader and reader.shape == (4, 6)
    for key in reader.keys():
        torch.testing.assert_close(reader[key], fake_target(key), rtol=0, atol=0)
    stacked = reader.targets(samples[1])
    assert stacked.shape == (2, 4, 6)
    torch.testing.assert_close(stacked[1], fake_target("s1/2"), rtol=0, atol=0)
    assert reader.targets(samples[2]).shape == (0, 4, 6)
    with pytest.raises(KeyError, match="no target 's2/1'"):
        reader["s2/1"]
    import pickle
    torch.testing.assert_close(pickle.loads(pickle.dumps(reader))["s0/1"], fake_target("s0/1"))
    assert sorted(os.listdir(tmp_path)) == ["index.json", "targets-00000.safetensors", "targets-00001.safetensors"]


def test_rerun_skips_finished_shards(tmp_path):
    samples = shard_samples(9)
    first = TargetWriter(str(tmp_path), samples, meta={"g": 2}, shard_size=2)
    done = []
    write_all(first, done)
    assert done == [0, 1, 2, 3]
    again = []
    write_all(TargetWriter(str(tmp_path), samples, meta={"g": 2}, shard_size=2), again)
    assert again == []  # everything finished: nothing recomputed
    os.remove(tmp_path / "targets-00002.safetensors")
    (tmp_path / "targets-00003.safetensors").write_bytes(b"garbage")  # a foreign file is rewritten
    resumed = TargetWriter(str(tmp_path), samples, meta={"g": 2}, shard_size=2)
    write_all(resumed, again)
    assert again == [2, 3]
    resumed.finish()
    other = []
    write_all(TargetWriter(str(tmp_path), samples, meta={"g": 3}, shard_size=2), other)
    assert other == [0, 1, 2, 3]  # another run's settings: nothing is reused


def test_ranks_split_the_shards(tmp_path):
    samples = shard_samples(9)
    writers = [TargetWriter(str(tmp_path), samples, shard_size=2) for _ in range(2)]
    assert [i for i, _ in writers[0].pending(rank=0, world=2)] == [0, 2]
    assert [i for i, _ in writers[1].pending(rank=1, world=2)] == [1, 3]
    write_all(writers[0], rank=0, world=2)
    with pytest.raises(RuntimeError, match=r"2 shard\(s\) of 4 not written yet"):
        writers[0].finish()
    assert not os.path.exists(tmp_path / "index.json")
    write_all(writers[1], rank=1, world=2)
    assert len(writers[0].finish()["keys"]) == 12  # 8 samples with 1 or 2 latent steps


def test_writer_errors(tmp_path):
    samples = shard_samples()
    writer = TargetWriter(str(tmp_path), samples, shard_size=2)
    with pytest.raises(ValueError, match=r"missing \['s1/2'\], unexpected \['s9/1'\]"):
        writer.write(0, {"s0/1": fake_target("a"), "s1/1": fake_target("b"), "s9/1": fake_target("c")})
    with pytest.raises(ValueError, match="one shape and dtype"):
        writer.write(0, {k: fake_target(k, (4, 6 + (k == "s1/2"))) for k in writer.keys[0]})
    with pytest.raises(ValueError, match=r"index: expected a shard in \[0, 2\)"):
        writer.write(2, {})
    with pytest.raises(ValueError, match="shard_size: expected a positive int"):
        TargetWriter(str(tmp_path), samples, shard_size=0)
    with pytest.raises(ValueError, match="meta: expected a JSON-serialisable dict"):
        TargetWriter(str(tmp_path), samples, meta={"x": object()})
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world"):
        writer.pending(rank=2, world=2)
    writer.write(0, {k: fake_target(k) for k in writer.keys[0]})
    writer.write(1, {k: fake_target(k, (9, 6)) for k in writer.keys[1]})
    with pytest.raises(RuntimeError, match="shards disagree on the target shape"):
        writer.finish()
    with pytest.raises(FileNotFoundError, match="folder: no index.json"):
        TargetReader(str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


# ---- issue 17: what once passed the check and failed (or went wrong) later ------------------------------------


def test_an_unknown_key_is_an_error_and_meta_is_kept(folder):
    """Issue 17 item 1: a misspelt ``choises`` once turned a choice question into free text."""
    line = good_line(choices=DROP, choises=["red", "green"], answer="x")
    with pytest.raises(SampleError, match=r":1:choises: unknown key .*put extras under 'meta'"):
        load_samples(write_jsonl(folder / "bad.jsonl", [line]))
    kept = load_samples(write_jsonl(folder / "meta.jsonl", [good_line(meta={"source": "x"}, hard=True)]))
    assert kept[0]["meta"] == {"source": "x"} and kept[0]["hard"] is True
    with pytest.raises(SampleError, match=r":1:hard: expected a bool"):
        load_samples(write_jsonl(folder / "hard.jsonl", [good_line(hard="yes")]))


@pytest.mark.parametrize("content", ["text", "empty", "truncated", "bomb"])
def test_an_unreadable_image_is_an_error_when_the_file_is_loaded(folder, content, monkeypatch):
    """Issue 17 item 7: such images passed (only existence was checked) and were PIL tracebacks in the stages."""
    import PIL.Image

    png = (folder / "img" / "q17.png").read_bytes()
    data = {"text": b"not an image", "empty": b"", "truncated": png[:len(png) // 2], "bomb": png}[content]
    (folder / "img" / "bad.png").write_bytes(data)
    if content == "bomb":
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 224x224 > 2x the limit: a decompression bomb
    path = write_jsonl(folder / "bad.jsonl", [good_line(image="img/bad.png", steps=DROP)])
    with pytest.raises(SampleError, match=r"bad.jsonl:1:image: cannot read the image .*bad.png"):
        load_samples(path)


def test_a_box_that_rounds_to_no_pixel_is_an_error(folder):
    """Issue 17 item 8: [0.2, 0, 0.4, 10] rounds to a 0-wide crop; fit-pca / build-data failed on it."""
    line = good_line(steps=[{"latent": {"image": "img/q17.png", "box": [0.2, 0, 0.4, 10]}, "parser": "p"}])
    with pytest.raises(SampleError, match=r":1:steps\[0\].latent.box: .* rounds to an empty crop"):
        load_samples(write_jsonl(folder / "bad.jsonl", [line]))


def test_a_non_utf8_byte_names_its_line(folder):
    """Issue 17 item 9: a UnicodeDecodeError named no line."""
    path = folder / "bad.jsonl"
    path.write_bytes(json.dumps(good_line(id="a")).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(SampleError, match=r"bad.jsonl:2:line: not UTF-8 text \(byte 0xff at column 9\)"):
        load_samples(str(path))
