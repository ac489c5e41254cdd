"""Cascade Mask R-CNN with an MViTv2 FPN backbone, as in detectron2's projects/MViTv2.

detectron2's common 3-stage cascade heads (IoU 0.5/0.6/0.7, class-agnostic boxes), with each stage's
box head made of 4 convs + 1 fc, normalised heads and a 2-conv RPN head.

Head normalisation: ``HEAD_NORM`` is NaiveSyncBatchNorm with per-sample statistics weighting
("naiveSyncBN_N"), which syncs across GPUs and accepts empty batches; on one device (or CPU) it
behaves like plain BatchNorm. To change it in a derived config (e.g. "BN", "LN", "SyncBN")::

    from .common.models.cascade_mask_rcnn_mvitv2 import model, set_head_norm
    set_head_norm(model, "BN")
"""
from detectron2 import model_zoo

from .mask_rcnn_mvitv2 import model

HEAD_NORM = "naiveSyncBN_N"


def set_head_norm(model, norm: str) -> None:
    """Use ``norm`` (any ``detectron2.layers.get_norm`` name) in every conv of the box and mask heads."""
    for box_head in model.roi_heads.box_heads:
        box_head.conv_norm = norm
    model.roi_heads.mask_head.conv_norm = norm


model.roi_heads = model_zoo.get_config("common/models/cascade_rcnn.py").model.roi_heads
for _box_head in model.roi_heads.box_heads:
    _box_head.conv_dims = [256, 256, 256, 256]
    _box_head.fc_dims = [1024]
set_head_norm(model, HEAD_NORM)

# Two 3x3 convs in the RPN head instead of one.
model.proposal_generator.head.conv_dims = [-1, -1]
