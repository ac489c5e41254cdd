"""Cascade Mask R-CNN, MViTv2-L, ImageNet-21k init, large-scale jitter, 50 epochs, lr 1e-4.

detectron2's cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep.py (reported: 55.8 box AP, 48.3 mask AP, 270M
parameters).
"""
from .common.coco_loader_lsj import dataloader
from .common.schedule import warmup_multistep
from .mvitv2_b_cascade import model, optimizer, train

model.backbone.bottom_up.size = "large"
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_L_in21k.pyth"

# 50 epochs = 92,187 iterations at batch 64 (118k images per epoch).
train.max_iter = 184375 // 2
lr_multiplier = warmup_multistep(train.max_iter, [163889 // 2, 177546 // 2])
optimizer.lr = 1e-4
