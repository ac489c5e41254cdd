"""Cascade Mask R-CNN, MViTv2-B, ImageNet-21k init, 36 epochs (detectron2 reports 54.9 box AP, 47.4 mask
AP). The in21k checkpoint's class token and classifier are not used by the detector."""
from .mvitv2_b_cascade import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"
