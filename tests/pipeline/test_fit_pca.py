"""``gapkern fit-pca`` and what it streams: visual input embeddings of a sample file's images (SPEC 4.3)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from gapkern import PCALatentHead
from gapkern.cli import main
from gapkern.data import image_embeddings, image_inputs, load_samples, merged_grid, sample_images, visual_embeddings
from gapkern.testing import tiny_qwen2_5_vl
from gapkern.pca import PCAStats

from stages import SIZES, checkpoint, images, line, torchrun, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("fit"))
    checkpoint(folder / "model")
    write_jsonl(folder / "train.jsonl", [line(i) for i in range(6)])
    return folder


def embeddings_one_by_one(model, items):
    """Each image alone through get_image_features: what the command must have streamed."""
    out = []
    for path, box in items:
        inputs = image_inputs(path, model.config.vision_config, box=box)
        with torch.no_grad():
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        assert len(feats) == 1
        out.append(feats[0])
    return out


def test_visual_embeddings_are_the_merger_outputs_per_image_in_merged_grid_order(folder):
    model, _ = tiny_qwen2_5_vl()
    items = [(str(folder / "img" / f"{i}.png"), None) for i in range(4)] + [(str(folder / "img" / "0.png"),
                                                                              [0, 0, 56, 84])]
    alone = embeddings_one_by_one(model, items)
    batched = list(image_embeddings(model, items, batch_images=3))  # batches of 3 and 2
    assert len(batched) == len(items)
    for (embeds, grid), one, (path, box) in zip(batched, alone, items):
        inputs = image_inputs(path, model.config.vision_config, box=box)
        assert grid == merged_grid(inputs["image_grid_thw"], model.config.vision_config)
        assert embeds.shape == (grid[0] * grid[1], 64)
        torch.testing.assert_close(embeds, one, rtol=1e-5, atol=1e-5)
    pixels = torch.cat([image_inputs(p, model.config.vision_config)["pixel_values"] for p, _ in items[:2]])
    grids = torch.cat([image_inputs(p, model.config.vision_config)["image_grid_thw"] for p, _ in items[:2]])
    two = visual_embeddings(model, pixels, grids)
    assert [t.shape[0] for t in two] == [64, 24]
    assert [w * h // 28 // 28 for w, h in SIZES[:2]] == [64, 24]
    with pytest.raises(ValueError, match="batch_images: expected a positive int"):
        next(image_embeddings(model, items, batch_images=0))


def test_sample_images_lists_each_input_once_in_order(folder):
    samples = load_samples(str(folder / "train.jsonl"))
    img = lambda i: str(folder / "img" / f"{i}.png")  # noqa: E731
    assert sample_images(samples) == [(img(i), None) for i in (0, 1, 2, 3)]
    with_latent = sample_images(samples, latent=True)
    assert with_latent[:3] == [(img(0), None), (img(1), [0, 0, 56, 56]), (img(1), None)]
    assert len(with_latent) == 4 + 6  # every crop box differs (its width grows with the line)
    twice = samples + [dict(samples[0], id="again")]
    assert sample_images(twice, latent=True) == with_latent


def expected_stats(folder, latent=False):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "model")).eval()
    stats = PCAStats(64)
    for embeds in embeddings_one_by_one(model, sample_images(load_samples(str(folder / "train.jsonl")),
                                                             latent=latent)):
        stats.update(embeds)
    return stats


def assert_same_head(head, expected, atol=1e-5):
    assert head.rank == expected.rank
    for name in ("basis", "mean", "sigma", "weight", "bias"):
        a, b = getattr(head, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=name)


def fit(capsys, folder, out, *extra):
    code = main(["fit-pca", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                 "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_fit_pca_writes_the_head_of_the_embeddings(capsys, folder, tmp_path):
    out = fit(capsys, folder, tmp_path / "pca", "--batch-images", "3")
    stats = expected_stats(folder)
    assert stats.count == 64 + 24 + 15 + 35
    expected = stats.fit(0.95)
    head = PCALatentHead.load(str(tmp_path / "pca" / "head.safetensors"))
    assert_same_head(head, expected)
    summary = json.loads((tmp_path / "pca" / "pca.json").read_text())
    assert summary["d"] == expected.rank == stats.rank_for(0.95) and summary["count"] == stats.count
    assert summary["explained_at_d"] >= 0.95 > summary["explained"][summary["d"] - 2]
    eigenvalues = torch.tensor(summary["eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(eigenvalues, stats.eigen()[0].cpu(), rtol=1e-6, atol=1e-8)
    assert (tmp_path / "pca" / "pca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"images      4: {stats.count} visual embeddings of width D=64" in out
    assert f"d={expected.rank} keeps" in out and "whitened" in out
    assert oct(os.stat(tmp_path / "pca" / "head.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fit_pca_rank_no_whiten_and_latent_images(capsys, folder, tmp_path):
    out = fit(capsys, folder, tmp_path / "pca", "--rank", "5", "--no-whiten", "--latent-images")
    head = PCALatentHead.load(str(tmp_path / "pca" / "head.safetensors"))
    assert_same_head(head, expected_stats(folder, latent=True).fit(rank=5, whiten=False))
    assert head.sigma is None and "d=5 keeps" in out and "not whitened" in out
    assert json.loads((tmp_path / "pca" / "pca.json").read_text())["variance"] is None


def test_two_ranks_write_the_head_of_one(capsys, folder, tmp_path):
    fit(capsys, folder, tmp_path / "one")
    done = torchrun("fit-pca", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
                    "--out", str(tmp_path / "two"), "--batch-images", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stdout and done.stdout.count("wrote") == 1  # rank 0 alone reports and writes
    one = PCALatentHead.load(str(tmp_path / "one" / "head.safetensors"))
    two = PCALatentHead.load(str(tmp_path / "two" / "head.safetensors"))
    assert_same_head(two, one, atol=1e-6)  # float64 sums added in another order, then float32


@pytest.mark.parametrize("argv, words", [
    (["--variance", "1.5"], ["--variance", "(0, 1]"]),
    (["--variance", "0.9", "--rank", "3"], None),  # argparse: not allowed together
    (["--rank", "0"], ["--rank", "positive"]),
    (["--rank", "65"], ["--rank", "D=64"]),
    (["--batch-images", "0"], ["--batch-images"]),
    (["--device", "tpu"], ["--device"]),
])
def test_bad_options_are_one_line_errors(capsys, folder, tmp_path, argv, words):
    base = ["fit-pca", "--model", str(folder / "model"), "--samples", str(folder / "train.jsonl"),
            "--out", str(tmp_path / "pca")]
    if words is None:
        with pytest.raises(SystemExit) as info:
            main(base + argv)
        assert info.value.code == 2
        return
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gapkern fit-pca: error:" in err, err
    assert all(word in err for word in words), err
    assert not (tmp_path / "pca").exists()


def test_bad_sample_file_or_model_writes_nothing(capsys, folder, tmp_path):
    def fails(samples, model=folder / "model"):
        code = main(["fit-pca", "--model", str(model), "--samples", samples, "--out", str(tmp_path / "pca")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "pca").exists(), err
        return err

    bad = write_jsonl(folder / "bad-category.jsonl", [line(0), line(1, category="vision")])
    assert f"--samples: {bad}:2:category: expected one of perception, reasoning" in fails(bad)
    text_only = {k: v for k, v in line(0, steps=[]).items() if k != "image"}
    assert "names no image to fit on" in fails(write_jsonl(folder / "text-only.jsonl", [text_only]))
    assert "--model: no checkpoint folder" in fails(str(folder / "train.jsonl"), model=tmp_path)
