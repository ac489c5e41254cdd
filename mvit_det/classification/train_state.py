"""Pieces of the training run that are not the loop: errors, the model and its initial weights, the optimiser and
schedule (timm factories), and the resumable state file ``last.pth``."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..checkpoint import describe_state_dict, load_checkpoint, read_checkpoint
from ..checkpoint.io import is_url
from ..checkpoint.loading import CheckpointMismatchError
from ..models import MViTv2, get_card
from ..utils.atomic import atomic_open
from ..utils.hints import interrupted_advice
from .cli_messages import mismatch_for_cli
from .recipes import Recipe, RecipeError
from .train_data import micro_batch_size

__all__ = [
    "OutputError",
    "PretrainedError",
    "ResumeError",
    "TrainingDiverged",
    "atomic_save",
    "interrupt_after",
    "create_train_model",
    "create_train_optimizer",
    "build_scheduler",
    "check_batch",
    "check_output",
    "check_previous_run",
    "interrupted_hint",
    "probe_output",
    "resume_difference",
    "freeze_stages",
    "load_pretrained",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; nothing was saved after the last good checkpoint."""


class OutputError(OSError):
    """The output folder cannot be created or written."""


class ResumeError(ValueError):
    """``--resume`` found a state that belongs to another run (other data, batch, model, ...)."""


class PretrainedError(ValueError):
    """``--pretrained`` names a file that is no checkpoint, or one that does not fit ``--model``."""


#: What a run leaves in its output folder; finding any of them means the folder already holds a run.
_RUN_FILES = ("model_final.pth", "last.pth", "model_best.pth", "metrics.json")


def check_previous_run(output: Path, resume: bool) -> None:
    """Refuse (``OutputError``) to start a new run in a folder that holds one: the new checkpoints and metrics would
    replace the old ones file by file, leaving a mix of two runs. ``resume`` continues the old run instead."""
    if resume or not output.is_dir():
        return
    found = [name for name in _RUN_FILES if (output / name).is_file()]
    found += sorted(p.name for p in output.glob("checkpoint_epoch_*.pth"))
    if not found:
        return
    epochs = ""
    try:
        records = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
        epochs = f", epoch {int(records[-1]['epoch'])}"
    except (OSError, ValueError, LookupError, TypeError):  # no or odd metrics: the file name still tells
        pass
    raise OutputError(
        f"--output {output} already holds a run ({found[0]}{epochs}); training again there would replace its files. "
        "Continue it with --resume, or choose a new --output (or delete the old one) to start over."
    )


def probe_output(output: Path) -> None:
    """Check, without creating anything, that ``output`` could be created: its nearest existing ancestor must be a
    writable folder. So bad arguments found later leave no empty folder behind."""
    existing = output.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is a file" if not existing.is_dir() else "is not writable"
        raise OutputError(
            f"Output folder {output} is not writable ({existing} {problem}). Choose another --output, or fix the "
            "folder's permissions (a file of that name, a read-only disk, no permission)."
        )


def interrupted_hint(output: Path) -> str:
    """What to do after an interruption, naming the state that ``--resume`` would continue from."""
    last = output / "last.pth"
    return interrupted_advice(last if last.is_file() else None, output, saved_as="state")


#: Recipe keys that a command-line flag sets, for the resume advice.
_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "img_size": "--img-size"}


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} items ({', '.join(map(str, value[:5]))}, ...)"
    return str(value)


def resume_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What differs between the saved and the given run: (["epochs: saved 3, given 5", ...], ["--epochs 3", ...])."""
    old_recipe, new_recipe = dict(old.get("recipe") or {}), dict(new.get("recipe") or {})
    pairs = [(k, old.get(k), new.get(k)) for k in new if k != "recipe"]
    pairs += [(k, old_recipe.get(k), new_recipe.get(k)) for k in new_recipe]
    diff = [(k, a, b) for k, a, b in pairs if a != b]
    keys = {k for k, _, _ in diff}
    if {"epochs", "warmup_epochs"} <= keys:
        # The warm-up follows --epochs unless set; its change is then a consequence, not a second difference.
        e0, e1 = old_recipe["epochs"], new_recipe["epochs"]
        w0, w1 = old_recipe["warmup_epochs"], new_recipe["warmup_epochs"]
        if e0 and e1 and abs(w0 / e0 - w1 / e1) < 1e-9:
            diff = [d for d in diff if d[0] != "warmup_epochs"]
    lines = [f"{k}: saved {_short(a)}, given {_short(b)}" for k, a, b in diff]
    flags = [f"{_FLAGS[k]} {a}" for k, a, _ in diff if k in _FLAGS and a is not None]
    flags += [f"--{k} {a}" for k, a, _ in diff if k in ("model", "seed")]
    return lines, flags


def check_batch(recipe: Recipe, world: int, accum: int) -> None:
    """The global batch must split evenly, and into even micro-batches for Mixup/CutMix (``RecipeError``)."""
    try:
        micro = micro_batch_size(recipe.batch_size, world, accum)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if (recipe.mixup > 0 or recipe.cutmix > 0) and micro % 2:
        raise RecipeError(
            f"Mixup/CutMix pairs images inside each micro-batch, which must be even; it is {micro} (batch "
            f"{recipe.batch_size} / {world} process(es) / {accum} accumulation step(s)). Choose an even --batch-size "
            "per process and step, or set mixup: 0 and cutmix: 0 in the --config file."
        )


def check_output(output: Path) -> None:
    """Create ``output`` and prove it writable, or raise ``OutputError`` naming the folder and the fix."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=output)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"Output folder {output} is not writable ({type(e).__name__}: {e.strerror or e}). Choose another "
            "--output, or fix the folder's permissions (a file of that name, a read-only disk, no permission)."
        ) from None


@contextlib.contextmanager
def interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block ends. torch.save turns a KeyboardInterrupt raised inside its writer into
    an obscure RuntimeError ("enforce fail at inline_container.cc"), so a checkpoint write finishes first and the
    interrupt then arrives as a plain KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):  # only Python's own Ctrl-C behaviour is deferred; an ignored or custom handler is left alone
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to a temporary file next to ``path``, renamed over ``path`` when complete."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------
def create_train_model(model_name: str, num_classes: int, recipe: Recipe, act_checkpoint: bool) -> tuple[MViTv2, dict]:
    """The registry model's architecture with ``num_classes`` outputs, sized for ``recipe.img_size``.

    Returns the model and the ``MViTv2`` keyword arguments that rebuild it (stored in the checkpoint).
    """
    card = get_card(model_name)
    kwargs = dict(
        arch=card.size, num_classes=num_classes, expand_attn=card.expand_attn, cls_token=card.cls_token,
        pretrain_img_size=recipe.img_size,
    )
    model = MViTv2(**kwargs, drop_path_rate=recipe.drop_path or 0.0, act_checkpoint=act_checkpoint)
    return model, kwargs


def load_pretrained(model: MViTv2, model_name: str, pretrained: Optional[str]) -> str:
    """Initialise ``model`` from ``pretrained``: ``None`` = the model's published weights, ``"none"`` = random,
    else a path or URL in any format the loaders read. A head of another size is left new; a detector's trunk
    fills everything but the classifier's norm and head. Returns a one-line description for the log."""
    if pretrained is not None and pretrained.lower() == "none":
        return "random initialisation (--pretrained none)"
    source = get_card(model_name).url if pretrained is None else pretrained
    if pretrained is not None and not is_url(pretrained):
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"--pretrained {pretrained} does not exist (relative paths start in {os.getcwd()}). Check the path; "
                "leave --pretrained out for the model's published weights, or use --pretrained none to start from "
                "random weights."
            )
        if path.is_dir():
            raise PretrainedError(f"--pretrained {pretrained} is a folder; give the checkpoint file in it.")
    try:
        return _load_pretrained(model, model_name, source)
    except CheckpointMismatchError as e:  # the loader's advice is for Python callers; name the flags instead
        raise PretrainedError(f"--pretrained: {mismatch_for_cli(e, model_flag='--model')}") from None
    except ValueError as e:  # not a checkpoint, truncated, a trunk that does not fit
        raise PretrainedError(f"--pretrained {source}: {e}") from None


def _load_pretrained(model: MViTv2, model_name: str, source: str) -> str:
    sd, _ = read_checkpoint(source)
    info = describe_state_dict(sd)
    if not info.has_final_norm:  # a detection trunk: no classifier norm / head to take
        report = load_checkpoint(model, source, strict=False)
        wrong = [k for k in report.missing if not k.startswith(("norm.", "head."))]
        wrong += [k for k in report.unexpected if not (k.startswith("scale") and "_norm." in k)]  # stage norms
        if wrong or report.mismatched:
            raise ValueError(f"Checkpoint {source} does not fit {model_name}'s trunk: {report.summary()}")
        return f"trunk from the detector checkpoint {source} ({len(report.loaded)} weights); norm and head are new"
    new_head = info.num_classes != model.num_classes
    report = load_checkpoint(model, source, strict=True, skip_head=new_head)
    head = (
        f"; new {model.num_classes}-class head (the checkpoint has {info.num_classes} classes)"
        if new_head
        else "; head kept"
    )
    return f"{len(report.loaded)} weights from {source} ({report.format} format){head}"


def freeze_stages(model: MViTv2, stages: int) -> list[str]:
    """Freeze the stem (and class token) and the blocks of the first ``stages`` stages; return what was frozen."""
    if stages <= 0:
        return []
    last = model.arch.last_block_indexes[stages - 1]
    frozen = []
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if name.startswith(("patch_embed.", "cls_token")) or (block is not None and block <= last):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


# --------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------------------
class _LayerView:
    """What timm's layer-decay grouping needs: parameter names, and the layer of each (stem 0, block i -> i+1,
    final norm and head last)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def create_train_optimizer(model: MViTv2, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``: no weight decay on norms, biases, rel-pos tables and the class token
    (``model.no_weight_decay()``); with ``layer_decay`` the learning rate shrinks by that factor per block."""
    group_fn: Optional[Callable] = None
    if recipe.layer_decay is not None:
        def group_fn(m):  # noqa: E306 - timm calls it with the model
            return param_groups_layer_decay(
                _LayerView(m), weight_decay=recipe.weight_decay, no_weight_decay_list=m.no_weight_decay(),
                layer_decay=recipe.layer_decay,
            )
    # The fused AdamW kernel (CPU and CUDA) is ~6x faster than the per-tensor loop on a CPU (MViTv2-T: 0.24 s
    # against 1.4 s per step on 2 vCPUs).
    extra = {"fused": True} if recipe.opt.lower() in ("adamw", "adam") else {}
    return create_optimizer_v2(
        model, opt=recipe.opt, lr=lr, weight_decay=recipe.weight_decay, filter_bias_and_bn=True,
        param_group_fn=group_fn, **extra,
    )


def build_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    """timm's ``CosineLRScheduler`` per optimiser step: linear warm-up, then cosine to ``min_lr``."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(total - 1, round(recipe.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=recipe.min_lr, warmup_t=warmup,
        warmup_lr_init=recipe.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )


# --------------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
