"""ImageNet classification with MViTv2: preprocessing and single-image inference."""
from .inference import imagenet_classes, inference_model
from .transforms import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD, RESIZE_SIZE, EvalTransform, preprocess

__all__ = [
    "CROP_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_SIZE",
    "EvalTransform",
    "imagenet_classes",
    "inference_model",
    "preprocess",
]
