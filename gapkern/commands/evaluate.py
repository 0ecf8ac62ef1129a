"""Evaluate checkpoints on a sample file (SPEC 4.6): accuracy per task, Avg-P and Avg-R, configurations side by side.

Every configuration, a checkpoint (--model, comma-separated) run with one
calibration mode (--calibration, comma-separated: the cross product; --only
keeps some of it), answers every line through the patched, batched generate
with the prompt curation and training use; answers are judged by
gapkern.evaluate. A configuration is named CHECKPOINT/MODE (CHECKPOINT: its
folder's name, or --names). Writes OUT/NAME/predictions.jsonl (per line: id,
task, category, expected, prediction, answer, correct, latents written),
OUT/NAME/settings.json, OUT/scores.json (per configuration: accuracy per task,
counts, Avg-P, Avg-R) and OUT/scores.md (the table, printed at the end).
Predictions are appended line by line while the run goes: killed and rerun
with the same options, it continues where it stopped and ends with the same
files. Calibrated modes (rms, ema) start every batch from one running target
(the checkpoint's, else the ema of the file's visual input embeddings), so
batches, ranks and resumed runs answer alike. The training-free calibration
experiment on an output-as-input model: --head none --calibration none,ema.
"""
from __future__ import annotations

import json
import os

from . import UsageError
from ._common import (add_device_arguments, add_samples_arguments, check_out_folder, check_span_at, check_temperature, checkpoint_config,
                      hidden_size, positive_int, read_samples, start)
from ._gap import CALIBRATIONS, add_gap_arguments, calibrations, load_head

NAME = "eval"
HELP = "answer a sample file with one or more checkpoints and calibration modes; scores per task, Avg-P, Avg-R"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH[,PATH...]",
                        help="local Qwen2.5-VL checkpoint folders (plain, or saved by gapkern), comma-separated")
    parser.add_argument("--names", metavar="NAME[,NAME...]",
                        help="one name per --model checkpoint (default: each folder's name)")
    add_samples_arguments(parser, "the sample file (JSONL, SPEC 4.1; several: comma-separated, scored together)")
    parser.add_argument("--protocol", metavar="gap|monet|FILE",
                        help="how the model is asked and samples: a preset or a JSON file (gapkern.protocol); "
                             "it fixes every generation setting (then --temperature / --max-new-tokens are its own)")
    parser.add_argument("--rules", choices=("gap", "vlmevalkit"), default="gap",
                        help="how answers are judged: gapkern's rules (default) or VLMEvalKit's rule-based matching "
                             "(lines that would need its GPT judge are counted and listed, never guessed)")
    parser.add_argument("--judge", metavar="URL",
                        help="with --rules vlmevalkit: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) "
                             "asked about the lines VLMEvalKit leaves to its GPT judge (optional; gapkern.judge)")
    parser.add_argument("--judge-model", metavar="NAME",
                        help="the model name sent to --judge (default: the first one its /models lists)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for predictions and scores")
    add_gap_arguments(parser, calibration_help="latent norm calibration, comma-separated: each checkpoint runs "
                                               f"each of {', '.join(CALIBRATIONS)} given (default: the "
                                               "checkpoint's own, none for a plain one)")
    parser.add_argument("--only", metavar="NAME[,NAME...]",
                        help="run only these configurations of the cross product (e.g. base/none,gap/ema)")
    parser.add_argument("--span-at", type=int, metavar="I",
                        help="make every response open a latent span at new position I (default: never forced)")
    parser.add_argument("--batch", type=int, default=8, metavar="LINES", help="lines per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="new positions per response, latent ones included (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, default=0, help="with --temperature above 0: each line's draws derive "
                                                            "from it and the line's id")
    add_device_arguments(parser)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",")]


def _names(args, paths: list[str]) -> list[str]:
    """One name per checkpoint: --names, else the folder's name (with its parents while two would clash)."""
    if args.names is not None:
        names = _split(args.names)
        if len(names) != len(paths):
            raise UsageError(f"--names: expected {len(paths)} name(s), one per --model checkpoint, got {len(names)}")
        for name in names:
            if not name or name in (".", "..") or "/" in name or os.sep in name:
                raise UsageError(f"--names: {name!r} is not a folder name (no '/', not empty)")
        if len(set(names)) != len(names):
            raise UsageError(f"--names: {args.names!r} names two checkpoints alike")
        return names
    full = [os.path.abspath(p).split(os.sep) for p in paths]
    for depth in range(1, max(len(parts) for parts in full) + 1):
        names = ["-".join(parts[-depth:]) for parts in full]
        if len(set(names)) == len(names):
            return names
    raise UsageError(f"--model: {args.model!r} names a checkpoint twice")


def plan(args) -> tuple[list[dict], dict]:
    """The configurations to run, a checkpoint's together: ``{"name", "path", "calibration"}`` (without
    --calibration: the checkpoint's own mode); and each
    checkpoint's width D (path -> D)."""
    paths = _split(args.model)
    dims = {path: hidden_size(checkpoint_config(path)) for path in paths}
    names = _names(args, paths)
    modes = calibrations(args.calibration)
    runs = []
    for path, name in zip(paths, names):
        own = (checkpoint_config(path).get("gap") or {}).get("calibration", "none")
        runs += [{"name": f"{name}/{mode}", "path": path, "calibration": mode} for mode in (modes or [own])]
    if args.only is not None:
        wanted, known = _split(args.only), [run["name"] for run in runs]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise UsageError(f"--only: no configuration {unknown[0]!r}; the configurations are {', '.join(known)}")
        runs = [run for run in runs if run["name"] in wanted]
    return runs, dims


def _check(args) -> None:
    for option in ("batch", "max_new_tokens", "latent_budget"):
        if getattr(args, option) is not None:
            positive_int(getattr(args, option), "--" + option.replace("_", "-"))
    check_temperature(args.temperature)
    check_span_at(args.span_at, args.max_new_tokens, never=False)
    check_out_folder(args.out)
    if args.judge is not None and args.rules != "vlmevalkit":
        raise UsageError("--judge: only with --rules vlmevalkit (it scores the lines VLMEvalKit's rules leave to a "
                         "judge)")
    if args.judge_model is not None and args.judge is None:
        raise UsageError("--judge-model: give --judge URL too")


def _protocol(args):
    from ..protocol import load_protocol

    if args.protocol is None:
        return None
    try:
        return load_protocol(args.protocol)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _read_all(args) -> list[dict]:
    """--samples: one sample file, or several comma-separated (e.g. the paper's five benchmark TSVs, so Avg-P and
    Avg-R average them); with several, each line's id becomes FILE_STEM/id (TSV indexes repeat across files)."""
    paths = args.samples.split(",")
    if len(paths) == 1:
        return read_samples(args.samples, images=os.path.join(args.out, "images"), category=args.category)
    samples, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise UsageError(f"--samples: {path!r} and {seen[stem]!r} have the same name {stem!r}; their line ids "
                             "would collide")
        seen[stem] = path
        for sample in read_samples(path, images=os.path.join(args.out, "images", stem), category=args.category):
            samples.append({**sample, "id": f"{stem}/{sample['id']}"})
    return samples


def run(args) -> int:
    from .. import distributed

    _check(args)
    runs, dims = plan(args)
    head = load_head(args.head, dims)
    args.protocol_data = _protocol(args)
    samples = _read_all(args)
    place = start(args)
    try:
        scores = _evaluate_all(args, runs, head, samples, place)
    finally:
        distributed.close()
    if place.rank == 0:
        _report(args, scores)
    return 0


def _evaluate_all(args, runs, head, samples, place) -> dict:
    """Each checkpoint loaded once, each of its configurations evaluated; the scores, keyed by name."""
    from itertools import groupby

    from ._common import load_model, load_tokenizer
    from ._gap import prepare

    scores = {}
    for path, group in groupby(runs, key=lambda one: one["path"]):  # plan() keeps a checkpoint's runs together
        tokenizer = load_tokenizer(path)
        model = load_model(path, place)
        suppress = prepare(model, tokenizer, head, latent_budget=args.latent_budget, profile=args.profile,
                           span_layout=args.span_layout, path=path)
        starts = {}  # the calibrated modes of one checkpoint start from one target, computed once
        for one in group:
            scores[one["name"]] = _evaluate_one(args, one, model, tokenizer, head, suppress, samples, starts)
        del model  # freed before the next checkpoint loads
    return scores


def _evaluate_one(args, one, model, tokenizer, head, suppress, samples, starts) -> dict:
    from ..stages.evaluate import evaluate
    from ..stages.scoring import score
    from ..data.images import image_settings
    from ..protocol import PRESETS, image_bounds, sampling, set_aside
    from ..outputs import OutputError
    from ..resumable import ResumeError
    from ._gap import head_name

    folder = os.path.join(args.out, *one["name"].split("/"))
    used = head_name(head, args.head, model)
    protocol = args.protocol_data
    aside = set_aside(model.generation_config)  # what the checkpoint's generation_config.json sets: never used
    pixels = image_bounds(protocol, image_settings(one["path"]))
    try:
        records = evaluate(model, tokenizer, samples, os.path.join(folder, "predictions.jsonl"),
                           calibration=one["calibration"], batch=args.batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           seed=args.seed, settings=pixels,
                           suppress=suppress, protocol=protocol, rules=args.rules,
                           span_at=args.span_at, identity={"model": os.path.abspath(one["path"]), "head": used},
                           keep_settings=os.path.join(folder, "settings.json"), desc=one["name"], starts=starts)
    except (ResumeError, OutputError) as exc:
        raise UsageError(f"--out: {str(exc).removeprefix('out: ')}") from None
    if protocol is None:  # the gap preset with this command's --temperature / --max-new-tokens
        protocol = {**PRESETS["gap"], "temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    judged = _judge(args, records, samples, folder)
    return {**score(records), "model": os.path.abspath(one["path"]), "calibration": one["calibration"],
            "protocol": protocol, "rules": args.rules, "generation": sampling(protocol), "image_settings": pixels,
            "checkpoint_generation_config_ignored": aside, **judged,
            "head": used, "predictions": f"{one['name']}/predictions.jsonl",
            "latent_lines": sum(r["latents"] > 0 for r in records)}


def _judge(args, records, samples, folder) -> dict:
    """With --judge (rank 0): the judge's verdicts on the lines that need one, in place; judged.jsonl holds every
    record with the judge's replies. The scores' ``judge`` entry says who judged how many."""
    from .. import distributed
    from .._io import atomic_write_text
    from ..judge import JudgeError, endpoint_model, judge_records

    if args.judge is None or distributed.rank_world()[0] != 0:
        return {}
    try:
        name = args.judge_model or endpoint_model(args.judge)
        asked = sum(bool(r.get("needs_judge")) for r in records)
        decided = judge_records(records, samples, args.judge, name)
    except JudgeError as exc:
        raise UsageError(str(exc)) from None
    atomic_write_text(os.path.join(folder, "judged.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"judge": {"url": args.judge, "model": name, "asked": asked, "decided": decided}}


def _report(args, scores: dict) -> None:
    from ..stages.evaluate import score_table, write_scores

    json_path, md_path = write_scores(args.out, scores)
    print(score_table(scores), end="")
    lines = next(iter(scores.values()))["counts"]
    latent = ", ".join(f"{name} {result['latent_lines']}" for name, result in scores.items())
    print(f"lines       {sum(lines.values())} per configuration, {len(scores)} configuration(s); "
          f"lines with latents: {latent}")
    if args.rules == "vlmevalkit":
        for name, result in scores.items():
            waiting = ", ".join(f"{task} {n}" for task, n in result["needs_judge"].items())
            judged = f"; the judge decided {result['judge']['decided']} of {result['judge']['asked']}" \
                if "judge" in result else ""
            print(f"needs judge {name}: {waiting} (ids in scores.json 'judge_lines'; counted wrong here{judged})")
    print(f"wrote       {json_path}, {md_path}, {args.out}/NAME/predictions.jsonl")
