"""Cascade Mask R-CNN, MViTv2-H, ImageNet-21k init, large-scale jitter, 36 epochs, with activation
checkpointing (detectron2's cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x.py; reported: 56.1 box AP, 48.5
mask AP, 718M parameters)."""
from .common.coco_loader_lsj import dataloader
from .mvitv2_b_cascade import lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "huge"
model.backbone.bottom_up.act_checkpoint = True
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_H_in21k.pyth"
