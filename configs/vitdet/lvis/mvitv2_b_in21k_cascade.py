"""ViTDet recipe, LVIS v1: Cascade Mask R-CNN, MViTv2-B, ImageNet-21k init, LSJ, 100 epochs.

detectron2's projects/ViTDet/configs/LVIS/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py (reported: 46.3 box AP,
42.0 mask AP). The COCO config with: 1203 classes; sigmoid cross-entropy with the federated loss (class
weights: LVIS image counts to the power 0.5, read from detectron2's built-in LVIS metadata, so no annotation
file is needed to build the model); test score threshold 0.02 and 300 detections per image; repeat-factor
sampling (threshold 0.001); LVISEvaluator with 300 detections; lr 1e-4.
"""
from detectron2.config import LazyCall as L
from detectron2.data.detection_utils import get_fed_loss_cls_weights
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.evaluation.lvis_evaluation import LVISEvaluator

from ..coco.mvitv2_b_in21k_cascade import dataloader, lr_multiplier, model, optimizer, train

dataloader.train.dataset.names = "lvis_v1_train"
dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.001
    )
)
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator = L(LVISEvaluator)(dataset_name="${..test.dataset.names}", max_dets_per_image=300)

model.roi_heads.num_classes = 1203
for _predictor in model.roi_heads.box_predictors:
    _predictor.test_score_thresh = 0.02
    _predictor.test_topk_per_image = 300
    _predictor.use_sigmoid_ce = True
    _predictor.use_fed_loss = True
    _predictor.get_fed_loss_cls_weights = lambda: get_fed_loss_cls_weights(dataloader.train.dataset.names, 0.5)

# 100 ep = 156250 iters * 64 images/iter / 100000 images/ep
train.max_iter = 156250
train.eval_period = 30000
lr_multiplier.scheduler.milestones = [138889, 150463]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
optimizer.lr = 1e-4
