"""Teacher-forced GAP training driven by ``transformers.Trainer`` (SPEC 4.5).

The Trainer brings DDP / FSDP / DeepSpeed, gradient accumulation, bf16,
LR schedules, logging, checkpoints and exact resume; this module attaches
the head and GapConfig, chooses what trains, feeds the collator, logs
``text_loss`` and ``latent_loss`` beside ``loss``, and saves the result as a
gapkern checkpoint (``save_pretrained`` + tokenizer) that ``gapkern generate
--model`` loads.

    model = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path)
    attach_gap(model, tokenizer, PCALatentHead.load(head_file), latent_budget=build.settings["K"])
    train(model, tokenizer, build.samples, out, targets=build.targets, args=training_arguments(out, max_steps=100))
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import shutil
import time

import torch
from transformers import HfArgumentParser, PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .._io import disk_full, no_space
from ..config import KEEP_HEAD
from ..outputs import holds_out
from ..data import latent_keys, uses_latents
from ..models.qwen2_5_vl import hf_compat as hf
from ..models.tokens import add_latent_tokens
from .collate import GapCollator
from .fsdp import use_gap_wrap

__all__ = ["GapTrainer", "train", "attach_gap", "apply_curation", "check_targets", "choose_trainable",
           "merge_lora", "training_arguments", "finite_number", "KEEP_HEAD"]

LORA_TARGETS = rf".*{re.escape(hf.LANGUAGE_MODEL)}.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class GapTrainer(Trainer):
    """A Trainer whose loss is the Gap forward's and whose logs carry ``text_loss`` and ``latent_loss``.

    Checkpoints keep the model's own parameter names: the Trainer reloads them
    with ``load_state_dict``, which does not undo the renaming to the hub
    layout that ``save_pretrained`` does by default (transformers issue 43701).
    Set ``hub_layout = True`` before a final ``save_model`` to write the hub layout.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
    hub_layout = False

    def __init__(self, *args, latent_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_loss_weight = latent_loss_weight
        self._parts = None  # sums of text_loss, latent_loss and their count since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, latent_loss_weight=self.latent_loss_weight)
        if model.training and not torch.isfinite(outputs.loss):  # one host sync, as the Trainer's own NaN filter
            self._stop_on(outputs)
        if model.training:
            text = outputs.text_loss if outputs.text_loss is not None else torch.zeros_like(outputs.loss)
            part = torch.stack([text.detach().float(), outputs.latent_loss.detach().float(),
                                torch.ones_like(text, dtype=torch.float32)])
            self._parts = part if self._parts is None else self._parts + part
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _stop_on(self, outputs):
        """A non-finite loss stops the run before the optimizer step: the checkpoints saved so far stay good."""
        from transformers.trainer_utils import get_last_checkpoint

        parts = ", ".join(f"{name} {float(getattr(outputs, name).detach()):g}" for name in ("text_loss", "latent_loss")
                          if getattr(outputs, name, None) is not None)
        folder = self.args.output_dir
        last = get_last_checkpoint(folder) if folder and os.path.isdir(folder) else None
        raise FloatingPointError(
            f"loss: not finite ({float(outputs.loss):g}{'; ' + parts if parts else ''}) at step "
            f"{self.state.global_step + 1}; training stopped. "
            + (f"The last good checkpoint is {last} (--resume {last})" if last else "No checkpoint was saved yet")
            + "; check the data and lower the learning rate or the latent loss weight")

    def log(self, logs, *args, **kwargs):
        # every rank logs (the Trainer gathers the loss there too), so the reduce is collective
        if "loss" in logs and self._parts is not None:
            text, latent, count = self.accelerator.reduce(self._parts, reduction="sum").tolist()
            logs = {**logs, "text_loss": text / count, "latent_loss": latent / count}
            self._parts = None
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer writes checkpoint-STEP file by file (weights, optimizer, RNG, trainer_state.json) and a run
        stopped in between left a folder that ``--resume`` took for whole: here it is written under
        OUT/.tmp-checkpoint/ and renamed into place once every rank has written its part (a rename is atomic),
        then the older ones beyond ``save_total_limit`` are removed. A write that fails on a full disk is an
        OSError ENOSPC naming OUT; the checkpoints before it stay whole."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a killed save's
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as exc:
            full = disk_full(exc, staging)  # before the cut save goes: it holds the space the write took
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise no_space(run_dir) from exc
            raise
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            _replace_folder(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            _rotate(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir=None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        if self.hub_layout:
            # Under ZeRO-3 from_pretrained leaves its legacy renamings on the model too, and reverting their
            # PrefixChange on save wrote the language model as "model.model.*": save with the default mapping,
            # the one a plain load keeps (the same file as without ZeRO-3).
            with hf.default_weight_mapping(model):
                return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained


STAGING = ".tmp-checkpoint"  # where a checkpoint is written before its rename; never a checkpoint-STEP match


def _replace_folder(new: str, path: str) -> None:
    """``new`` renamed to ``path``; a ``path`` already there (a resume from an earlier checkpoint writes the same
    step again) is set aside first and removed after."""
    old = path + ".old" if os.path.isdir(path) else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(new, path)
    if old:
        shutil.rmtree(old)


def _rotate(run_dir: str, limit: int | None, keep: str | None) -> None:
    """Remove the oldest checkpoint-STEP folders (by step) beyond ``limit``, never the newest nor ``keep``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = sorted(int(name.rsplit("-", 1)[1]) for name in os.listdir(run_dir)
                   if re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-\d+", name))
    folders = [os.path.abspath(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")) for step in steps]
    if not limit or limit <= 0 or not folders:
        return
    kept = {folders[-1]} | ({os.path.abspath(keep)} if keep else set())
    extra = len(folders) - max(limit, len(kept))
    for folder in (f for f in folders if f not in kept):
        if extra <= 0:
            break
        shutil.rmtree(folder)
        extra -= 1


def whole_checkpoint(path: str) -> str:
    """``path`` when it is a checkpoint the Trainer finished writing (its trainer_state.json, written last, reads
    as JSON), else a ValueError naming it."""
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"resume: {path!r} is not a whole training checkpoint ({state}: "
                         f"{getattr(exc, 'strerror', None) or exc}); resume from another checkpoint-STEP folder "
                         "or without --resume") from None
    return path


class BarOnlyProgress(ProgressCallback):
    """The Trainer's progress bar, with the last logged losses as its postfix instead of one printed line a log;
    shown on a terminal only (tqdm's ``disable=None``), like gapkern's other bars, and never with ``show=False``."""

    def __init__(self, show: bool = True):
        super().__init__()
        self.show = show

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True,
                                     disable=None if self.show else True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            keys = [k for k in ("loss", "text_loss", "latent_loss") if k in logs]
            self.training_bar.set_postfix({k: f"{logs[k]:.3g}" for k in keys}, refresh=False)


def apply_curation(samples: list[dict], path: str) -> list[dict]:
    """``samples`` with ``hard`` taken from a curated file (``gapkern curate``'s output: only ``id`` and ``hard``
    are read); every sample needs a line there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"curated: no file at {path!r}")
    hard = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}:line: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("hard"), bool):
                raise ValueError(f"{path}:{number}:hard: expected true or false (a gapkern curate output line)")
            hard[str(obj.get("id"))] = obj["hard"]
    missing = [s["id"] for s in samples if s["id"] not in hard]
    if missing:
        raise ValueError(f"curated: {path!r} has no line for {len(missing)} training sample(s) "
                         f"({', '.join(map(repr, missing[:3]))}{', ...' if len(missing) > 3 else ''})")
    return [dict(s, hard=hard[s["id"]]) for s in samples]


def check_targets(samples: list[dict], targets, dim: int) -> None:
    """Every latent step of a line that trains with latents has a target of width ``dim``."""
    needed = [k for s in samples if uses_latents(s) for k in latent_keys(s)]
    if not needed:
        return
    if targets is None:
        raise ValueError(f"targets: {len(needed)} latent steps train with latents but no targets were given")
    missing = [k for k in needed if k not in targets]
    if missing:
        raise ValueError(f"targets: {targets.folder!r} lacks {len(missing)} latent steps "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); build the data "
                         "from the same (curated) sample file")
    if targets.shape[1] != dim:
        raise ValueError(f"targets: width {targets.shape[1]}, but the model's hidden size is {dim}")


def attach_gap(model, tokenizer, head=KEEP_HEAD, *, profile: str | None = None, latent_budget: int | None = None):
    """Give a ``GapQwen2_5_VLForConditionalGeneration`` the head and GapConfig it trains with; returns the config.

    ``head``: a PCALatentHead, None (output-as-input) or :data:`KEEP_HEAD`
    (the checkpoint's own). A gapkern checkpoint keeps its GapConfig (``profile``
    and ``latent_budget``, when given, must agree with it); a plain one gets
    the profile's tokens (default gap) and ``latent_budget`` (default: the profile's K, gap 16, monet 10).
    """
    state = model._modules.get("gap")
    if state is not None:
        cfg = state.config
        if profile is not None and profile != cfg.profile:
            raise ValueError(f"profile: the checkpoint was saved with profile {cfg.profile!r}, not {profile!r}")
        if latent_budget is not None and latent_budget != cfg.latent_budget:
            raise ValueError(f"latent_budget: the targets have K={latent_budget} per latent step, but the "
                             f"checkpoint was saved with latent_budget {cfg.latent_budget}")
        head = state.head if head is KEEP_HEAD else head
    else:
        if head is KEEP_HEAD:
            raise ValueError("head: a plain Qwen2.5-VL checkpoint has no head; pass a PCALatentHead file "
                             "(gapkern fit-pca) or train output-as-input without a head")
        cfg = add_latent_tokens(tokenizer, model, profile=profile or "gap", latent_budget=latent_budget)
    model.set_gap(head, cfg)
    return cfg


def choose_trainable(model, *, train_vision: bool = False, freeze_lm: bool = False, lora: int | None = None) -> int:
    """Freeze what does not train; with ``lora`` inject LoRA adapters into the language model. Returns the count."""
    hf.vision_tower(model).requires_grad_(train_vision)
    if lora is not None:
        _add_lora(model, lora)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith("gap.head.")
                                 or (train_vision and name.startswith(hf.VISION_TOWER)))
    elif freeze_lm:
        hf.language_model(model).requires_grad_(False)
        model.lm_head.requires_grad_(False)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        raise ValueError("freeze_lm: nothing left to train (no head, language model and vision tower frozen)")
    return count


def _add_lora(model, rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora: expected a positive rank, got {rank!r}")
    try:
        import peft
    except ImportError:
        raise ImportError("lora: needs peft, an optional extra (pip install 'gapkern[lora]')") from None
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft.inject_adapter_in_model(config, model)


def merge_lora(model) -> None:
    """Fold every LoRA adapter into its base layer and put the base layer back: a plain checkpoint again."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def finite_number(name: str, value) -> float:
    """``value`` when it is a finite number >= 0, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return value


def training_arguments(out: str, extra=(), **fields) -> TrainingArguments:
    """TrainingArguments for ``out`` with gapkern's defaults and ``fields``, then ``extra``: Trainer flags as on a
    command line (``["--lr_scheduler_type", "cosine"]``), which win."""
    device = torch.accelerator.is_available()  # without one, torchrun ranks are CPU processes (DDP over gloo)
    defaults = {"output_dir": out, "remove_unused_columns": False, "report_to": "none", "save_strategy": "steps",
                "dataloader_num_workers": 0, "dataloader_pin_memory": device, "use_cpu": not device, **fields}
    argv = [item for key, value in defaults.items() for item in (f"--{key}", str(value))] + list(extra)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage text: replaced by one line naming the flags
            args, unknown = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
                args=argv, return_remaining_strings=True)
    except SystemExit:
        reason = said.getvalue().strip().splitlines()[-1:] or ["invalid"]
        raise ValueError(f"trainer_args: not valid TrainingArguments flags ({reason[0]})") from None
    if unknown:
        raise ValueError(f"trainer_args: not TrainingArguments flags: {' '.join(unknown)}")
    if args.fsdp and not device:
        # accelerate would quietly run DDP on CPU ranks (FSDP2) or stop in sync_module_states (FSDP1)
        raise ValueError("trainer_args: --fsdp needs an accelerator (CUDA) to shard on and none is available "
                         "here (on CPU ranks accelerate would run plain DDP); drop --fsdp, or shard with "
                         "--deepspeed and a ZeRO config")
    if args.deepspeed:
        _prepare_deepspeed(args, device)
    return args


def _prepare_deepspeed(args: TrainingArguments, device: bool) -> None:
    """ZeRO-3's saves always hold the whole model (its 16-bit weights gathered onto rank 0: a checkpoint
    every gapkern command loads, instead of shards for zero_to_fp32.py), and on CPU ranks DeepSpeed's own
    comm sits on the gloo group accelerate made (``use_cpu`` leaves it unset, so ZeRO-3's model loading
    took the world size for 1 and refused the Trainer's batch sizes).

    On CPU ranks DeepSpeed's comm also compiles, on its first run on a machine, a shared-memory all-reduce
    (``build_shm_op``, deepspeed 0.19 ``deepspeed/comm/torch.py:47``, called at :207: gcc over torch's headers,
    90-200 s seen here) that only its inference / tensor-parallel all-reduce calls, never ZeRO training; it is
    marked not compatible, so gloo does all the reducing (``deepspeed.ops.__compatible_ops__`` is one module
    dict that keeps such edits)."""
    zero = args.hf_deepspeed_config.config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if not device:
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo")


@holds_out(folder=True)
def train(model, tokenizer, samples: list[dict], out: str, *, targets=None, args: TrainingArguments | None = None,
          image_settings: dict | None = None, resume: str | bool | None = None, latent_loss_weight: float = 1.0,
          train_vision: bool = False, freeze_lm: bool = False, lora: int | None = None,
          log_lines: bool = True) -> dict:
    """Train ``model`` (a Gap Qwen2.5-VL after :func:`attach_gap`) on ``samples`` and save it into ``out``.

    ``targets`` a TargetReader for the latent steps, ``args`` the
    TrainingArguments (default :func:`training_arguments` ``(out)``),
    ``resume`` a checkpoint folder or True for the last one in ``args.output_dir``.
    ``log_lines=False``: no line printed per log; the progress bar (unless ``args.disable_tqdm``) shows the
    losses instead (the logs are kept in ``trainer_state.json`` all the same).
    Returns a summary: steps, lines, hard lines, trainable parameters, the
    first and last logged losses, seconds, world size.
    """
    start = time.perf_counter()
    args = args or training_arguments(out)
    finite_number("latent_loss_weight", latent_loss_weight)
    finite_number("learning_rate", args.learning_rate)
    args.remove_unused_columns = False  # the collator needs the sample dicts whole
    if args.ddp_find_unused_parameters is None:  # every trainable part is used, but a text-only batch skips vision
        args.ddp_find_unused_parameters = train_vision
    check_targets(samples, targets, model.config.text_config.hidden_size)
    trainable = choose_trainable(model, train_vision=train_vision, freeze_lm=freeze_lm, lora=lora)
    use_gap_wrap(args, model)  # --fsdp: the decoder layers, vision blocks and the head each a unit
    collator = GapCollator(tokenizer, model.config, model.gap.config, targets=targets, image_settings=image_settings)
    trainer = GapTrainer(model=model, args=args, train_dataset=samples, data_collator=collator,
                         processing_class=tokenizer, latent_loss_weight=latent_loss_weight)
    if not log_lines:
        trainer.remove_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)
        trainer.add_callback(BarOnlyProgress(show=not args.disable_tqdm))
    if isinstance(resume, str):
        whole_checkpoint(resume)
    result = trainer.train(resume_from_checkpoint=resume)
    if lora is not None:
        merge_lora(trainer.model)
    trainer.hub_layout = True  # the final model in the usual layout
    trainer.save_model(out)
    trainer.save_state()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"out": out, "steps": trainer.state.global_step, "samples": len(samples),
            "latent_lines": sum(uses_latents(s) for s in samples), "trainable": trainable,
            "train_loss": result.training_loss, "first": logged[0] if logged else None,
            "last": logged[-1] if logged else None, "seconds": time.perf_counter() - start,
            "world": args.world_size, "main": trainer.is_world_process_zero()}
