"""``gapkern train``: teacher-forced GAP training driven by ``transformers.Trainer`` (SPEC 4.5).

The Trainer brings DDP / FSDP / DeepSpeed, gradient accumulation, bf16,
LR schedules, logging, checkpoints and exact resume; this module only loads
the model with its head and GapConfig, chooses what trains, feeds the
collator, logs ``text_loss`` and ``latent_loss`` beside ``loss``, and saves
the result as a gapkern checkpoint (``save_pretrained`` + tokenizer) that
``gapkern generate --model`` loads.

The data folder is the one ``gapkern build-data`` writes: ``samples.jsonl``
and the target shards with their ``index.json`` (in the folder or in its
``targets/``). ``curated`` is ``gapkern curate``'s output; only its ``id``
and ``hard`` fields are read. Without it every line is hard.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import time

import torch
from transformers import HfArgumentParser, PreTrainedModel, Trainer, TrainingArguments, set_seed

from ..data import load_samples
from ..head import PCALatentHead
from ..models.prompt import image_settings
from ..targets import INDEX, TargetReader, latent_keys
from .collate import GapCollator

__all__ = ["GapTrainer", "train", "load_training_samples", "load_model", "choose_trainable", "merge_lora",
           "training_arguments", "SAMPLES"]

SAMPLES = "samples.jsonl"  # the sample file inside a build-data folder
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
        if model.training:
            text = outputs.text_loss if outputs.text_loss is not None else torch.zeros_like(outputs.loss)
            part = torch.stack([text.detach().float(), outputs.latent_loss.detach().float(),
                                torch.ones_like(text, dtype=torch.float32)])
            self._parts = part if self._parts is None else self._parts + part
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, *args, **kwargs):
        # every rank logs (the Trainer gathers the loss there too), so the reduce is collective
        if "loss" in logs and self._parts is not None:
            text, latent, count = self.accelerator.reduce(self._parts, reduction="sum").tolist()
            logs = {**logs, "text_loss": text / count, "latent_loss": latent / count}
            self._parts = None
        return super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        if self.hub_layout or not isinstance(model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained


def load_training_samples(data: str, curated: str | None = None) -> tuple[list[dict], TargetReader | None]:
    """The samples of a build-data folder with ``hard`` set (from ``curated``, else True), and its targets."""
    path = os.path.join(data, SAMPLES)
    if not os.path.isdir(data) or not os.path.isfile(path):
        raise FileNotFoundError(f"data: expected a gapkern build-data folder with {SAMPLES}, got {data!r}")
    samples = load_samples(path)
    hard = _read_curated(curated, samples) if curated else {s["id"]: True for s in samples}
    samples = [dict(s, hard=hard[s["id"]]) for s in samples]
    folder = next((f for f in (data, os.path.join(data, "targets")) if os.path.isfile(os.path.join(f, INDEX))), None)
    reader = TargetReader(folder) if folder else None
    needed = [k for s in samples if s["hard"] for k in latent_keys(s)]
    if needed and reader is None:
        raise FileNotFoundError(f"data: {len(needed)} latent steps of hard lines need targets, but {data!r} has no "
                                f"{INDEX} (run gapkern build-data to the end)")
    missing = [k for k in needed if k not in reader] if needed else []
    if missing:
        raise ValueError(f"data: the targets in {reader.folder!r} lack {len(missing)} latent steps "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return samples, reader


def _read_curated(path: str, samples: list[dict]) -> dict[str, bool]:
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
    return hard


def load_model(path: str, *, head: str | None = None, no_head: bool = False, profile: str | None = None,
               latent_budget: int | None = None, dtype=torch.float32):
    """The model as a Gap Qwen2.5-VL with its head and GapConfig attached, and its tokenizer.

    A gapkern checkpoint brings its head and GapConfig; a plain Qwen2.5-VL gets
    the profile's tokens and needs ``head`` (a PCALatentHead file) or ``no_head``.
    """
    from transformers import AutoTokenizer

    from ..models import GapQwen2_5_VLForConditionalGeneration, add_latent_tokens

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model: no checkpoint folder at {path!r} (expected a folder with config.json)")
    with open(config_path) as f:
        saved_gap = json.load(f).get("gap")
    if not saved_gap and not head and not no_head:
        raise ValueError(f"head: {path!r} is a plain Qwen2.5-VL checkpoint; pass a PCALatentHead file "
                         "(gapkern fit-pca) or train output-as-input without a head")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ValueError(f"model: the tokenizer in {path!r} has no chat template")
    model = GapQwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    if saved_gap:
        cfg = model.gap.config
        if profile is not None and profile != cfg.profile:
            raise ValueError(f"profile: {path!r} was saved with profile {cfg.profile!r}")
        if latent_budget is not None and latent_budget != cfg.latent_budget:
            raise ValueError(f"targets: K={latent_budget} latents per step, but {path!r} was saved with "
                             f"latent_budget {cfg.latent_budget}")
        chosen = None if no_head else PCALatentHead.load(head) if head else model.gap.head
    else:
        cfg = add_latent_tokens(tokenizer, model, profile=profile or "gap", latent_budget=latent_budget or 16)
        chosen = None if no_head else PCALatentHead.load(head)
    model.set_gap(chosen, cfg)
    return model, tokenizer


def choose_trainable(model, *, train_vision: bool = False, freeze_lm: bool = False, lora: int | None = None) -> int:
    """Freeze what does not train; with ``lora`` inject LoRA adapters into the language model. Returns the count."""
    model.model.visual.requires_grad_(train_vision)
    if lora is not None:
        _add_lora(model, lora)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith("gap.head.")
                                 or (train_vision and name.startswith("model.visual.")))
    elif freeze_lm:
        model.model.language_model.requires_grad_(False)
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


def training_arguments(out: str, extra=(), **fields) -> TrainingArguments:
    """TrainingArguments from gapkern's settings, then ``extra`` (Trainer flags, e.g. ``--lr_scheduler_type cosine``)."""
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
    return args


def train(model: str, data: str, out: str, *, curated: str | None = None, head: str | None = None,
          no_head: bool = False, profile: str | None = None, epochs: float = 1.0, max_steps: int = -1,
          lr: float = 1e-5, batch: int = 1, grad_accum: int = 1, bf16: bool = False, seed: int = 0,
          save_steps: int = 500, logging_steps: int = 10, resume: str | bool | None = None,
          train_vision: bool = False, freeze_lm: bool = False, lora: int | None = None,
          latent_loss_weight: float = 1.0, dtype=torch.float32, trainer_args=()) -> dict:
    """Train and save a gapkern checkpoint into ``out``; returns a summary (steps, losses, seconds, ...)."""
    start = time.perf_counter()
    set_seed(seed)
    args = training_arguments(out, trainer_args, num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr,
                              per_device_train_batch_size=batch, gradient_accumulation_steps=grad_accum, bf16=bf16,
                              seed=seed, save_steps=save_steps, logging_steps=logging_steps,
                              ddp_find_unused_parameters=train_vision)  # only a batch without images leaves some out
    samples, reader = load_training_samples(data, curated)
    k = None if reader is None or reader.shape is None else reader.shape[0]
    net, tokenizer = load_model(model, head=head, no_head=no_head, profile=profile, latent_budget=k, dtype=dtype)
    trainable = choose_trainable(net, train_vision=train_vision, freeze_lm=freeze_lm, lora=lora)
    settings = image_settings(model)
    collator = GapCollator(tokenizer, net.config, net.gap.config, targets=reader, image_settings=settings)
    trainer = GapTrainer(model=net, args=args, train_dataset=samples, data_collator=collator,
                         processing_class=tokenizer, latent_loss_weight=latent_loss_weight)
    result = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    if lora is not None:
        merge_lora(trainer.model)
    trainer.hub_layout = True
    trainer.save_model(out)
    trainer.save_state()
    if trainer.is_world_process_zero():
        _copy_image_settings(model, out)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"out": out, "steps": trainer.state.global_step, "samples": len(samples),
            "hard": sum(s["hard"] for s in samples), "trainable": trainable, "train_loss": result.training_loss,
            "first": logged[0] if logged else None, "last": logged[-1] if logged else None,
            "seconds": time.perf_counter() - start, "world": args.world_size}


def _copy_image_settings(model: str, out: str) -> None:
    """The image processor's settings travel with the weights: generate resizes images the same way."""
    source = os.path.join(model, "preprocessor_config.json")
    if os.path.isfile(source) and os.path.abspath(model) != os.path.abspath(out):
        shutil.copyfile(source, os.path.join(out, "preprocessor_config.json"))

