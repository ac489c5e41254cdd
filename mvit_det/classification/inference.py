"""Classify one image with a named or a ready MViTv2 classifier: ``inference_model``."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..checkpoint.described import model_class_names
from ..data.images import ImageSource
from ..hub import get_model
from ..models import MViTv2
from .described import model_transform

__all__ = ["imagenet_classes", "inference_model"]

_NUM_IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in label order (shipped as ``imagenet_classes.txt``)."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != _NUM_IMAGENET_CLASSES:  # a packaging error, not a user error
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected {_NUM_IMAGENET_CLASSES}.")
    return names


def inference_model(
    model: Union[str, MViTv2],
    image: ImageSource,
    *,
    device: Optional[Union[str, torch.device]] = None,
    classes: Optional[Sequence[str]] = None,
    topk: int = 5,
) -> dict[str, Any]:
    """Classify a single image.

    Args:
        model: a name from ``list_models()`` (built with its published weights, downloaded on first use)
            or an ``MViTv2`` classifier with any number of classes. Pass a model object to classify many
            images: a name rebuilds and reloads the model on every call.
        image: a file path, a ``PIL.Image`` or an HxWx3 uint8 RGB numpy array. It goes through the
            published evaluation preprocessing (``transforms.EvalTransform``), or, for a model loaded from a
            self-describing checkpoint, through the preprocessing stored in it (its input size).
        device: where to run; the model is moved there. Default: the device the model is already on.
        classes: names for the model's labels, ``len(classes) == num_classes``. Without it a model loaded
            from a self-describing checkpoint (``tools/cls_train.py``) uses the checkpoint's names, a 1000-class
            model the ImageNet-1k names and any other model ``str(label)``.
        topk: how many best classes to list under ``"topk"`` (capped at the number of classes).

    Returns:
        ``{"pred_label": int, "pred_score": float, "pred_class": str,
        "pred_scores": float32 array (num_classes,) of softmax probabilities,
        "topk": [(label, score, class), ...] best first}``.
    """
    if isinstance(model, str):
        model = get_model(model, pretrained=True)
    elif not isinstance(model, MViTv2):
        raise TypeError(f"model must be a model name (see list_models()) or an MViTv2, got {type(model).__name__}.")
    if model.detection or model.num_classes == 0:
        raise ValueError(
            "This MViTv2 has no classifier (built with detection=True or num_classes=0); "
            "build it with get_model(name) or MViTv2(arch, num_classes=N)."
        )
    num_classes = model.num_classes
    names = _class_names(num_classes, classes if classes is not None else model_class_names(model))
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}.")

    if device is not None:
        model.to(device)
    param = next(model.parameters())
    batch = model_transform(model)(image).unsqueeze(0).to(param.device, param.dtype)  # also a .half() model

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(batch)
    finally:
        model.train(was_training)

    if not torch.isfinite(logits).all():
        # An image cannot hold NaN/Inf (it is uint8 until normalised), so the weights do: a diverged training run,
        # or float16 overflow. Raise instead of returning an arbitrary "best" class.
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        cause = (
            f"{len(bad)} weight tensors contain NaN/Inf (first: {', '.join(bad[:3])}); load a checkpoint saved before "
            "training diverged"
            if bad
            else f"the weights are finite, so the forward pass overflowed in {param.dtype}; run in float32 or bfloat16"
        )
        raise FloatingPointError(f"The model returned NaN/Inf scores for this image: {cause}.")
    scores = logits[0].float().softmax(dim=-1).cpu().numpy()
    order = np.argsort(-scores, kind="stable")[: min(topk, num_classes)]
    top = [(int(i), float(scores[i]), names(int(i))) for i in order]
    label, score, name = top[0]
    return {"pred_label": label, "pred_score": score, "pred_class": name, "pred_scores": scores, "topk": top}


def _class_names(num_classes: int, classes: Optional[Sequence[str]]):
    """label -> name lookup for a model with ``num_classes`` outputs."""
    if classes is not None:
        if isinstance(classes, str) or len(classes) != num_classes:
            got = "a single string" if isinstance(classes, str) else f"{len(classes)} names"
            raise ValueError(f"classes must list one name per model output ({num_classes}), got {got}.")
        listed = [str(c) for c in classes]
        return listed.__getitem__
    if num_classes == _NUM_IMAGENET_CLASSES:
        return imagenet_classes().__getitem__
    return str
