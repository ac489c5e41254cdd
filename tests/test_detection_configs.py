"""LazyConfig and yacs detection configs: model-zoo parameter counts, the recipe, yacs/LazyConfig agreement."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_model

from mvit_det.detection import MViTv2Backbone, add_mvitv2_config, build_augmentation, build_optimizer
from mvit_det.detection.backbone import det_drop_path
from mvit_det.models import get_arch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# detectron2 projects/MViTv2 README (#params, 80 COCO classes) and the recipe of its configs.
MODEL_ZOO = {
    "mvitv2_t_maskrcnn": dict(params=43.7e6, size="tiny", drop_path=0.2, ckpt="MViTv2_T_in1k.pyth"),
    "mvitv2_t_cascade": dict(params=75.8e6, size="tiny", drop_path=0.2, ckpt="MViTv2_T_in1k.pyth"),
    "mvitv2_s_cascade": dict(params=86.5e6, size="small", drop_path=0.2, ckpt="MViTv2_S_in1k.pyth"),
    "mvitv2_b_cascade": dict(params=103.1e6, size="base", drop_path=0.4, ckpt="MViTv2_B_in1k.pyth"),
}
OTHERS = {
    "mvitv2_b_in21k_cascade": dict(size="base", drop_path=0.4, ckpt="MViTv2_B_in21k.pyth", lsj=False, lr=1.6e-4),
    "mvitv2_l_cascade_lsj": dict(size="large", drop_path=0.5, ckpt="MViTv2_L_in21k.pyth", lsj=True, lr=1e-4),
    "mvitv2_h_cascade_lsj": dict(size="huge", drop_path=0.6, ckpt="MViTv2_H_in21k.pyth", lsj=True, lr=1.6e-4),
}
YACS = {"mvitv2_t_maskrcnn": "mvitv2_t_maskrcnn", "mvitv2_t_cascade": "mvitv2_t_cascade",
        "mvitv2_s_cascade": "mvitv2_s_cascade", "mvitv2_b_cascade": "mvitv2_b_cascade"}


def load(name: str):
    return LazyConfig.load(str(CONFIGS / f"{name}.py"))


def load_yacs(name: str):
    cfg = get_cfg()
    add_mvitv2_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "yacs" / f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def t_models() -> dict[str, nn.Module]:
    """LazyConfig and yacs builds of T Mask R-CNN and T Cascade, shared by the tests below."""
    out = {}
    for name in ("mvitv2_t_maskrcnn", "mvitv2_t_cascade"):
        out[name] = instantiate(load(name).model)
        out[f"yacs:{name}"] = build_model(load_yacs(name))
    return out


@pytest.mark.parametrize("name", list(MODEL_ZOO))
def test_parameter_counts_match_model_zoo(name, t_models):
    cfg = load(name)
    model = t_models.get(name) or instantiate(cfg.model)
    assert abs(n_params(model) - MODEL_ZOO[name]["params"]) <= 0.05e6, n_params(model)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, MViTv2Backbone) and bottom_up.arch == get_arch(MODEL_ZOO[name]["size"])
    assert bottom_up.blocks[-1].drop_path.drop_prob == pytest.approx(MODEL_ZOO[name]["drop_path"])
    assert cfg.train.init_checkpoint == "detectron2://ImageNetPretrained/mvitv2/" + MODEL_ZOO[name]["ckpt"]


@pytest.mark.parametrize("name", ["mvitv2_t_maskrcnn", "mvitv2_t_cascade"])
def test_yacs_model_equals_lazyconfig_model(name, t_models):
    lazy, yacs = t_models[name], t_models[f"yacs:{name}"]
    assert {k: v.shape for k, v in yacs.state_dict().items()} == {k: v.shape for k, v in lazy.state_dict().items()}
    assert n_params(yacs) == n_params(lazy)
    # Same module types everywhere (e.g. the same norm layers in the cascade heads).
    assert [type(m) for m in yacs.modules()] == [type(m) for m in lazy.modules()]


@pytest.mark.parametrize("name", list(OTHERS))
def test_large_config_recipes(name):
    """B-in21k, L and H are not built here (L/H take minutes on CPU); their settings are checked."""
    cfg, spec = load(name), OTHERS[name]
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up.size == spec["size"] and bottom_up.drop_path_rate is None
    assert det_drop_path(bottom_up.size) == spec["drop_path"]
    assert bottom_up.act_checkpoint == (spec["size"] == "huge")
    assert cfg.train.init_checkpoint == "detectron2://ImageNetPretrained/mvitv2/" + spec["ckpt"]
    assert cfg.optimizer.lr == spec["lr"]
    assert cfg.model.roi_heads._target_.__name__ == "CascadeROIHeads"
    augs = [type(a).__name__ for a in instantiate(cfg.dataloader.train.mapper.augmentations)]
    if spec["lsj"]:
        assert augs == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]
        assert cfg.dataloader.train.mapper.recompute_boxes is True
    else:
        assert augs == ["RandomApply", "ResizeShortestEdge", "RandomFlip"]
    assert cfg.dataloader.train.total_batch_size == 64


@pytest.mark.parametrize("name", list(MODEL_ZOO) + list(OTHERS))
def test_config_files_are_complete_and_serialisable(name, tmp_path):
    """Each file defines the five objects lazyconfig trainers read, and dumps to YAML without loss
    (no lambdas or local objects; detectron2 falls back to a .pkl and logs an error otherwise)."""
    cfg = load(name)
    assert set(cfg) == {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
    LazyConfig.save(cfg, str(tmp_path / "a.yaml"))
    assert not (tmp_path / "a.yaml.pkl").exists()
    LazyConfig.save(LazyConfig.load(str(tmp_path / "a.yaml")), str(tmp_path / "b.yaml"))
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()
    assert "_target_: mvit_det.detection.MViTv2Backbone" in (tmp_path / "a.yaml").read_text()


def multiplier(cfg, it: int) -> float:
    return instantiate(cfg.lr_multiplier)(it / cfg.train.max_iter)


def test_schedules():
    cfg = load("mvitv2_t_cascade")  # 36 epochs
    assert cfg.train.max_iter == 67500 and cfg.train.amp.enabled and cfg.train.ddp.fp16_compression
    assert multiplier(cfg, 0) == pytest.approx(0.001)
    assert multiplier(cfg, 125) == pytest.approx(0.001 + (1 - 0.001) * 0.5)  # linear warmup over 250 iters
    assert [multiplier(cfg, i) for i in (250, 52499, 52501, 62499, 62501, 67499)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = load("mvitv2_l_cascade_lsj")  # 50 epochs
    assert cfg.train.max_iter == 92187
    assert [multiplier(cfg, i) for i in (250, 81943, 81945, 88772, 88774)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert load("mvitv2_h_cascade_lsj").train.max_iter == 67500


def param_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_optimizer_lazy_and_yacs_agree(t_models):
    cfg = load("mvitv2_t_maskrcnn")
    model = t_models["mvitv2_t_maskrcnn"]
    cfg.optimizer.params.model = model
    lazy_opt = instantiate(cfg.optimizer)
    assert isinstance(lazy_opt, torch.optim.AdamW)
    assert lazy_opt.defaults["betas"] == (0.9, 0.999) and lazy_opt.defaults["lr"] == 1.6e-4
    groups = param_groups(lazy_opt, model)
    assert groups["backbone.bottom_up.blocks.3.attn.rel_pos_h"] == (1.6e-4, 0.0)
    assert groups["backbone.bottom_up.blocks.3.norm1.weight"] == (1.6e-4, 0.0)
    assert groups["backbone.bottom_up.scale4_norm.bias"] == (1.6e-4, 0.0)
    assert groups["backbone.bottom_up.blocks.3.attn.qkv.weight"] == (1.6e-4, 0.1)
    assert groups["backbone.bottom_up.blocks.3.attn.qkv.bias"] == (1.6e-4, 0.1)  # biases are decayed
    assert groups["roi_heads.box_head.fc1.weight"] == (1.6e-4, 0.1)

    yacs_cfg = load_yacs("mvitv2_t_maskrcnn")
    yacs_model = t_models["yacs:mvitv2_t_maskrcnn"]
    yacs_opt = build_optimizer(yacs_cfg, yacs_model)
    assert isinstance(yacs_opt, torch.optim.AdamW) and yacs_opt.defaults["betas"] == (0.9, 0.999)
    assert param_groups(yacs_opt, yacs_model) == groups

    yacs_cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match=r"^cfg\.SOLVER\.OPTIMIZER = 'Adam' is not supported; use 'SGD' or 'AdamW'\.$"):
        build_optimizer(yacs_cfg, yacs_model)


def describe(aug) -> tuple:
    """Comparable description of a (possibly nested) augmentation."""
    if isinstance(aug, T.RandomApply):
        return ("RandomApply", aug.prob, describe(aug.aug))
    if isinstance(aug, T.AugmentationList):
        return ("AugmentationList", tuple(describe(a) for a in aug.augs))
    if isinstance(aug, T.ResizeShortestEdge):
        sizes = tuple(aug.short_edge_length)
        # A single size is sampled the same way whatever sample_style says.
        style = aug.sample_style if len(set(sizes)) > 1 else "fixed"
        return ("ResizeShortestEdge", sizes, aug.max_size, style)
    if isinstance(aug, T.RandomCrop):
        return ("RandomCrop", aug.crop_type, tuple(aug.crop_size))
    if isinstance(aug, T.RandomFlip):
        return ("RandomFlip", aug.horizontal, aug.vertical, aug.prob)
    raise TypeError(type(aug))


@pytest.mark.parametrize("name", list(YACS))
def test_yacs_recipe_equals_lazyconfig(name):
    lazy, cfg = load(name), load_yacs(YACS[name])
    assert cfg.MODEL.MVIT.SIZE == lazy.model.backbone.bottom_up.size
    assert cfg.MODEL.MVIT.DROP_PATH_RATE is None and lazy.model.backbone.bottom_up.drop_path_rate is None
    assert cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint
    assert cfg.MODEL.PIXEL_MEAN == list(lazy.model.pixel_mean) == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == list(lazy.model.pixel_std) == [58.395, 57.12, 57.375]
    assert cfg.INPUT.FORMAT == lazy.model.input_format == lazy.dataloader.train.mapper.image_format == "RGB"

    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert cfg.SOLVER.BASE_LR == lazy.optimizer.lr
    assert cfg.SOLVER.WEIGHT_DECAY == lazy.optimizer.weight_decay
    assert tuple(cfg.SOLVER.BETAS) == tuple(lazy.optimizer.betas)
    assert cfg.SOLVER.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size == 64
    assert cfg.SOLVER.MAX_ITER == lazy.train.max_iter
    assert list(cfg.SOLVER.STEPS) == list(lazy.lr_multiplier.scheduler.milestones)
    assert cfg.SOLVER.WARMUP_ITERS == pytest.approx(lazy.lr_multiplier.warmup_length * lazy.train.max_iter)
    assert cfg.SOLVER.WARMUP_FACTOR == lazy.lr_multiplier.warmup_factor
    assert cfg.SOLVER.AMP.ENABLED == lazy.train.amp.enabled

    train_augs = [describe(a) for a in build_augmentation(cfg, is_train=True)]
    assert train_augs == [describe(a) for a in instantiate(lazy.dataloader.train.mapper.augmentations)]
    assert train_augs[1] == ("ResizeShortestEdge", tuple(range(480, 801, 32)), 1333, "choice")
    test_augs = [describe(a) for a in build_augmentation(cfg, is_train=False)]
    assert test_augs == [describe(a) for a in instantiate(lazy.dataloader.test.mapper.augmentations)]
    assert test_augs == [("ResizeShortestEdge", (800, 800), 1333, "fixed")]


def test_toy_yacs_twin_equals_toy_lazyconfig():
    """The toy recipe is tuned in the .py file; its yacs twin must follow every tuned value."""
    lazy, cfg = load("toy/mvitv2_t_maskrcnn_toy"), load_yacs("mvitv2_t_maskrcnn_toy")
    roi, rpn = lazy.model.roi_heads, lazy.model.proposal_generator
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == roi.num_classes == 3
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == roi.batch_size_per_image
    assert cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION == roi.positive_fraction
    assert cfg.TEST.DETECTIONS_PER_IMAGE == roi.box_predictor.test_topk_per_image
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST) == tuple(rpn.pre_nms_topk)
    assert (cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == tuple(rpn.post_nms_topk)
    assert cfg.MODEL.MVIT.DROP_PATH_RATE == lazy.model.backbone.bottom_up.drop_path_rate
    heads = (rpn.head.in_channels, roi.box_head.input_shape.channels, roi.mask_head.input_shape.channels)
    assert cfg.MODEL.FPN.OUT_CHANNELS == lazy.model.backbone.out_channels == 128 and heads == (128, 128, 128)
    assert [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == [list(s) for s in rpn.anchor_generator.sizes]
    assert [list(s) for s in rpn.anchor_generator.sizes] == [[16], [32], [64], [128], [256]]
    # detectron2's yacs mask head has NUM_CONV convs of CONV_DIM plus a CONV_DIM deconv: conv_dims in LazyConfig terms.
    assert [cfg.MODEL.ROI_MASK_HEAD.CONV_DIM] * (cfg.MODEL.ROI_MASK_HEAD.NUM_CONV + 1) == list(roi.mask_head.conv_dims)
    assert list(roi.mask_head.conv_dims) == [64, 64]
    assert cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint == ""
    assert cfg.SOLVER.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size
    assert cfg.SOLVER.BASE_LR == lazy.optimizer.lr
    assert cfg.SOLVER.MAX_ITER == lazy.train.max_iter
    assert list(cfg.SOLVER.STEPS) == list(lazy.lr_multiplier.scheduler.milestones)
    assert cfg.SOLVER.WARMUP_ITERS == pytest.approx(lazy.lr_multiplier.warmup_length * lazy.train.max_iter)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == lazy.train.checkpointer.period
    for is_train, mapper in ((True, lazy.dataloader.train.mapper), (False, lazy.dataloader.test.mapper)):
        yacs_augs = [describe(a) for a in build_augmentation(cfg, is_train=is_train)]
        assert yacs_augs == [describe(a) for a in instantiate(mapper.augmentations)]


def test_toy_shapes_pool_from_the_fpn_level_of_their_relative_size():
    """At the toy inputs every shape is under 112 px: with COCO's canonical_box_size (224) all pool from P2."""
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    roi = load("toy/mvitv2_t_maskrcnn_toy").model.roi_heads
    assert roi.box_pooler.canonical_box_size == roi.mask_pooler.canonical_box_size == 56
    sides = torch.tensor([20.0, 40.0, 77.0])  # the smallest, a middle and the largest shape at short side 128
    boxes = [Boxes(torch.stack([torch.zeros(3), torch.zeros(3), sides, sides], dim=1))]
    levels = [
        (assign_boxes_to_levels(boxes, 2, 5, canonical, 4) + 2).tolist()
        for canonical in (roi.box_pooler.canonical_box_size, 224)
    ]
    assert levels == [[2, 3, 4], [2, 2, 2]]


def test_build_augmentation_default_is_detectron2s():
    cfg = get_cfg()
    add_mvitv2_config(cfg)
    cfg.INPUT.CROP.ENABLED = True
    augs = [describe(a) for a in build_augmentation(cfg, is_train=True)]
    assert augs[0] == ("RandomCrop", "relative_range", (0.9, 0.9))  # what detectron2's mapper inserts
    cfg.INPUT.CROP.PROB = 0.0
    with pytest.raises(ValueError, match=r"cfg\.INPUT\.CROP\.PROB must be in \(0, 1\], got 0\.0\."):
        build_augmentation(cfg, is_train=True)


def test_cascade_heads_and_norm_switch(tmp_path):
    cfg = load("mvitv2_t_cascade")
    heads = cfg.model.roi_heads
    assert [h.conv_dims for h in heads.box_heads] == [[256] * 4] * 3 and [h.fc_dims for h in heads.box_heads] == [[1024]] * 3
    assert [p.cls_agnostic_bbox_reg for p in heads.box_predictors] == [True] * 3
    assert [m.thresholds for m in heads.proposal_matchers] == [[0.5], [0.6], [0.7]]
    assert cfg.model.proposal_generator.head.conv_dims == [-1, -1]
    mask_head = instantiate(heads.mask_head)
    norms = [m for m in mask_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and all(isinstance(m, NaiveSyncBatchNorm) and m._stats_mode == "N" for m in norms)

    # The documented switch for single-device / CPU runs, used from a derived config.
    shutil.copytree(CONFIGS, tmp_path / "configs")
    derived = tmp_path / "configs" / "cpu_cascade.py"
    derived.write_text(
        "from .mvitv2_t_cascade import dataloader, lr_multiplier, model, optimizer, train\n"
        "from .common.models.cascade_mask_rcnn_mvitv2 import set_head_norm\n"
        "set_head_norm(model, 'BN')\n"
    )
    cfg = LazyConfig.load(str(derived))
    assert [h.conv_norm for h in cfg.model.roi_heads.box_heads] == ["BN"] * 3
    for head in [cfg.model.roi_heads.mask_head, cfg.model.roi_heads.box_heads[2]]:
        norms = [m for m in instantiate(head).modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == 4 and not any(isinstance(m, NaiveSyncBatchNorm) for m in norms)
