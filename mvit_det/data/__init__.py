"""Input reading shared by classification, detection and evaluation."""
from .coco import check_datasets_registered, load_coco_instances, register_coco_instances
from .images import ImageNotFoundError, ImageReadError, load_image

__all__ = [
    "ImageNotFoundError",
    "ImageReadError",
    "check_datasets_registered",
    "load_coco_instances",
    "load_image",
    "register_coco_instances",
]
