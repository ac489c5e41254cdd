"""Command-line wording of checkpoint errors for ``tools/cls_eval.py``, ``tools/classify.py`` and
``tools/cls_train.py``.

The loaders' messages name Python fixes (``num_classes=`` for ``get_model``, ``strict=False``); a command-line user
can only change a flag or a model config file, so the tools replace the fix with one they can act on.
"""
from __future__ import annotations

from typing import Optional

from ..checkpoint.formats import CheckpointInfo
from ..checkpoint.loading import CheckpointMismatchError
from ..models import MODEL_CARDS

__all__ = ["fitting_models", "mismatch_for_cli"]


def fitting_models(info: CheckpointInfo, same_classes: bool = False) -> list[str]:
    """Registry names whose architecture (size, widening, class token; with ``same_classes`` also the head) matches
    the checkpoint's."""
    return [
        name for name, card in MODEL_CARDS.items()
        if card.size == info.size
        and (info.expand_attn is None or card.expand_attn == info.expand_attn)
        and card.cls_token == info.cls_token
        and (not same_classes or card.num_classes == info.num_classes)
    ]  # fmt: skip


def _bool(value: bool) -> str:
    return "true" if value else "false"


def mismatch_for_cli(error: CheckpointMismatchError, *, model_flag: str, config: Optional[str] = None,
                     configs_accepted: bool = False) -> str:
    """``error`` with its fix in command-line terms.

    ``model_flag`` is how the tool takes the model (``--model`` or ``MODEL``); ``configs_accepted`` says whether a
    model config file (``arch:``, ``num_classes:``, ...) may stand in for it, and ``config`` names the one given.
    """
    ck, m = error.checkpoint_info, error.model_info
    # A tool that takes config files cannot change a named model's head, so only a name with the right head fits.
    names = fitting_models(ck, same_classes=configs_accepted)
    by_name = f"{model_flag} {names[0]}" if names else None
    where = f"in the model config {config}" if config else f"in a model config file given as {model_flag} (see --help)"
    classes = f", `num_classes: {ck.num_classes}`" if configs_accepted and ck.num_classes not in (None, 1000) else ""

    def key_or_name(key: str) -> str:
        options = ([by_name] if by_name else []) + ([f"`{key}`{classes} {where}"] if configs_accepted else [])
        return " or ".join(options) if options else f"a {model_flag} that fits the checkpoint"

    if ck.video:
        fix = "the checkpoint is a video MViT (5-D conv weights); only image MViTv2 checkpoints can be used."
    elif ck.depth and (ck.depth, ck.embed_dim) != (m.depth, m.embed_dim):
        if ck.size:
            fix = f"the checkpoint is {ck.size_label}, the model {m.size_label}: use {key_or_name(f'arch: {ck.size}')}."
        else:
            fix = f"the checkpoint is {ck.size_label}, which no model name or config of this tool builds."
    elif ck.expand_attn is not None and m.expand_attn is not None and ck.expand_attn != m.expand_attn:
        fix = (f"the checkpoint widens channels {'inside attention' if ck.expand_attn else 'inside the MLP'}: use "
               f"{key_or_name(f'expand_attn: {_bool(ck.expand_attn)}')}.")
    elif ck.cls_token != m.cls_token and not error.detection:
        fix = (f"the checkpoint {'has' if ck.cls_token else 'has no'} class token: use "
               f"{key_or_name(f'cls_token: {_bool(ck.cls_token)}')}.")
    elif not error.detection and (ck.detection or not ck.has_final_norm):
        fix = ("the checkpoint is a detection trunk without the classifier's norm and head, so it cannot classify. "
               "Use it as --pretrained of tools/cls_train.py (which trains a new head), or use a classifier "
               "checkpoint.")
    elif ck.num_classes is not None and ck.num_classes != m.num_classes:
        if configs_accepted:
            if config:
                kind = f"set `num_classes: {ck.num_classes}` in the model config {config}"
            else:
                kind = (f"give a model config file with `arch: {ck.size}` and `num_classes: {ck.num_classes}` as "
                        f"{model_flag} (see --help)")
            fix = f"the checkpoint has {ck.num_classes} classes, the model {m.num_classes}: {kind}."
        else:
            fix = f"the checkpoint has {ck.num_classes} classes, the model {m.num_classes}."
    else:
        fix = f"use the checkpoint made for this {model_flag}."
    return "\n".join([error.headline, f"Fix: {fix}", *error.details])
