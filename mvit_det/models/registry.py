"""Named, published MViTv2 classifiers: ``list_models()`` and ``get_model(name, pretrained=...)``.

Each entry pairs a size from ``ARCHS`` with the few facts that belong to one released checkpoint
(where it widens, whether it has a class token, its classes and URL).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .mvitv2 import MViTv2
from ..utils.hints import did_you_mean

__all__ = ["ModelCard", "MODEL_CARDS", "get_card", "list_models", "get_model"]

_MM_URL = "https://download.openmmlab.com/mmclassification/v0/mvit/"
_FB_URL = "https://dl.fbaipublicfiles.com/mvit/mvitv2_models/"


@dataclass(frozen=True)
class ModelCard:
    """A published checkpoint: architecture overrides, classes and where to download it."""

    arch: str
    url: str
    num_classes: int = 1000
    expand_attn: bool = True
    cls_token: bool = False
    #: ImageNet-1k top-1 / top-5 reported by the source at 224x224 (None when not published)
    top1: Optional[float] = None
    top5: Optional[float] = None

    def build(self, **overrides) -> MViTv2:
        kwargs = dict(num_classes=self.num_classes, expand_attn=self.expand_attn, cls_token=self.cls_token)
        kwargs.update(overrides)
        return MViTv2(self.arch, **kwargs)


MODEL_CARDS: dict[str, ModelCard] = {
    "mvitv2-tiny_3rdparty_in1k": ModelCard(
        "tiny", _MM_URL + "mvitv2-tiny_3rdparty_in1k_20220722-db7beeef.pth", top1=82.33, top5=96.15
    ),
    "mvitv2-small_3rdparty_in1k": ModelCard(
        "small", _MM_URL + "mvitv2-small_3rdparty_in1k_20220722-986bd741.pth", top1=83.63, top5=96.51
    ),
    "mvitv2-base_3rdparty_in1k": ModelCard(
        "base", _MM_URL + "mvitv2-base_3rdparty_in1k_20220722-9c4f0a17.pth", top1=84.34, top5=96.86
    ),
    "mvitv2-large_3rdparty_in1k": ModelCard(
        "large",
        _MM_URL + "mvitv2-large_3rdparty_in1k_20220722-2b57b983.pth",
        expand_attn=False,  # the L in1k checkpoint widens in the MLP, unlike every other release
        top1=85.25,
        top5=97.14,
    ),
    # ImageNet-21k pre-training used to initialise the B/L/H detectors (official .pyth files).
    "mvitv2-base_in21k": ModelCard("base", _FB_URL + "MViTv2_B_in21k.pyth", num_classes=19168, cls_token=True),
    "mvitv2-large_in21k": ModelCard("large", _FB_URL + "MViTv2_L_in21k.pyth", num_classes=19168, cls_token=True),
    "mvitv2-huge_in21k": ModelCard("huge", _FB_URL + "MViTv2_H_in21k.pyth", num_classes=19168, cls_token=True),
}


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by ``get_model``, optionally filtered by a glob pattern."""
    from fnmatch import fnmatch

    return sorted(n for n in MODEL_CARDS if fnmatch(n, pattern))


def get_card(name: str) -> ModelCard:
    if name not in MODEL_CARDS:
        raise ValueError(f"Unknown model {name!r}.{did_you_mean(name, MODEL_CARDS)} Available: {', '.join(list_models())}.")
    return MODEL_CARDS[name]


def get_model(
    name: Optional[str] = None,
    pretrained: Union[bool, str, Path] = False,
    *,
    num_classes: Optional[int] = None,
    strict: bool = True,
    **overrides,
) -> MViTv2:
    """Build a named model, optionally with weights.

    Args:
        name: one of ``list_models()``. May be omitted when ``pretrained`` is a checkpoint that describes itself
            (written by ``tools/cls_train.py``).
        pretrained: ``True`` downloads the published checkpoint (cached in the torch hub folder);
            a path or URL loads that file, in any supported format (official, mmpretrain, timm,
            detectron2, mvit-det). A self-describing checkpoint also sets the architecture, the number of
            classes, ``model.class_names`` and ``model.data_config`` (the evaluation preprocessing).
        num_classes: a new classifier size; the head is then left freshly initialised and every other
            weight must load (fine-tuning).
        strict: refuse any missing, unexpected or mis-shaped key (default). Set False to allow a
            partial load; what was skipped is logged.
        overrides: passed to ``MViTv2`` (for example ``drop_path_rate``).

    Returns the model in eval mode.
    """
    description = None
    if pretrained and pretrained is not True:
        from ..checkpoint.described import get_description
        from ..checkpoint.io import download, is_url, load_file

        # Read (memory-mapped) for its description; load_checkpoint reads it again, for its error messages' path.
        description = get_description(load_file(download(str(pretrained)) if is_url(str(pretrained)) else pretrained))
    if name is None and description is None:
        raise ValueError(
            "get_model needs a model name (see list_models()) unless pretrained is a self-describing checkpoint "
            f"written by tools/cls_train.py; {pretrained!r} does not describe its model."
            if pretrained
            else "get_model needs a model name; see list_models()."
        )
    card = get_card(name) if name is not None else None
    if description is not None:
        kwargs = dict(description["model_kwargs"])
        if card is not None and card.arch != kwargs.get("arch"):
            raise ValueError(
                f"Checkpoint {pretrained} holds an MViTv2-{kwargs.get('arch')} classifier, but the model {name!r} is "
                f"MViTv2-{card.arch}. Omit the model name (the checkpoint describes its model) or give a "
                f"{kwargs.get('arch')} model."
            )
        ckpt_classes = kwargs["num_classes"]
        kwargs.update(overrides)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = MViTv2(**kwargs)
    else:
        ckpt_classes = card.num_classes
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        model = card.build(**overrides)
    if pretrained:
        from ..checkpoint import load_checkpoint

        new_head = num_classes is not None and num_classes != ckpt_classes
        load_checkpoint(model, card.url if pretrained is True else pretrained, strict=strict, skip_head=new_head)
        if description is not None:
            from ..checkpoint.described import attach_description

            attach_description(model, description)
    return model.eval()
