"""AdamW as in detectron2's MViTv2 configs: lr 1.6e-4, betas (0.9, 0.999), weight decay 0.1, except
norm layers and the rel-pos tables (no decay). Biases are decayed."""
from detectron2 import model_zoo

from mvit_det.detection import NO_WEIGHT_DECAY_PARAMS

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {name: {"weight_decay": 0.0} for name in NO_WEIGHT_DECAY_PARAMS}
optimizer.lr = 1.6e-4
