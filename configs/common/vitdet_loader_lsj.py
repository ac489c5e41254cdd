"""Large-scale jitter data of detectron2's projects/ViTDet (configs/common/coco_loader_lsj.py there).

detectron2's common COCO loader with: train flip, resize to a random scale 0.1-2.0 of 1024x1024, crop to at
most 1024x1024 without padding (the backbone pads to a 1024 square, ``model.backbone.square_pad``), boxes
recomputed from the cropped masks, RGB, batch 64. Test: the longer side resized to 1024 (short side 1024,
long side <= 1024), then padded to 1024x1024 by the backbone.

(The MViTv2 project's LSJ loader, ``coco_loader_lsj.py``, keeps the 800/1333 test resize and pads the crop.)
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 64
dataloader.train.mapper.recompute_boxes = True  # the crop cuts instances
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
