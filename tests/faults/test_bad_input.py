"""Issue 17: bad input to the stages and their library functions is a one-line error naming what to fix, never
a silently wrong result (exit 0) nor a traceback."""
from __future__ import annotations

import os

import pytest
import torch

from gapkern.stages.build import build_data
from gapkern.cli import main
from gapkern.data import load_samples
from gapkern.stages.diagnose import diagnose
from gapkern.testing import tiny_qwen2_5_vl, tiny_tokenizer

from stages import stage_folder

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return stage_folder(tmp_path_factory.mktemp("bad"), 3)


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
    from gapkern.stages.build import load_build
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


# ---- items 10 and 13: an --out that cannot be written, and two processes on one --out ------------------------


def stage_argv(folder, command, out, task=None):
    """A quick, valid command line of each stage writing to ``out``."""
    model, samples = str(folder / "model"), str(folder / "train.jsonl")
    return {
        "fit-pca": ["fit-pca", "--model", model, "--samples", samples, "--out", out],
        "build-data": ["build-data", "--model", model, "--samples", samples, "--out", out, "--grid", "2"],
        "curate": ["curate", "--model", model, "--samples", samples, "--out", out, "--attempts", "1",
                   "--max-new-tokens", "2"],
        "eval": ["eval", "--model", str(folder / "gap"), "--samples", samples, "--out", out, "--max-new-tokens", "2",
                 "--only", "gap/none"],
        "diagnose": ["diagnose", "--model", model, "--samples", samples, "--out", out, "--max-new-tokens", "2"],
        "train": train_argv(task, out, "--max-steps", "1") if task else None,
    }[command]


STAGES = ["fit-pca", "build-data", "curate", "eval", "diagnose", "train"]


@pytest.mark.parametrize("command", STAGES)
def test_an_out_of_the_wrong_kind_or_unwritable_is_refused_up_front(capsys, folder, task, tmp_path, command):
    """Item 10: --out naming a file (curate: a folder), or under a folder nobody may write into (here /proc, a
    read-only place for root too), were tracebacks in every stage, some after all the work."""
    wrong = tmp_path / "wrong"
    wrong.mkdir() if command == "curate" else wrong.write_text("x")
    err = one_line_error(capsys, stage_argv(folder, command, str(wrong), task), "--out")
    assert ("is a folder; expected a file path" if command == "curate" else "is a file; expected a folder") in err
    if os.path.isdir("/proc"):  # Linux
        err = one_line_error(capsys, stage_argv(folder, command, "/proc/gapkern-test/out", task), "--out")
        assert "cannot write into '/proc'" in err


def test_evaluate_into_an_existing_folder_is_refused_before_any_work(folder, tmp_path):
    """Item 10: evaluate(out=<existing folder>) answered every line, then failed at the final rename."""
    from gapkern.outputs import OutputError
    from gapkern.resumable import run_lines

    calls = []
    with pytest.raises(OutputError, match="is a folder; expected a file path"):
        run_lines([{"id": "a"}], str(tmp_path), {}, lambda chunk: calls.append(chunk) or [{"id": "a"}], batch=1,
                  desc="x")
    assert calls == []


@pytest.fixture
def holder(tmp_path):
    """A second process that holds a path's lock until it is killed (what a running stage does)."""
    import signal
    import subprocess
    import sys

    procs = []

    def hold(path):
        code = ("import sys\nfrom gapkern.outputs import out_lock\nwith out_lock(sys.argv[1]):\n"
                "    print('held', flush=True)\n    sys.stdin.read()\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"  # a marker, not a fixed sleep
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.parametrize("command", ["build-data", "curate", "eval", "train"])
def test_a_second_process_on_one_out_is_refused_and_a_killed_holder_blocks_nothing(capsys, folder, task, tmp_path,
                                                                                     holder, command):
    """Item 13: two processes on one --out interleaved their lines / shards; now the second refuses at once.
    The lock is the kernel's (flock): kill -9 of its holder frees it, so the rerun after a crash runs."""
    import signal

    out = tmp_path / ("out.jsonl" if command == "curate" else "out")
    locked = out / "gap" / "none" / "predictions.jsonl" if command == "eval" else out
    proc = holder(locked)
    err = one_line_error(capsys, stage_argv(folder, command, str(out), task), "--out")
    assert f"is being written by another process (pid {proc.pid}" in err, err
    assert not os.path.exists(str(out) + ".parts") and not (out / "targets").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert main(stage_argv(folder, command, str(out), task)) == 0, capsys.readouterr().err
    assert not os.path.exists(str(locked) + ".lock")  # released and removed


# ---- item 11: library calls whose messages said nothing useful -------------------------------------------------


@pytest.mark.parametrize("stage, change, match", [
    ("curate", {"n": 0}, "n: expected a positive int, got 0"),
    ("curate", {"samples": []}, "samples: expected a non-empty list"),
    ("evaluate", {"batch": 0}, "batch: expected a positive int, got 0"),
    ("evaluate", {"max_new_tokens": -1}, "max_new_tokens: expected a positive int"),
])
def test_curate_and_evaluate_refuse_nonsense_by_name(folder, tmp_path, stage, change, match):
    """Item 11: curate(n=0) and evaluate(batch=0) failed deep inside with messages that named nothing."""
    from gapkern.stages.curate import curate
    from gapkern.stages.evaluate import evaluate

    model, ids = tiny_qwen2_5_vl()
    if stage == "evaluate":
        from gapkern.loaders import from_pretrained

        model = from_pretrained(str(folder / "gap"), gap_class=True)
    kwargs = {"samples": load_samples(str(folder / "train.jsonl")), **change}
    with pytest.raises(ValueError, match=match):
        (curate if stage == "curate" else evaluate)(model, tiny_tokenizer(ids), kwargs.pop("samples"),
                                                    str(tmp_path / "out.jsonl"), **kwargs)
    assert not os.listdir(tmp_path)


def test_fit_images_names_a_bad_model_or_images(folder):
    """Item 11: fit_images(model, "a/path.png") iterated the string's characters; fit_images(None, ...) was an
    AttributeError."""
    from gapkern.stages.pca import fit_images

    model, _ = tiny_qwen2_5_vl()
    with pytest.raises(ValueError, match=r"images: expected a list of \(path, box\) pairs .*'a/path.png'"):
        fit_images(model, "a/path.png")
    with pytest.raises(ValueError, match="model: expected a Qwen2.5-VL model .*got NoneType"):
        fit_images(None, [(str(folder / "img" / "0.png"), None)])


# ---- item 9 (rest): a model folder that disagrees with itself --------------------------------------------------


@pytest.fixture(scope="module")
def damaged_models(folder, tmp_path_factory):
    """Copies of the tiny checkpoint: config.json wider than the weights (the language model's MLP; the vision
    tower's); preprocessor settings of a wrong type."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(folder / "model", root / "config")
    config = json.loads((root / "config" / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (root / "config" / "config.json").write_text(json.dumps(config))
    shutil.copytree(folder / "model", root / "vision")  # fit-pca and build-data load only the vision tower
    config = json.loads((root / "vision" / "config.json").read_text())
    config["vision_config"]["intermediate_size"] *= 2
    (root / "vision" / "config.json").write_text(json.dumps(config))
    shutil.copytree(folder / "model", root / "pre")
    (root / "pre" / "preprocessor_config.json").write_text(json.dumps({"min_pixels": "many", "image_std": 0.5}))
    return root


@pytest.mark.parametrize("command", ["fit-pca", "build-data", "curate", "diagnose"])
@pytest.mark.parametrize("damage, match", [("config", r"config.json' disagrees with the weights .* tensor\(s\) of "
                                                      r"other shapes \(first: .*mlp"),
                                           ("pre", r"preprocessor_config.json:image_std: expected a list")])
def test_a_model_folder_that_disagrees_with_itself_is_one_line(capsys, folder, damaged_models, tmp_path, command,
                                                               damage, match):
    """Item 9: a config.json that disagrees with its weights, or a preprocessor_config.json with a wrong type,
    was a traceback (after transformers' long load report) in every stage."""
    import re

    argv = stage_argv(folder, command, str(tmp_path / "out"))
    if damage == "config" and command in ("fit-pca", "build-data"):
        damage = "vision"  # they load the vision tower alone: the language model's shapes are not read
    argv[argv.index("--model") + 1] = str(damaged_models / damage)
    err = one_line_error(capsys, argv, "--model")
    assert re.search(match, err), err


def test_wrong_types_in_the_image_settings_name_the_field(tmp_path):
    """Item 9: each image setting is checked when the file is read (file:field, what was expected)."""
    import json

    from gapkern.data.images import image_settings

    for data, match in [({"min_pixels": "many"}, "min_pixels: expected a positive int"),
                        ({"image_mean": [0.5, 0.5]}, "image_mean: expected 3 finite numbers"),
                        ({"image_std": [0.5, 0, 0.5]}, r"image_std: expected 3 finite numbers > 0"),
                        ({"min_pixels": 10, "max_pixels": 5}, "min_pixels: 10 is above max_pixels 5"),
                        ({"size": [1, 2]}, "expected a JSON object with an object 'size'")]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            image_settings(str(tmp_path))


def test_the_load_report_is_not_printed_above_the_one_line(folder, damaged_models, tmp_path):
    """Item 9, as a user sees it: in a process of its own (transformers' logger writes to the stderr it found
    when made, which neither capsys nor capfd sees in this one), curate on a config.json that disagrees with the
    weights printed transformers' load report (logged by modeling_utils on 5.25, not by loading_report, the
    logger silenced) above the one line: stderr is that line alone now."""
    import subprocess
    import sys

    argv = stage_argv(folder, "curate", str(tmp_path / "out.jsonl"))
    argv[argv.index("--model") + 1] = str(damaged_models / "config")
    done = subprocess.run([sys.executable, "-m", "gapkern.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("gapkern curate: error: --model: ") and "disagrees with the weights" in done.stderr


def test_generate_reads_its_image_before_loading_the_model(capsys, folder, tmp_path):
    """Campaign: generate --image naming a missing or undecodable file printed 'loading MODEL ...' and loaded the
    model first; now the one line comes before any work."""
    text = tmp_path / "text.png"
    text.write_text("not an image")
    for image, said in ((tmp_path / "nope.png", "no file at"), (text, "cannot read the image")):
        err = one_line_error(capsys, ["generate", "--model", str(folder / "gap"), "--image", str(image)], "--image")
        assert said in err and "loading" not in err


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux: /proc is read-only for root too")
def test_demo_under_an_unwritable_folder_is_one_line(capsys):
    """Campaign: demo --out under a folder nobody may write into was a FileNotFoundError traceback."""
    err = one_line_error(capsys, ["demo", "--out", "/proc/gapkern-test/demo", "--size", "small"], "out")
    assert "cannot write into '/proc'" in err
