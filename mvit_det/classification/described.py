"""The classification side of self-describing checkpoints (format: ``mvit_det.checkpoint.described``): the
``meta`` that ``tools/cls_train.py`` writes, and the evaluation transform and dataset that a description implies."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

from ..checkpoint.described import _KWARGS
from .datasets import LAYOUTS, DatasetError, build_eval_dataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = ["describe_classifier", "described_eval_dataset", "model_transform"]


def describe_classifier(
    model_name: Optional[str],
    model_kwargs: Mapping[str, Any],
    class_names: Sequence[str],
    resize_size: int,
    crop_size: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``meta`` of a self-describing classifier checkpoint (plain JSON-like values only)."""
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


def model_transform(model):
    """The evaluation transform of ``model``: its checkpoint's preprocessing, else the published ImageNet one."""
    cfg = getattr(model, "data_config", None)
    if not cfg:
        return EvalTransform()
    return EvalTransform(
        resize_size=int(cfg["resize_size"]),
        crop_size=int(cfg["crop_size"]),
        mean=tuple(cfg.get("mean", ())) or None,
        std=tuple(cfg.get("std", ())) or None,
    )


def described_eval_dataset(description: Mapping[str, Any], root, labels=None):
    """An ``EvalDataset`` of ``root`` with the checkpoint's preprocessing; ImageFolder labels follow the
    checkpoint's class names (so a validation folder may lack some classes), label files are taken as they are."""
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
