"""Cascade Mask R-CNN, MViTv2-B, ImageNet-1k init, 36 epochs (detectron2 reports 54.1 box AP, 46.7 mask
AP, 103M parameters)."""
from .mvitv2_t_cascade import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "base"
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in1k.pyth"
