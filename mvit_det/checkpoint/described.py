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
``tools/cls_eval.py`` read them through ``model_transform`` and ``model_class_names``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Sequence

__all__ = [
    "attach_description",
    "describe_classifier",
    "described_eval_dataset",
    "describes_itself",
    "get_description",
    "model_class_names",
    "model_transform",
    "read_description",
]

_KWARGS = ("arch", "num_classes", "expand_attn", "cls_token", "pretrain_img_size")


def describe_classifier(
    model_name: Optional[str],
    model_kwargs: Mapping[str, Any],
    class_names: Sequence[str],
    resize_size: int,
    crop_size: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``meta`` of a self-describing classifier checkpoint (plain JSON-like values only)."""
    from ..classification.transforms import IMAGENET_MEAN, IMAGENET_STD

    kwargs = {k: model_kwargs[k] for k in _KWARGS if k in model_kwargs}
    if len(class_names) != kwargs.get("num_classes"):
        raise ValueError(f"{len(class_names)} class names for a model with {kwargs.get('num_classes')} classes.")
    return {
        "task": "classification",
        "model_name": model_name,
        "model_kwargs": kwargs,
        "class_names": [str(c) for c in class_names],
        "input_size": int(crop_size),
        "preprocess": {
            "resize_size": int(resize_size),
            "crop_size": int(crop_size),
            "interpolation": "bicubic",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        **extra,
    }


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


def model_transform(model):
    """The evaluation transform of ``model``: its checkpoint's preprocessing, else the published ImageNet one."""
    from ..classification.transforms import EvalTransform

    cfg = getattr(model, "data_config", None)
    if not cfg:
        return EvalTransform()
    return EvalTransform(
        resize_size=int(cfg["resize_size"]),
        crop_size=int(cfg["crop_size"]),
        mean=tuple(cfg.get("mean", ())) or None,
        std=tuple(cfg.get("std", ())) or None,
    )


def read_description(source) -> Optional[dict[str, Any]]:
    """The description of a checkpoint file or URL, or ``None`` (any other format, or not a file)."""
    from .io import download, is_url, load_file

    if not is_url(str(source)) and not os.path.isfile(source):
        return None
    return get_description(load_file(download(str(source)) if is_url(str(source)) else source))


def described_eval_dataset(description: Mapping[str, Any], root, labels=None):
    """An ``EvalDataset`` of ``root`` with the checkpoint's preprocessing; ImageFolder labels follow the
    checkpoint's class names (so a validation folder may lack some classes), label files are taken as they are."""
    from ..classification.evaluate import LAYOUTS, DatasetError, build_eval_dataset
    from ..classification.transforms import EvalTransform

    pre = description["preprocess"]
    transform = EvalTransform(int(pre["resize_size"]), int(pre["crop_size"]), pre.get("mean"), pre.get("std"))
    names = list(description["class_names"])
    ds = build_eval_dataset(root, labels=labels, num_classes=len(names), transform=transform) if (
        labels is not None
    ) else build_eval_dataset(root, transform=transform)
    if ds.layout == "imagefolder":
        unknown = [c for c in ds.classes if c not in names]
        if unknown:
            raise DatasetError(
                f"Class folder(s) {', '.join(repr(u) for u in unknown[:10])} in {root} are not among the checkpoint's "
                f"{len(names)} classes ({', '.join(names[:10])}{' ...' if len(names) > 10 else ''}).\n{LAYOUTS}"
            )
        index = {n: i for i, n in enumerate(names)}
        ds.samples = [(p, index[ds.classes[label]]) for p, label in ds.samples]
        ds.classes = names
    elif max(label for _, label in ds.samples) >= len(names):
        raise DatasetError(f"Labels in {ds.label_file} exceed the checkpoint's {len(names)} classes.")
    return ds
