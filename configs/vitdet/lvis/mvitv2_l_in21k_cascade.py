"""ViTDet recipe, LVIS v1: Cascade Mask R-CNN, MViTv2-L, ImageNet-21k init, LSJ, 50 epochs (detectron2's
projects/ViTDet/configs/LVIS/cascade_mask_rcnn_mvitv2_l_in21k_50ep.py; reported: 49.4 box AP, 44.2 mask AP).
Drop path 0.5; lr 4e-5."""
from .mvitv2_b_in21k_cascade import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "large"
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_L_in21k.pyth"

train.max_iter = train.max_iter // 2  # 100ep -> 50ep
lr_multiplier.scheduler.milestones = [m // 2 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
optimizer.lr = 4e-5
