"""Detectron2 integration: the MViTv2 backbone, its registered yacs builders and config helpers.

Importing this package (or ``mvit_det.add_mvitv2_config``) registers ``build_mvitv2_backbone``,
``build_mvitv2_fpn_backbone`` and ``build_retinanet_mvitv2_fpn_backbone`` in detectron2's
``BACKBONE_REGISTRY``, so ``MODEL.BACKBONE.NAME: "build_mvitv2_fpn_backbone"`` resolves. It also registers the
built-in toy datasets ``mvit_toy_train`` and ``mvit_toy_val`` (``builtin_datasets``; generated on first use).
"""
from .backbone import (
    MViTv2Backbone,
    build_mvitv2_backbone,
    build_mvitv2_fpn_backbone,
    build_retinanet_mvitv2_fpn_backbone,
)
from . import builtin_datasets  # noqa: F401  (registers the built-in datasets, as detectron2 does)
from .checkpoint import MViTv2Checkpointer
from .builders import build_optimizer
from .config import NO_WEIGHT_DECAY_PARAMS, add_mvitv2_config, build_augmentation

__all__ = [
    "NO_WEIGHT_DECAY_PARAMS",
    "MViTv2Backbone",
    "MViTv2Checkpointer",
    "add_mvitv2_config",
    "build_augmentation",
    "build_mvitv2_backbone",
    "build_mvitv2_fpn_backbone",
    "build_optimizer",
    "build_retinanet_mvitv2_fpn_backbone",
]
