"""ImageNet evaluation preprocessing of the published MViTv2 classifiers, and the constants it uses.

The released checkpoints were evaluated with the mmpretrain test pipeline of ``mvitv2-*_8xb256_in1k``:
``ResizeEdge(scale=256, edge='short', backend='pillow', interpolation='bicubic')`` ->
``CenterCrop(crop_size=224)`` -> per-channel RGB normalisation. ``EvalTransform`` reproduces it pixel for
pixel, including the two integer roundings that decide the output:

- resize: the short side becomes exactly 256 and the long side is ``int(256 * long / short)``
  (truncated, not rounded; mmpretrain ``ResizeEdge``), resampled with Pillow bicubic;
- crop offset: ``round((side - 224) / 2)`` with Python's round-half-to-even (mmcv ``CenterCrop``), so a
  257-pixel side is cut from offset 16, a 259-pixel side from offset 18.

Every other module takes the normalisation constants from here (detection uses the same RGB values).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.images import ImageSource, load_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_SIZE", "CROP_SIZE", "EvalTransform", "preprocess"]

#: Per-channel mean and std of ImageNet in 0..255 RGB units.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
#: Short side after resizing, and the side of the square centre crop fed to the network.
RESIZE_SIZE: int = 256
CROP_SIZE: int = 224


class EvalTransform:
    """Image -> normalised float32 tensor (3, crop_size, crop_size), the evaluation pipeline above.

    Accepts anything ``load_image`` accepts (path, PIL image, HxWx3 uint8 RGB array), so it can be the
    ``transform`` of a torchvision ``ImageFolder`` as well as be called on single images.

    Args:
        resize_size: the shorter side after resizing.
        crop_size: side of the centre crop; must not exceed ``resize_size``.
        mean, std: per-channel RGB normalisation in 0..255 units (default: ImageNet's).
    """

    #: longest side kept before resizing, in multiples of ``resize_size`` (see ``resize``)
    MAX_ASPECT = 8

    def __init__(self, resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE, mean=None, std=None):
        if crop_size > resize_size:
            raise ValueError(f"crop_size ({crop_size}) cannot exceed resize_size ({resize_size}).")
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.mean_rgb = tuple(float(m) for m in (mean or IMAGENET_MEAN))
        self.std_rgb = tuple(float(s) for s in (std or IMAGENET_STD))
        # (3, 1, 1) so that (3, H, W) - mean broadcasts per channel, as in mmpretrain's data preprocessor.
        self.mean = torch.tensor(self.mean_rgb, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.std_rgb, dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: Image.Image) -> Image.Image:
        """Short side to ``resize_size``, long side ``int(resize_size * long / short)``, bicubic.

        A very elongated image (long side past ``MAX_ASPECT`` x ``resize_size`` after resizing) keeps only its
        central band of that length first: the centre crop never sees the rest, and a 1 x 100000 strip would
        otherwise be resized to 256 x 25600000 pixels (work and memory bounded whatever the aspect ratio).
        """
        w, h = image.size
        if w < h:
            size = (self.resize_size, int(self.resize_size * h / w))
        else:
            size = (int(self.resize_size * w / h), self.resize_size)
        limit = self.MAX_ASPECT * self.resize_size
        if max(size) > limit:
            scale = self.resize_size / min(w, h)
            keep = max(1, round(limit / scale))  # source pixels along the long side
            if w < h:
                top = (h - keep) // 2
                image, size = image.crop((0, top, w, top + keep)), (self.resize_size, limit)
            else:
                left = (w - keep) // 2
                image, size = image.crop((left, 0, left + keep, h)), (limit, self.resize_size)
        return image.resize(size, Image.Resampling.BICUBIC)

    def center_crop(self, image: Image.Image) -> Image.Image:
        """Square ``crop_size`` crop; offsets rounded half-to-even as mmcv does."""
        w, h = image.size
        left = max(0, round((w - self.crop_size) / 2))
        top = max(0, round((h - self.crop_size) / 2))
        return image.crop((left, top, left + self.crop_size, top + self.crop_size))

    def crop_uint8(self, image: ImageSource) -> np.ndarray:
        """The resized and cropped image before normalisation: uint8 (crop_size, crop_size, 3) RGB."""
        return np.asarray(self.center_crop(self.resize(load_image(image))))

    def normalize(self, crop: np.ndarray) -> Tensor:
        """uint8 (H, W, 3) RGB -> float32 (3, H, W), ``(x - mean) / std``."""
        x = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).float()  # copy: PIL arrays are read-only
        return (x - self.mean) / self.std

    def __call__(self, image: ImageSource) -> Tensor:
        return self.normalize(self.crop_uint8(image))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resize_size={self.resize_size} (short side, bicubic), "
            f"crop_size={self.crop_size}, mean={self.mean_rgb}, std={self.std_rgb})"
        )


_DEFAULT = EvalTransform()


def preprocess(image: ImageSource) -> Tensor:
    """One image (path, PIL image or HxWx3 uint8 RGB array) -> float32 tensor (3, 224, 224)."""
    return _DEFAULT(image)
