"""Mask R-CNN, MViTv2-T, ImageNet-1k init, 36 epochs.

detectron2's projects/MViTv2 mask_rcnn_mvitv2_t_3x.py (reported there: 48.3 box AP, 43.8 mask AP, 44M
parameters).
"""
from .common.coco_loader import dataloader
from .common.models.mask_rcnn_mvitv2 import model
from .common.optim import optimizer
from .common.schedule import lr_multiplier, train

model.backbone.bottom_up.size = "tiny"
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth"
