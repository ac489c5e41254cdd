"""Large-scale jitter (LSJ) training data, used by the L and H configs (detectron2's MViTv2 project).

Train: horizontal flip, resize to a random scale 0.1-2.0 of 1024x1024, crop (and pad) to 1024x1024.
Test is unchanged (short side 800, long side <= 1333).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .coco_loader import dataloader

image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
]
# The crop cuts instances; recompute their boxes from the cropped masks.
dataloader.train.mapper.recompute_boxes = True
