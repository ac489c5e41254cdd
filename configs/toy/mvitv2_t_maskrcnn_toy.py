"""Mask R-CNN MViTv2-T on the built-in toy shapes dataset, sized for a few minutes on a CPU.

Everything not listed here comes from ``configs/mvitv2_t_maskrcnn.py``. Overrides: the data (``mvit_toy_train`` /
``mvit_toy_val``, generated on first use by ``mvit_det.data.toy``), 3 classes, small inputs (short side 128-160, 144 at
test), batch 2, fewer proposals and RoI samples with half of them positive, no initial weights (nothing can be downloaded
offline, so the backbone starts from random initialisation), float32, a short schedule with a higher LR than the COCO
recipe, and only the newest periodic checkpoint kept on disk (each one is about 500 MB with the optimizer state).

Tuned on the CPU with ``tools/main_job.py`` (box AP after training, same seed): LR 2e-4 gives 4.8 at 300 iterations
(6e-4: 0.7, 1e-3: 0.3); half-positive RoI sampling with 32 RoIs per image 4.5; that plus 400 iterations on the
smaller inputs below 4.1 to 12.2 over six runs (CPU training is not bit-reproducible across thread timings),
in about the same time as 300 iterations on the larger ones. The untrained model scores 0.01.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from ..common.schedule import warmup_multistep
from ..mvitv2_t_maskrcnn import dataloader, model, optimizer, train

# -- data -------------------------------------------------------------------------------------------
dataloader.train.dataset.names = "mvit_toy_train"
dataloader.test.dataset.names = "mvit_toy_val"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128, 144, 160), sample_style="choice", max_size=384),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=144, max_size=320)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

# -- model ------------------------------------------------------------------------------------------
model.roi_heads.num_classes = 3
model.backbone.bottom_up.drop_path_rate = 0.0
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (500, 300)
# The random-init classifier learns late (few foreground RoIs at the default 25 %); more positives speed it up.
model.roi_heads.batch_size_per_image = 32
model.roi_heads.positive_fraction = 0.5
# At most 4 objects per image: 20 detections lose no recall and keep the mask head cheap on a CPU.
model.roi_heads.box_predictor.test_topk_per_image = 20

# -- schedule ---------------------------------------------------------------------------------------
train.init_checkpoint = ""
train.amp.enabled = False
train.ddp.fp16_compression = False
train.output_dir = "output/mvitv2_t_maskrcnn_toy"
train.max_iter = 400
train.checkpointer.period = 100
train.checkpointer.max_to_keep = 1
train.eval_period = 0  # evaluate once, at the end
train.log_period = 10
train.seed = 0
optimizer.lr = 2e-4
lr_multiplier = warmup_multistep(train.max_iter, [320, 370], warmup_iters=40)
