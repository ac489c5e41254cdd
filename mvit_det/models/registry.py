"""Named, published MViTv2 classifiers: ``list_models()`` and their cards (``mvit_det.hub.get_model`` builds them).

Each entry pairs a size from ``ARCHS`` with the few facts that belong to one released checkpoint
(where it widens, whether it has a class token, its classes and URL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..utils.hints import did_you_mean
from .mvitv2 import MViTv2

__all__ = ["ModelCard", "MODEL_CARDS", "get_card", "list_models"]

_MM_URL = "https://download.openmmlab.com/mmclassification/v0/mvit/"
_FB_URL = "https://dl.fbaipublicfiles.com/mvit/mvitv2_models/"


@dataclass(frozen=True)
class ModelCard:
    """A published checkpoint: its size, architecture overrides, classes and where to download it."""

    size: str  # a name of ARCHS: "tiny" ... "huge"
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
        return MViTv2(self.size, **kwargs)


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
