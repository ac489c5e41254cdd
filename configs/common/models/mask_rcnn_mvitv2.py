"""Mask R-CNN with an MViTv2 FPN backbone.

detectron2's common Mask R-CNN FPN config with the ResNet trunk replaced by ``MViTv2Backbone`` and RGB
ImageNet pixel statistics. Set ``model.backbone.bottom_up.size`` to pick T/S/B/L/H.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from mvit_det.detection import MViTv2Backbone

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model

# The ImageNet checkpoints were trained on RGB images normalised with these statistics.
_constants = model_zoo.get_config("common/data/constants.py").constants
model.pixel_mean = _constants.imagenet_rgb256_mean
model.pixel_std = _constants.imagenet_rgb256_std
model.input_format = "RGB"

model.backbone.bottom_up = L(MViTv2Backbone)(
    size="tiny",
    # None: the detectron2 recipe value for the size (mvit_det.detection.backbone.DET_DROP_PATH).
    drop_path_rate=None,
    act_checkpoint=False,
    out_features=("scale2", "scale3", "scale4", "scale5"),
)
model.backbone.in_features = "${.bottom_up.out_features}"
