"""``gapkern generate``: one latent-span generation, its latent norms and time per step.

It runs one latent-span generation end to end and prints
the tokens, the latent norms before and after calibration against the norms
of the visual input embeddings, and the time per text step and per latent
step. With no arguments it runs on a built-in tiny Qwen2.5-VL with random
weights; ``--model PATH`` loads a local Qwen2.5-VL checkpoint folder (it must
hold the tokenizer too: the prompt is built with its chat template).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from . import UsageError
from ._common import add_device_arguments, check_span_at, check_temperature, device_of, dtype_of
from ._gap import add_gap_arguments

TINY_BUDGET, TINY_SPAN_AT, TINY_IMAGE = 8, 2, 224

NAME, HELP = "generate", "one latent-span generation: tokens, latent norms, time per step"
DESCRIPTION = ("Generate with latent spans and report the latent norms and the time per step. "
               "Without --model: a tiny Qwen2.5-VL with random weights, a random PCA head, a synthetic "
               f"image, and a latent span forced at new position {TINY_SPAN_AT}.")


def add_arguments(gen) -> None:
    gen.add_argument("--model", metavar="PATH",
                     help="a local Qwen2.5-VL checkpoint folder, with its tokenizer (a gapkern-saved one "
                          "brings its head and GapConfig)")
    add_gap_arguments(gen, several=False,
                      calibration_help="latent norm calibration (default: the checkpoint's, else rms)",
                      head_help="a PCALatentHead file, or 'none' for output-as-input (default: the checkpoint's "
                                "head; a random one for the tiny model)",
                      budget_help=f"latents per span (default: the checkpoint's, else the profile's: gap 16, "
                                  f"monet 10; tiny: {TINY_BUDGET})")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                     help="new positions, latent ones included (default 32)")
    gen.add_argument("--prompt", default="Describe the image.", metavar="TEXT")
    gen.add_argument("--image", metavar="FILE", help="an image file (default: a synthetic "
                                                     f"{TINY_IMAGE}x{TINY_IMAGE} image)")
    gen.add_argument("--span-at", type=int, metavar="I",
                     help="force the latent start token at new position I, -1 for never (default: "
                          f"{TINY_SPAN_AT} for the tiny model, never with --model)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    add_device_arguments(gen)
    gen.add_argument("--seed", type=int, default=0)


def _check_args(args):
    """The checks that need no model: each bad value is one line naming its option."""
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens: expected at least 1")
    if args.latent_budget is not None and args.latent_budget < 1:
        raise UsageError("--latent-budget: expected at least 1")
    check_temperature(args.temperature)
    check_span_at(args.span_at, args.max_new_tokens)
    if not args.model and args.profile not in (None, "gap"):
        raise UsageError(f"--profile: the tiny model has only the gap profile's tokens; {args.profile!r} "
                         "needs --model")
    if args.image is not None:
        _check_image(args.image)


def _check_image(path: str) -> None:
    """--image exists and decodes, before the model loads (a damaged or truncated one, or a decompression bomb,
    is one line naming the file)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UsageError(f"--image: no file at {path!r}")
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"--image: cannot read the image {path!r} ({type(exc).__name__}: {exc})") from None


def _device_dtype(args):
    device = device_of(args.device)
    return device, dtype_of(args.dtype, device)


def _check_backend(device, dtype):
    """GAPKERN_BACKEND is read when gapkern is imported; a bad one would fail at the first latent."""
    from .. import ops

    try:
        ops.module_for(device, dtype)
    except ValueError:
        raise UsageError(f"GAPKERN_BACKEND: expected one of {', '.join(ops.backend.NAMES)}, "
                         f"got {os.environ.get('GAPKERN_BACKEND')!r}") from None
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"GAPKERN_BACKEND: {exc}") from None


def _check_head(head, model, args):
    """A --head file must fit the model's width (the checkpoint's own head always does)."""
    from ._gap import KEEP_HEAD

    dim = model.config.text_config.hidden_size
    if head not in (None, KEEP_HEAD) and head.hidden_size != dim:
        raise UsageError(f"--head: {args.head!r} has hidden size {head.hidden_size}, the model {dim}")


def _tiny(args, dtype):
    """The tiny model, patched: its name, tokenizer and the ids it must not sample."""
    import gapkern

    from ._gap import KEEP_HEAD, load_head
    from ..testing import tiny_head, tiny_qwen2_5_vl, tiny_tokenizer

    model, ids = tiny_qwen2_5_vl(seed=args.seed, dtype=dtype)
    head = load_head(args.head, {})
    _check_head(head, model, args)
    head = tiny_head(model, seed=args.seed) if head is KEEP_HEAD else head
    gapkern.patch(model, head, ids.gap_config(latent_budget=args.latent_budget or TINY_BUDGET,
                                              calibration=args.calibration or "rms", span_layout=args.span_layout))
    dims = model.config.text_config
    name = f"tiny Qwen2.5-VL, random weights (D={dims.hidden_size}, {dims.num_hidden_layers} layers)"
    banned = list(range(ids.first_text))  # random weights: no special token unless scripted, no early EOS
    return model, tiny_tokenizer(ids), name, banned


def _load(args, dtype):
    """The --model checkpoint, patched (its head, GapConfig and running target unless the options replace
    them; a plain one output-as-input, calibration rms by default): its name, tokenizer, no banned ids."""
    from ..loaders import checkpoint_config, from_pretrained, load_tokenizer
    from ._gap import load_head, prepare

    path = args.model
    data = checkpoint_config(path)
    head = load_head(args.head, {})
    tokenizer = load_tokenizer(path)
    print(f"loading {path} ...", file=sys.stderr)
    model = from_pretrained(path, dtype)
    _check_head(head, model, args)
    # generate forces a span with --span-at and suppresses nothing, unlike prepare's list for eval and diagnose
    prepare(model, tokenizer, head, latent_budget=args.latent_budget, profile=args.profile, path=path,
            span_layout=args.span_layout,
            calibration=args.calibration or (None if data.get("gap") else "rms"))
    return model, tokenizer, f"{path} ({type(model).__name__})", []


def _inputs(args, model, tokenizer):
    from ..data.images import image_settings, read_image, synthetic_image
    from ..data.prompts import chat_inputs
    from ..data.prompts import to_model

    settings = image_settings(args.model)
    factor = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    if args.image is None:
        image, what = synthetic_image(TINY_IMAGE, args.seed), f"synthetic image {TINY_IMAGE}x{TINY_IMAGE}"
    else:
        if not os.path.isfile(args.image):
            raise UsageError(f"--image: no file at {args.image!r}")
        try:
            image = read_image(args.image, factor, settings["min_pixels"], settings["max_pixels"])
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UsageError(f"--image: {exc}") from None
        what = f"{os.path.basename(args.image)} at {image.shape[2]}x{image.shape[1]}"
    try:
        batch = chat_inputs(model, tokenizer, args.prompt, image, settings["mean"], settings["std"])
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    return to_model(batch, model), what


def _describe_head(head):
    return "output-as-input (no head)" if head is None else \
        f"PCA rank {head.rank}{', whitened' if head.sigma is not None else ''}"


def _tokens(tokenizer, ids, pad_id):
    """Text runs decoded, runs of the latent placeholder shown once with their count."""
    parts, run, i = [], [], 0
    while i < len(ids):
        if ids[i] == pad_id:
            j = i
            while j < len(ids) and ids[j] == pad_id:
                j += 1
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(f"{tokenizer.convert_ids_to_tokens(pad_id)}x{j - i}")
            i = j
        else:
            run.append(ids[i])
            i += 1
    if run:
        parts.append(tokenizer.decode(run))
    return " ".join(p.strip() for p in parts if p.strip())


def _stats(values):
    if not values:
        return "-"
    return f"mean {statistics.fmean(values):.4g} (min {min(values):.4g}, max {max(values):.4g})"


def _ms(values):
    return f"{statistics.median(values) * 1e3:.3f} ms ({len(values)} steps)" if values else "- (0 steps)"


def run(args) -> int:
    _check_args(args)
    import torch
    from tqdm import tqdm
    from transformers import LogitsProcessorList

    from ..models import StepTrace
    from ..sampling import ForceTokens

    device, dtype = _device_dtype(args)
    _check_backend(device, dtype)
    if not args.model and device.type == "cpu":
        torch.set_num_threads(1)  # the tiny model's matmuls gain nothing from threads, and lose on a busy CPU
    torch.manual_seed(args.seed)
    model, tokenizer, name, banned = _load(args, dtype) if args.model else _tiny(args, dtype)
    model = model.to(device).eval()
    cfg = model.gap.config
    batch, image_what = _inputs(args, model, tokenizer)
    prompt_len = batch["input_ids"].shape[1]
    span_at = args.span_at if args.span_at is not None else -1 if args.model else TINY_SPAN_AT
    sched = {(0, span_at): cfg.latent_start_id} if span_at >= 0 else {}
    processors = LogitsProcessorList([ForceTokens(prompt_len, sched, banned=banned)])
    sample = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}

    with tqdm(total=args.max_new_tokens - 1, desc="generate", unit="step", leave=False, disable=None) as bar:
        trace = StepTrace(on_step=bar.update)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, logits_processor=processors,
                             return_dict_in_generate=True, trace=trace, **sample)
        total = time.perf_counter() - start

    new = out.sequences[0, prompt_len:].tolist()
    visual, raw, fed = trace.visual_norms[0], trace.raw_norms[0], trace.fed_norms[0]
    target = {"none": "none", "rms": statistics.fmean(visual) if visual else float(model.gap.tau_ema),
              "ema": float(model.gap.tau_ema)}[cfg.calibration]
    ratio = (f"; latent/text {statistics.median(trace.latent_s) / statistics.median(trace.text_s):.2f}"
             if trace.text_s and trace.latent_s else "")
    print(f"model        {name} on {device} {str(dtype).removeprefix('torch.')}")
    print(f"head         {_describe_head(model.gap.head)}")
    print(f"gap          profile {cfg.profile}, {cfg.span_layout} layout, K={cfg.latent_budget} latents per span, "
          f"calibration {cfg.calibration}")
    print(f"prompt       {prompt_len} tokens: {args.prompt!r} + {image_what} "
          f"({int(batch['mm_token_type_ids'].sum())} visual tokens)")
    print(f"new tokens   {len(new)}: {_tokens(tokenizer, new, cfg.latent_pad_id)}")
    print(f"latents      {len(fed)} written; L2 norms:")
    print(f"  visual input embeddings  {_stats(visual)}")
    print(f"  before calibration       {_stats(raw)}")
    print(f"  after calibration        {_stats(fed)}")
    print(f"  calibration target       {target if isinstance(target, str) else f'{target:.4g}'}")
    print(f"time per step  text {_ms(trace.text_s)}, latent {_ms(trace.latent_s)}{ratio} "
          f"(median; generate took {total:.2f} s)")
    return 0

