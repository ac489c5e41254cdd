"""Cascade Mask R-CNN with an MViTv2 backbone and the ViTDet recipe (detectron2's projects/ViTDet,
configs/COCO/cascade_mask_rcnn_mvitv2_*_in21k_*.py).

The MViTv2 project's cascade model (``cascade_mask_rcnn_mvitv2.py``: 3 stages with IoU 0.5/0.6/0.7,
class-agnostic boxes, 4conv1fc box heads, 2 convs in the RPN head) with ViTDet's changes:

* LayerNorm ("LN") in the FPN and in every conv of the box and mask heads (instead of no FPN norm and
  synchronized BatchNorm in the heads);
* the FPN pads every input to a 1024x1024 square (``square_pad``), so all images share one feature size.

Set ``model.backbone.bottom_up.size`` to pick B/L/H.
"""
from .cascade_mask_rcnn_mvitv2 import model, set_head_norm

model.backbone.norm = "LN"
model.backbone.square_pad = 1024
set_head_norm(model, "LN")
