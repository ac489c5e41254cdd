"""ViTDet recipe, COCO: Cascade Mask R-CNN, MViTv2-H, ImageNet-21k init, LSJ, 36 epochs, activation
checkpointing (detectron2's projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_h_in21k_36ep.py; reported:
55.9 box AP, 48.3 mask AP). Drop path 0.6; lr 1.6e-4."""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from .mvitv2_b_in21k_cascade import dataloader, model, optimizer, train

model.backbone.bottom_up.size = "huge"
model.backbone.bottom_up.act_checkpoint = True
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_H_in21k.pyth"

# 36 epochs
train.max_iter = 67500
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[52500, 62500, 67500]),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
optimizer.lr = 1.6e-4
