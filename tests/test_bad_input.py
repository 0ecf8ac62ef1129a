"""Issue 17: bad input to the stages and their library functions is a one-line error naming what to fix, never
a silently wrong result (exit 0) nor a traceback."""
from __future__ import annotations

import pytest
import torch

from gapkern.build import build_data
from gapkern.cli import main
from gapkern.data import load_samples
from gapkern.diagnose import diagnose
from gapkern.testing import tiny_qwen2_5_vl, tiny_tokenizer

from stages import checkpoint, images, line, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = images(tmp_path_factory.mktemp("bad"))
    checkpoint(folder / "model")
    write_jsonl(folder / "train.jsonl", [line(i) for i in range(3)])
    return folder


def one_line_error(capsys, argv, option):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f": error: {option}: " in err, err
    return err


def test_a_grid_larger_than_the_crops_merged_grid_is_refused(capsys, folder, tmp_path):
    """Item 4: --grid 1000 once wrote K = 10^6 targets upsampled from a few cells."""
    err = one_line_error(capsys, ["build-data", "--model", str(folder / "model"), "--samples",
                                  str(folder / "train.jsonl"), "--out", str(tmp_path / "data"), "--grid", "1000"],
                         "--grid")
    assert "merged grid; choose g <=" in err and not (tmp_path / "data" / "build.json").exists()


def test_build_data_refuses_an_unknown_profile_and_no_samples(folder, tmp_path):
    """Item 6: build_data(profile='nope') and build_data(samples=[]) returned as if done."""
    model, _ = tiny_qwen2_5_vl()
    samples = load_samples(str(folder / "train.jsonl"))
    with pytest.raises(ValueError, match="profile: expected one of"):
        build_data(model, samples, str(tmp_path / "a"), g=2, profile="nope", model_path="m")
    with pytest.raises(ValueError, match="samples: expected a non-empty list"):
        build_data(model, [], str(tmp_path / "b"), g=2, profile="gap", model_path="m")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, match", [
    ({"calibrations": []}, "calibrations: expected a non-empty list"),
    ({"calibrations": ["nope"]}, "calibrations: expected a non-empty list"),
    ({"span_at": -5}, r"span_at: expected None, 'auto' or a new position in \[0, 4\)"),
    ({"batch": 0}, "batch: expected a positive int"),
    ({"samples": []}, "samples: expected a non-empty list"),
])
def test_diagnose_refuses_nonsense_by_name(folder, change, match):
    """Items 6 and 11: diagnose(calibrations=[]) / (span_at=-5) returned; batch=0 / samples=[] said nothing."""
    model, ids = tiny_qwen2_5_vl()
    kwargs = {"samples": load_samples(str(folder / "train.jsonl")), "calibrations": ["none"], "batch": 2,
              "max_new_tokens": 4, "span_at": None, **change}
    with pytest.raises(ValueError, match=match):
        diagnose(model, tiny_tokenizer(ids), kwargs.pop("samples"), **kwargs)


# ---- item 5 (and 9: the learning rate's flag, a truncated shard): training on non-finite numbers --------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from train_data import make_checkpoint, make_data

    folder = tmp_path_factory.mktemp("train")
    base, head = make_checkpoint(folder)
    data, _, _ = make_data(folder, base, n=4, g=2)
    return {"base": base, "head": head, "data": data}


def train_argv(task, out, *more, data=None):
    return ["train", "--model", task["base"], "--data", data or task["data"], "--head", task["head"],
            "--out", str(out), "--batch", "2", "--logging-steps", "1", *more, "--", "--disable_tqdm", "true"]


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"),
                                         ("--latent-loss-weight", "nan"), ("--latent-loss-weight", "-1"),
                                         ("--latent-loss-weight", "inf"), ("--epochs", "inf")])
def test_train_refuses_non_finite_or_negative_numbers_by_flag(capsys, task, tmp_path, flag, value):
    """Item 5: these exited 0 (a NaN-filled model); item 9: --lr nan said 'Invalid learning rate' without the flag."""
    err = one_line_error(capsys, train_argv(task, tmp_path / "out", flag, value, "--max-steps", "1"), flag)
    assert "expected a finite" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("latent_loss_weight", float("nan")), ("latent_loss_weight", -1.0),
                                          ("learning_rate", float("inf"))])
def test_the_library_train_refuses_them_too(task, tmp_path, field, value):
    """Item 5, through gapkern.train.train: refused before any step, naming the argument."""
    from gapkern.build import load_build
    from gapkern.train import train, training_arguments

    build = load_build(task["data"])
    model, tokenizer = task_model(task)
    targs = training_arguments(str(tmp_path), max_steps=1, learning_rate=value if field == "learning_rate" else 1e-3)
    with pytest.raises(ValueError, match=f"{field}: expected a finite number >= 0"):
        train(model, tokenizer, build.samples, str(tmp_path), targets=build.targets, args=targs,
              **({field: value} if field != "learning_rate" else {}))


def task_model(task):
    from gapkern.commands._common import from_pretrained, load_tokenizer
    from gapkern.head import PCALatentHead
    from gapkern.train import attach_gap

    tokenizer = load_tokenizer(task["base"])
    model = from_pretrained(task["base"], gap_class=True)
    attach_gap(model, tokenizer, PCALatentHead.load(task["head"]), latent_budget=4)
    return model, tokenizer


def damaged_copy(task, tmp_path, damage):
    """A copy of the data folder whose first shard ``damage(path, tensors, metadata)`` rewrote."""
    import shutil

    from safetensors import safe_open

    data = tmp_path / "data"
    shutil.copytree(task["data"], data)
    shard = sorted((data / "targets").glob("targets-*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    damage(shard, tensors, metadata)
    return str(data), shard


def with_nan(shard, tensors, metadata):
    from safetensors.torch import save_file

    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata=metadata)


def truncated(shard, tensors, metadata):
    shard.write_bytes(shard.read_bytes()[:-64])


@pytest.mark.parametrize("damage, match", [(with_nan, "has non-finite values"), (truncated, "cannot be read")])
def test_a_damaged_target_shard_is_an_error_naming_it(capsys, task, tmp_path, damage, match):
    """Item 5: NaN in a target shard trained to a NaN model, exit 0; item 9: a truncated one was a bare
    SafetensorError."""
    data, shard = damaged_copy(task, tmp_path, damage)
    err = one_line_error(capsys, train_argv(task, tmp_path / "out", "--max-steps", "2", data=data), str(shard))
    assert match in err and "rerun gapkern build-data" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(capsys, task, tmp_path):
    """Item 5: a loss that turns NaN/inf mid-run (here: an absurd learning rate blows the weights up after the
    first step) once trained on to exit 0; now the run stops at that step, checkpoint-1 (saved at a finite
    loss) stays, nothing later is written."""
    from safetensors import safe_open

    out = tmp_path / "out"
    code = main(train_argv(task, out, "--lr", "1e30", "--max-steps", "4", "--save-steps", "1"))
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' own "Writing model shards" bar
    assert code == 2, err
    assert "gapkern train: error: loss: not finite" in err and "at step 2; training stopped" in err, err
    assert f"The last good checkpoint is {out / 'checkpoint-1'}" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()
    with safe_open(str(out / "checkpoint-1" / "model.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
