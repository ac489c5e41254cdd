"""Cascade Mask R-CNN, MViTv2-S, ImageNet-1k init, 36 epochs (detectron2 reports 53.2 box AP, 46.0 mask
AP, 87M parameters)."""
from .mvitv2_t_cascade import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "small"
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_S_in1k.pyth"
