"""Input reading shared by classification, detection and evaluation.

The COCO helpers need detectron2, which a classification-only install lacks: they are imported on first use, so
that ``load_image`` (and ``mvit_det.inference_model``) work without it.
"""
from .images import ImageNotFoundError, ImageReadError, load_image

_COCO_NAMES = ("check_datasets_registered", "load_coco_instances", "register_coco_instances")

__all__ = ["ImageNotFoundError", "ImageReadError", "load_image", *_COCO_NAMES]


def __getattr__(name: str):
    if name in _COCO_NAMES:
        from . import coco

        return getattr(coco, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
