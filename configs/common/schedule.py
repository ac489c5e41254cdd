"""Training length, LR schedule and trainer settings of the MViTv2 recipe.

36 epochs of COCO at batch 64 = 67,500 iterations, LR x0.1 at 52,500 and 62,500, 250 warmup iterations
from 0.001x. The schedule is expressed in fractions of ``train.max_iter``, so changing ``train.max_iter``
stretches it proportionally.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def warmup_multistep(max_iter: int, milestones: list[int], warmup_iters: int = 250):
    """LR multiplier: linear warmup from 0.001x over ``warmup_iters``, then x1, x0.1, x0.01."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01], milestones=milestones, num_updates=max_iter
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_factor=0.001,
    )


train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True  # fp16 autocast + GradScaler; a CPU run must set train.amp.enabled=False
train.ddp.fp16_compression = True
train.max_iter = 67500
lr_multiplier = warmup_multistep(train.max_iter, [52500, 62500])
