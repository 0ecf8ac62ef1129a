"""Issue 17's bad-input campaign, compact: every stage command fed bad input, each outcome counted.

    PYTHONPATH=. python tests/bad_input_campaign.py [-v]

Bad sample files (the keys, bytes, images, boxes and answers of tests/faults/test_bad_input.py and the issue's list)
go to every stage that reads one (fit-pca, build-data, curate, eval, diagnose); bad models, outputs and numbers
to every stage that takes them; train gets bad data folders, numbers and checkpoints; generate and demo their
bad options (a demo that would run is not among them: the cases stop before any work). Each case runs in this
process (``gapkern.cli.main``) and is counted as

- clear: exit status 2 and the last line on stderr is the command's one-line error (or argparse's), the only
  line but for a progress line (generate's ``loading PATH ...``);
- silent: exit status 0 on bad input (a silently wrong result);
- unclear: a traceback (an exception out of ``main``) or any other ending.

Prints the counts and every case that is not clear (``-v``: every case). Exit status 1 when any is not clear.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PROGRESS = re.compile(r"loading \S+ \.\.\.")  # generate's one progress line before a model loads
SAMPLE_STAGES = ("fit-pca", "build-data", "curate", "eval", "diagnose")


def run(argv: list[str]) -> tuple[str, str]:
    """(outcome, what it said) of ``gapkern ARGV``; stderr is read at the file descriptor, so what loggers
    created earlier print (transformers' load report) counts too."""
    from gapkern.cli import main

    with tempfile.TemporaryFile(mode="w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except SystemExit as exc:  # argparse: usage and one error line, exit status 2
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - the campaign counts what escapes
            return "unclear", f"traceback: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if code == 0:
        return "silent", "exit 0"
    if code == 2 and f"gapkern {argv[0]}: error: argument" in last:  # argparse: usage, then its error line
        return "clear", last
    if code == 2 and last.startswith(f"gapkern {argv[0]}: error: "):
        said = [line for line in lines[:-1] if not PROGRESS.fullmatch(line)]
        return ("clear", last) if not said else ("unclear", f"{len(said)} more lines on stderr, ending: {last}")
    return "unclear", f"exit {code}: {last}"


def sample_files(folder: str) -> dict[str, str]:
    """name -> a sample file with one bad line (the other lines good), written under ``folder``."""
    from stages import line, write_jsonl

    img = os.path.join(folder, "img")
    with open(os.path.join(img, "text.png"), "w") as f:
        f.write("not an image")
    open(os.path.join(img, "empty.png"), "wb").close()
    with open(os.path.join(img, "0.png"), "rb") as f:
        data = f.read()
    with open(os.path.join(img, "cut.png"), "wb") as f:
        f.write(data[:len(data) // 2])
    good = [line(1), line(2)]
    step = lambda **latent: [{"text": "look"}, {"latent": {"image": "img/1.png", **latent}, "parser": "a square"}]
    bad = {
        "misspelt key (choises)": {**{k: v for k, v in line(0).items() if k != "choices"},
                                   "choises": ["red", "green", "blue"]},
        "unknown top-level key": line(0, colour="red"),
        "missing image": line(0, image="img/nope.png"),
        "image that is text": line(0, image="img/text.png"),
        "zero-byte image": line(0, image="img/empty.png"),
        "truncated PNG": line(0, image="img/cut.png"),
        "absolute image path outside": line(0, image="/nonexistent/x.png"),
        "box of zero area": line(0, steps=step(box=[10, 10, 10, 40])),
        "box outside the image": line(0, steps=step(box=[0, 0, 5000, 5000])),
        "box of 3 numbers": line(0, steps=step(box=[0, 0, 10])),
        "box with NaN": '{"id": "q0", "image": "img/0.png", "question": "q?", "answer": "A", "choices": ["a", "b"], '
                        '"category": "perception", "task": "t", "steps": [{"latent": {"image": "img/1.png", '
                        '"box": [0, 0, NaN, 10]}, "parser": "p"}]}',
        "answer letter beyond the choices": line(0, answer="E"),
        "answer not a letter": line(0, answer="green"),
        "category not perception/reasoning": line(0, category="nope"),
        "choices not a list": line(0, choices="red"),
        "question missing": {k: v for k, v in line(0).items() if k != "question"},
        "id missing": {k: v for k, v in line(0).items() if k != "id"},
        "duplicate id": line(1),
        "latent step without parser": line(0, steps=[{"latent": {"image": "img/1.png"}}]),
        "step of an unknown kind": line(0, steps=[{"thought": "x"}]),
        "not JSON": "{\"id\": \"q0\", ",
        "a JSON list, not an object": "[1, 2]",
    }
    files = {}
    for i, (name, one) in enumerate(bad.items()):
        files[name] = write_jsonl(os.path.join(folder, f"bad{i}.jsonl"), [one, *good])
    with open(os.path.join(folder, "utf8.jsonl"), "wb") as f:
        f.write(json.dumps(line(0)).encode()[:-2] + b"\xff\"}\n" + json.dumps(line(1)).encode() + b"\n")
    files["non-UTF-8 byte"] = os.path.join(folder, "utf8.jsonl")
    files["empty file"] = write_jsonl(os.path.join(folder, "empty.jsonl"), [])
    files["a folder, not a file"] = img
    files["no such file"] = os.path.join(folder, "nope.jsonl")
    return files


def damaged_models(folder: str, model: str) -> dict[str, str]:
    """name -> a model folder that is wrong in one way."""
    out = {}
    for name, change in [("config wider than the weights", ("config.json", "text_config", "intermediate_size")),
                         ("vision config wider than the weights", ("config.json", "vision_config",
                                                                   "intermediate_size"))]:
        path = os.path.join(folder, name.replace(" ", "-"))
        shutil.copytree(model, path)
        file, part, key = change
        with open(os.path.join(path, file)) as f:
            config = json.load(f)
        config[part][key] *= 2
        with open(os.path.join(path, file), "w") as f:
            json.dump(config, f)
        out[name] = path
    for name, text in [("preprocessor_config.json of wrong types", json.dumps({"min_pixels": "many"})),
                       ("preprocessor_config.json not JSON", "{"),
                       ("config.json not JSON", None)]:
        path = os.path.join(folder, name.replace(" ", "-"))
        shutil.copytree(model, path)
        target = "config.json" if text is None else "preprocessor_config.json"
        with open(os.path.join(path, target), "w") as f:
            f.write("{" if text is None else text)
        out[name] = path
    path = os.path.join(folder, "no-weights")
    shutil.copytree(model, path)
    os.remove(os.path.join(path, "model.safetensors"))
    out["no weights"] = path
    path = os.path.join(folder, "cut-weights")
    shutil.copytree(model, path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, "model.safetensors")) // 2)
    out["truncated weights"] = path
    path = os.path.join(folder, "no-tokenizer")
    shutil.copytree(model, path)
    for name in os.listdir(path):
        if "token" in name or name.endswith(".jinja"):
            os.remove(os.path.join(path, name))
    out["no tokenizer"] = path
    out["no such folder"] = os.path.join(folder, "nope")
    out["a file"] = os.path.join(model, "config.json")
    return out


def stage_argv(folder: str, command: str, out: str, samples: str | None = None, model: str | None = None):
    samples = samples or os.path.join(folder, "train.jsonl")
    model = model or os.path.join(folder, "gap" if command == "eval" else "model")
    base = {
        "fit-pca": ["--rank", "4"],
        "build-data": ["--grid", "2"],
        "curate": ["--attempts", "1", "--max-new-tokens", "2"],
        "eval": ["--max-new-tokens", "2", "--only", "gap/none"],
        "diagnose": ["--max-new-tokens", "2"],
    }[command]
    return [command, "--model", model, "--samples", samples, "--out", out, *base]


NUMBERS = {  # stage -> bad option values
    "fit-pca": [("--variance", "0"), ("--variance", "1.5"), ("--variance", "nan"), ("--rank", "0"),
                ("--rank", "100000"), ("--batch-images", "0")],
    "build-data": [("--grid", "0"), ("--grid", "1000"), ("--shard-size", "0"), ("--batch-images", "0"),
                   ("--grid", "x")],
    "curate": [("--attempts", "0"), ("--batch", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
               ("--max-new-tokens", "0"), ("--max-new-tokens", "-3")],
    "eval": [("--batch", "0"), ("--max-new-tokens", "0"), ("--only", "nope"), ("--temperature", "inf"),
             ("--span-at", "-5"), ("--protocol", "/nonexistent.json")],
    "diagnose": [("--batch", "0"), ("--span-at", "-5"), ("--limit", "0"), ("--max-new-tokens", "0")],
}


def train_cases(root: str) -> list[tuple[str, list[str]]]:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from train_data import make_checkpoint, make_data

    base, head = make_checkpoint(root)
    data, _, _ = make_data(root, base, n=4, g=2)

    def argv(out, *more, data=data, model=base, head=head):
        return ["train", "--model", model, "--data", data, "--head", head, "--out", os.path.join(root, out),
                "--batch", "2", "--max-steps", "1", *more, "--", "--disable_tqdm", "true"]

    def damaged(name, damage):
        copy = os.path.join(root, name)
        shutil.copytree(data, copy)
        shard = sorted(p for p in os.listdir(os.path.join(copy, "targets")) if p.endswith(".safetensors"))[0]
        damage(os.path.join(copy, "targets", shard))
        return copy

    def with_nan(path):
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors[sorted(tensors)[0]][0, 0] = float("nan")
        save_file(tensors, path, metadata=meta)

    def cut(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 64)

    cut_checkpoint = os.path.join(root, "cut", "checkpoint-1")
    os.makedirs(cut_checkpoint)
    open(os.path.join(cut_checkpoint, "model.safetensors"), "wb").close()
    a_file = os.path.join(root, "a-file")
    open(a_file, "w").close()
    cases = [(f"{flag} {value}", argv(f"o{i}", flag, value)) for i, (flag, value) in enumerate([
        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--latent-loss-weight", "nan"),
        ("--latent-loss-weight", "-1"), ("--latent-loss-weight", "inf"), ("--epochs", "inf"), ("--epochs", "0"),
        ("--max-steps", "0"), ("--batch", "0"), ("--grad-accum", "0"), ("--save-steps", "0"),
        ("--keep-checkpoints", "-1"), ("--lora", "0")])]
    cases += [
        ("NaN in a target shard", argv("d1", data=damaged("nan-data", with_nan))),
        ("truncated target shard", argv("d2", data=damaged("cut-data", cut))),
        ("--data missing", argv("d3", data=os.path.join(root, "nope"))),
        ("--data a file", argv("d4", data=a_file)),
        ("--head missing", argv("d5", head=os.path.join(root, "nope.safetensors"))),
        ("--head not safetensors", argv("d6", head=a_file)),
        ("--curated missing", argv("d7", "--curated", os.path.join(root, "nope.jsonl"))),
        ("--resume with no checkpoint", argv("d8", "--resume")),
        ("--resume of a cut checkpoint", argv("d9", "--resume", cut_checkpoint)),
        ("--out a file", argv("x", "--out", a_file)),
        ("unknown Trainer flag", ["train", "--model", base, "--data", data, "--head", head, "--out",
                                  os.path.join(root, "d10"), "--max-steps", "1", "--", "--no_such_flag", "1"]),
    ]
    return cases


def cases(root: str) -> list[tuple[str, list[str]]]:
    from stages import stage_folder

    folder = str(stage_folder(_mkdir(root, "stages"), 3))
    found = []
    samples = sample_files(folder)
    models = damaged_models(_mkdir(root, "models"), os.path.join(folder, "model"))
    a_file = os.path.join(folder, "train.jsonl")
    for command in SAMPLE_STAGES:
        out = lambda tag: os.path.join(root, "out", command, tag) + (".jsonl" if command == "curate" else "")
        for name, path in samples.items():
            found.append((f"{command}: sample file: {name}", stage_argv(folder, command, out(name[:20]), samples=path)))
        for name, path in models.items():
            if command == "eval":
                continue  # its --model is a gap checkpoint: the same loaders, one stage suffices for each damage
            if command in ("fit-pca", "build-data") and name in ("config wider than the weights", "no tokenizer"):
                continue  # they load the vision tower alone and no tokenizer: what they read is whole
            found.append((f"{command}: model: {name}", stage_argv(folder, command, out("m" + name[:20]), model=path)))
        for flag, value in NUMBERS[command]:
            argv = stage_argv(folder, command, out(flag + value), )
            argv += [flag, value]
            found.append((f"{command}: {flag} {value}", argv))
        wrong = os.path.join(folder, "img") if command == "curate" else a_file
        found.append((f"{command}: --out of the wrong kind", stage_argv(folder, command, wrong)))
        if os.path.isdir("/proc"):
            found.append((f"{command}: --out unwritable", stage_argv(folder, command, "/proc/gapkern/out")))
    found += [(f"train: {name}", argv) for name, argv in train_cases(_mkdir(root, "train"))]
    gap, image = os.path.join(folder, "gap"), os.path.join(folder, "img", "0.png")
    for name, more in [("--max-new-tokens 0", ["--max-new-tokens", "0"]),
                       ("--temperature nan", ["--temperature", "nan"]), ("--temperature -1", ["--temperature", "-1"]), ("--span-at -5", ["--span-at", "-5"]),
                       ("--latent-budget 0", ["--latent-budget", "0"]), ("--image missing", ["--image", "nope.png"]),
                       ("--image that is text", ["--image", os.path.join(folder, "img", "text.png")]),
                       ("--head missing", ["--head", "nope.safetensors"]), ("--model missing", ["--model", "nope"]),
                       ("--model wider config", ["--model", models["config wider than the weights"]])]:
        argv = ["generate", "--model", gap, "--image", image, "--max-new-tokens", "4", *more]
        found.append((f"generate: {name}", argv))
    demo_out = os.path.join(root, "demo-foreign")
    os.makedirs(demo_out)
    open(os.path.join(demo_out, "notes.txt"), "w").close()
    for name, more in [("--seeds 0", ["--seeds", "0", "--out", os.path.join(root, "demo0")]),
                       ("--out a file", ["--out", a_file]), ("--out a foreign folder", ["--out", demo_out]),
                       ("--out unwritable", ["--out", "/proc/gapkern/demo"]), ("--size huge", ["--size", "huge"])]:
        found.append((f"demo: {name}", ["demo", "--size", "small", *more]))
    return found


def _mkdir(root, name):
    import pathlib

    path = pathlib.Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str]) -> int:
    import torch
    import warnings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    verbose = "-v" in argv
    counts = {"clear": 0, "silent": 0, "unclear": 0}
    with tempfile.TemporaryDirectory() as root:
        for name, args in cases(root):
            outcome, said = run(args)
            counts[outcome] += 1
            if verbose or outcome != "clear":
                print(f"{outcome:8} {name}: {said}", flush=True)
    total = sum(counts.values())
    print(f"{total} bad inputs: {counts['clear']} clear one-line errors, {counts['silent']} silently wrong "
          f"(exit 0), {counts['unclear']} traceback or unclear")
    return 0 if counts["clear"] == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
