"""ViTDet recipe, LVIS v1: Cascade Mask R-CNN, MViTv2-H, ImageNet-21k init, LSJ, 50 epochs, activation
checkpointing (detectron2's projects/ViTDet/configs/LVIS/cascade_mask_rcnn_mvitv2_h_in21k_50ep.py; reported:
49.5 box AP, 44.1 mask AP). The L config's 50-epoch schedule with drop path 0.6 and lr 2e-5."""
from .mvitv2_l_in21k_cascade import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "huge"
model.backbone.bottom_up.act_checkpoint = True
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_H_in21k.pyth"
optimizer.lr = 2e-5
