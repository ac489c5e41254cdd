"""ViTDet recipe, COCO: Cascade Mask R-CNN, MViTv2-B, ImageNet-21k init, large-scale jitter, 100 epochs.

detectron2's projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py (reported: 55.6 box AP,
48.1 mask AP). Model: ``common/models/cascade_mask_rcnn_mvitv2_vitdet.py`` (LN in FPN and heads, 2-conv RPN,
1024 square padding); drop path 0.4 (the B value of ``mvit_det.models.ARCHS``). AdamW lr 8e-5, weight decay
0.1 except norms and ``pos_embed`` (as in ViTDet; MViTv2 has no absolute position embedding, so its rel-pos
tables are decayed), amp.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from ...common.models.cascade_mask_rcnn_mvitv2_vitdet import model
from ...common.vitdet_loader_lsj import dataloader

model.backbone.bottom_up.size = "base"

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True  # a CPU run must set train.amp.enabled=False
train.ddp.fp16_compression = True
train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"

# 100 ep = 184375 iters * 64 images/iter / 118000 images/ep
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
optimizer.lr = 8e-5
