"""Everything a run builds from a config of either kind: model, optimizer, scheduler, data loaders, evaluator,
and the check that the heads predict as many classes as the dataset has."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from detectron2.config import CfgNode, instantiate
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.modeling import build_model as build_yacs_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from detectron2.solver import build_lr_scheduler as build_yacs_scheduler
from detectron2.utils.registry import locate

from .config import build_augmentation, build_yacs_optimizer
from .run_config import AnyConfig, _set, is_lazy, run_settings

__all__ = [
    "build_evaluator",
    "build_lr_scheduler",
    "build_model",
    "build_optimizer",
    "build_test_loader",
    "build_train_loader",
    "check_num_classes",
    "convert_sync_batchnorm",
    "has_fast_coco_eval",
    "head_num_classes",
]

logger = logging.getLogger("mvit_det.engine")


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` with an equivalent ``nn.BatchNorm2d`` (same parameters and buffers).

    ``nn.SyncBatchNorm`` rejects CPU tensors in distributed training and gains nothing in one process, so it is
    swapped out unless training runs on several GPUs. detectron2's ``NaiveSyncBatchNorm`` already falls back to
    plain BN in a single process and works with gloo, so it is left alone.
    """
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def build_model(cfg: AnyConfig) -> nn.Module:
    """Build the detector on the config's device (no weights loaded); CPU when CUDA is missing.

    SyncBN becomes BN unless training runs on several GPUs.
    """
    if run_settings(cfg).device.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: building the model on the CPU.")
        _set(cfg, "train.device", "MODEL.DEVICE", "cpu")
    if is_lazy(cfg):
        model = instantiate(cfg.model)
    else:


        model = build_yacs_model(cfg)  # already on cfg.MODEL.DEVICE
    device = run_settings(cfg).device
    if not (device.startswith("cuda") and comm.get_world_size() > 1):
        n = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        if n:
            logger.info("Replacing %d SyncBatchNorm layers with BatchNorm (not a multi-GPU run).", n)
            model = convert_sync_batchnorm(model)
    return model.to(device)


def build_optimizer(cfg: AnyConfig, model: nn.Module) -> torch.optim.Optimizer:
    """LazyConfig: ``instantiate(cfg.optimizer)``. yacs: ``build_yacs_optimizer`` (``SOLVER.OPTIMIZER``
    SGD or AdamW, no weight decay on norms and rel-pos tables, ``SOLVER.CLIP_GRADIENTS``)."""
    if is_lazy(cfg):
        cfg.optimizer.params.model = model
        return instantiate(cfg.optimizer)

    return build_yacs_optimizer(cfg, model)


def _yacs_mapper(cfg: CfgNode, is_train: bool):


    return DatasetMapper(cfg, is_train=is_train, augmentations=build_augmentation(cfg, is_train))


def build_train_loader(cfg: AnyConfig):
    if is_lazy(cfg):
        return instantiate(cfg.dataloader.train)

    return build_detection_train_loader(cfg, mapper=_yacs_mapper(cfg, is_train=True))


def build_lr_scheduler(cfg: AnyConfig, optimizer: torch.optim.Optimizer):
    """A ``ParamScheduler`` (LazyConfig ``lr_multiplier``) or a torch scheduler (yacs), for ``hooks.LRScheduler``."""
    if is_lazy(cfg):
        return instantiate(cfg.lr_multiplier)

    return build_yacs_scheduler(cfg, optimizer)


def has_fast_coco_eval() -> bool:
    """detectron2's C++ COCO evaluation needs the compiled ``detectron2._C`` (absent in pure-Python installs)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def build_evaluator(cfg: AnyConfig, dataset_name: str, output_dir: Optional[str] = None):
    """A ``COCOEvaluator`` for ``dataset_name`` (LazyConfig: ``cfg.dataloader.evaluator`` with that name)."""
    fast = has_fast_coco_eval()
    if is_lazy(cfg) and "evaluator" in cfg.dataloader:
        ev = cfg.dataloader.evaluator
        ev.dataset_name = dataset_name
        target = ev._target_
        if isinstance(target, str):
            target = locate(target)
        if isinstance(target, type) and issubclass(target, COCOEvaluator):
            ev.use_fast_impl = fast
            ev.output_dir = output_dir
        return instantiate(ev)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    if evaluator_type != "coco":
        raise NotImplementedError(
            f"Dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; this project evaluates COCO-style "
            "instance detection only. Register the data with register_coco_instances."
        )
    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=fast)


def build_test_loader(cfg: AnyConfig, dataset_name: str):
    if is_lazy(cfg):
        cfg.dataloader.test.dataset.names = dataset_name
        return instantiate(cfg.dataloader.test)

    return build_detection_test_loader(cfg, dataset_name, mapper=_yacs_mapper(cfg, is_train=False))


def head_num_classes(model: nn.Module) -> dict[str, int]:
    """Classes predicted by every box predictor (each cascade stage) and class-specific mask head of ``model``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FastRCNNOutputLayers):
            out[name] = int(m.num_classes)
        elif isinstance(m, BaseMaskRCNNHead) and isinstance(getattr(m, "predictor", None), nn.Conv2d):
            if m.predictor.out_channels > 1:  # 1 means class-agnostic masks
                out[name] = int(m.predictor.out_channels)
    return out


def check_num_classes(model: nn.Module, dataset_name: str) -> None:
    """Fail early, with the fix, when the heads and the dataset disagree on the number of classes.

    Call it after the dataset was loaded (``thing_classes`` is filled in by the loader). Without the check a
    custom dataset trained with COCO's 80 classes trains silently, and evaluation fails with a KeyError.
    """
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if not classes:
        return
    wrong = {name: n for name, n in head_num_classes(model).items() if n != len(classes)}
    if wrong:
        raise ValueError(
            f"Dataset {dataset_name!r} has {len(classes)} classes ({', '.join(map(str, classes[:8]))}"
            f"{', ...' if len(classes) > 8 else ''}) but these heads predict another number: {wrong}. Set "
            f"model.roi_heads.num_classes={len(classes)} in a LazyConfig (the mask head and every cascade box "
            f"predictor follow it) or MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} in a yacs config."
        )
