"""Self-describing classifier checkpoints: the architecture, class names, input size and evaluation preprocessing
travel in the checkpoint's ``meta``, so a trained ``model_final.pth`` is usable with no other flag.

``tools/cls_train.py`` writes (through ``save_checkpoint``)::

    {"model": state_dict, "meta": {"format": "mvit-det", "task": "classification",
        "model_name": "mvitv2-tiny_3rdparty_in1k",
        "model_kwargs": {"arch": "tiny", "num_classes": 10, "expand_attn": true, "cls_token": false,
                         "pretrain_img_size": 64},
        "class_names": ["0", ..., "9"],
        "input_size": 64,
        "preprocess": {"resize_size": 64, "crop_size": 64, "interpolation": "bicubic",
                       "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}}}

``get_model(pretrained=PATH)`` builds the model from ``model_kwargs`` and attaches ``class_names`` and
``data_config`` (the ``preprocess`` entry) to it; ``inference_model``, ``tools/classify.py`` and
``tools/cls_eval.py`` read them through ``mvit_det.classification.described`` (the preprocessing, which is the
classification task's) and ``model_class_names``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from .io import download, is_url, load_file

__all__ = [
    "attach_description",
    "describes_itself",
    "get_description",
    "model_class_names",
    "read_description",
]

_KWARGS = ("arch", "num_classes", "expand_attn", "cls_token", "pretrain_img_size")


def get_description(checkpoint: Any) -> Optional[dict[str, Any]]:
    """The description in a loaded checkpoint dict, or ``None`` when it has none (any other format)."""
    if not isinstance(checkpoint, Mapping):
        return None
    meta = checkpoint.get("meta")
    if isinstance(meta, Mapping) and meta.get("task") == "classification" and isinstance(meta.get("model_kwargs"), Mapping):
        return dict(meta)
    return None


def describes_itself(source) -> bool:
    """Whether the checkpoint file or URL ``source`` carries a description (False for any other format)."""
    return read_description(source) is not None


def attach_description(model, description: Mapping[str, Any]) -> None:
    """Give ``model`` the checkpoint's class names and evaluation preprocessing (``class_names``, ``data_config``)."""
    names = list(description.get("class_names") or [])
    model.class_names = names if len(names) == getattr(model, "num_classes", len(names)) else None
    model.data_config = dict(description.get("preprocess") or {})


def model_class_names(model) -> Optional[list[str]]:
    """Class names a self-described model carries, else ``None``."""
    return getattr(model, "class_names", None)


def read_description(source) -> Optional[dict[str, Any]]:
    """The description of a checkpoint file or URL, or ``None`` (any other format, or not a file)."""
    if not is_url(str(source)) and not os.path.isfile(source):
        return None
    return get_description(load_file(download(str(source)) if is_url(str(source)) else source))


