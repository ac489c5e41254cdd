"""yacs support: ``add_mvitv2_config`` and the two recipe pieces detectron2's yacs path lacks.

detectron2's yacs ``build_optimizer`` only makes SGD and its ``DatasetMapper`` can only crop every
image, so the MViTv2 recipe (AdamW; a 50% "resize to 400-600, then crop" branch before the multi-scale
resize) needs :func:`build_yacs_optimizer` and :func:`build_augmentation`. A ``train_net.py`` uses them as::

    class Trainer(DefaultTrainer):
        @classmethod
        def build_optimizer(cls, cfg, model):
            return mvit_det.detection.build_optimizer(cfg, model)

        @classmethod
        def build_train_loader(cls, cfg):
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_augmentation(cfg, is_train=True))
            return build_detection_train_loader(cfg, mapper=mapper)
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from detectron2.config import CfgNode as CN
from detectron2.data import detection_utils, transforms as T
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig

from ..models.mvitv2 import NO_WEIGHT_DECAY, WINDOW_SIZE
from ..utils.hints import did_you_mean

__all__ = [
    "NO_WEIGHT_DECAY_PARAMS",
    "add_mvitv2_config",
    "build_augmentation",
    "build_yacs_optimizer",
    "check_lazy_overrides",
    "unknown_yacs_key_message",
]

#: Parameters that detectron2's MViTv2 recipe keeps out of weight decay. Matched by attribute name, as
#: ``get_default_optimizer_params(overrides=...)`` does; norm layers are covered by ``WEIGHT_DECAY_NORM``.
NO_WEIGHT_DECAY_PARAMS = NO_WEIGHT_DECAY  # one source: the model module

_OPTIMIZERS = ("SGD", "ADAMW")


def add_mvitv2_config(cfg: CN) -> CN:
    """Add the MViTv2 keys to a detectron2 yacs config (in place; calling it twice is harmless).

    ``MODEL.MVIT``:
        SIZE: "tiny"/"T", "small"/"S", "base"/"B", "large"/"L", "huge"/"H"; depths, widths and heads come
            from ``mvit_det.models.ARCHS``.
        OUT_FEATURES: trunk outputs, a subset of scale2..scale5 (strides 4..32).
        DROP_PATH_RATE: stochastic depth; None takes the recipe value of the size (T/S 0.2, B 0.4, L 0.5,
            H 0.6, stored in ``backbone.DET_DROP_PATH``).
        ACT_CHECKPOINT: recompute blocks in the backward pass (``torch.utils.checkpoint``).
        PRETRAIN_IMG_SIZE: ImageNet resolution of the initial checkpoint (sizes the rel-pos tables).
        WINDOW_SIZE: stage 1's attention window in tokens (56, halved per stage); 0: global attention.
    ``SOLVER.OPTIMIZER`` ("SGD" or "AdamW") and ``SOLVER.BETAS``: read by :func:`build_yacs_optimizer`.
    ``INPUT.CROP.PROB`` and ``INPUT.CROP.PRE_RESIZE_SHORT_EDGE``: read by :func:`build_augmentation`.
    """
    if "MVIT" in cfg.MODEL:
        return cfg
    cfg.MODEL.MVIT = CN()
    cfg.MODEL.MVIT.SIZE = "tiny"
    cfg.MODEL.MVIT.OUT_FEATURES = ["scale2", "scale3", "scale4", "scale5"]
    cfg.MODEL.MVIT.DROP_PATH_RATE = None
    cfg.MODEL.MVIT.ACT_CHECKPOINT = False
    cfg.MODEL.MVIT.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.MVIT.WINDOW_SIZE = WINDOW_SIZE

    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)

    # With INPUT.CROP.ENABLED: apply [ResizeShortestEdge(PRE_RESIZE_SHORT_EDGE), RandomCrop] with
    # probability PROB before the usual resize. PROB 1.0 with no pre-resize is detectron2's own behaviour.
    cfg.INPUT.CROP.PROB = 1.0
    cfg.INPUT.CROP.PRE_RESIZE_SHORT_EDGE = []
    return cfg


def build_augmentation(cfg: CN, is_train: bool) -> list[T.Augmentation]:
    """detectron2's ``build_augmentation`` plus the optional pre-crop branch of the MViTv2 recipe.

    For the MViTv2 YAMLs (train): RandomApply(p=0.5, [ResizeShortestEdge(400/500/600), RandomCrop
    absolute_range (384, 600)]), ResizeShortestEdge(480..800, max 1333), RandomFlip. Test:
    ResizeShortestEdge(800, max 1333).
    """
    augs = detection_utils.build_augmentation(cfg, is_train)
    crop = cfg.INPUT.CROP
    if is_train and crop.ENABLED:
        if not 0.0 < crop.PROB <= 1.0:
            raise ValueError(f"cfg.INPUT.CROP.PROB must be in (0, 1], got {crop.PROB}.")
        branch: list[T.Augmentation] = []
        if crop.PRE_RESIZE_SHORT_EDGE:
            branch.append(T.ResizeShortestEdge(list(crop.PRE_RESIZE_SHORT_EDGE), sample_style="choice"))
        branch.append(T.RandomCrop(crop.TYPE, tuple(crop.SIZE)))
        if crop.PROB < 1.0:
            branch = [T.RandomApply(T.AugmentationList(branch), prob=crop.PROB)]
        augs = branch + augs
    return augs


def build_yacs_optimizer(cfg: CN, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW (``cfg.SOLVER.OPTIMIZER``) with the MViTv2 parameter groups.

    Norm layers get ``SOLVER.WEIGHT_DECAY_NORM``, rel-pos tables no weight decay, everything else
    (biases included, unless ``WEIGHT_DECAY_BIAS`` says otherwise) ``SOLVER.WEIGHT_DECAY``. Gradient
    clipping follows ``SOLVER.CLIP_GRADIENTS`` as in detectron2.
    """
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    if name not in _OPTIMIZERS:
        raise ValueError(f"cfg.SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r} is not supported; use 'SGD' or 'AdamW'.")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        overrides={p: {"weight_decay": 0.0} for p in NO_WEIGHT_DECAY_PARAMS},
    )
    if name == "ADAMW":
        opt = torch.optim.AdamW(
            params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )
    else:
        opt = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    return maybe_add_gradient_clipping(cfg, opt)


# --------------------------------------------------------------------------------------------
# Config keys that do not exist
# --------------------------------------------------------------------------------------------
def _target_params(target: Any) -> tuple[list[str], bool]:
    """(parameter names, accepts **kwargs) of a LazyCall target; ([], True) when it cannot be inspected."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:
            return [], True
    if inspect.isclass(target):
        return _class_params(target)
    return _signature_params(target)


def _signature_params(fn: Any, skip: int = 0) -> tuple[list[str], bool]:
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _class_params(cls: type) -> tuple[list[str], bool]:
    """A class's constructor arguments, following ``**kwargs`` up to the base that receives them.

    detectron2's heads pass ``**kwargs`` on (``StandardROIHeads`` -> ``ROIHeads(num_classes=...)``); without the
    walk, ``model.roi_heads.num_clases=3`` would pass this check and fail later inside detectron2.
    """
    inits = [k.__dict__["__init__"] for k in cls.__mro__ if "__init__" in k.__dict__ and k not in _KWARGS_SINKS]
    names: list[str] = []
    for i, init in enumerate(inits):
        params, var_kw = _signature_params(init, skip=1)
        names += [n for n in params if n not in names]
        if not var_kw:
            return names, False
        if i == len(inits) - 1:  # **kwargs used by the class itself: anything may be legitimate
            return names, True
    return names, True


# Bases whose __init__ takes **kwargs only to reject them.
_KWARGS_SINKS = (object, torch.nn.Module)


def check_lazy_overrides(cfg: Any, overrides: Sequence[str]) -> None:
    """Refuse ``key=value`` overrides of a LazyConfig whose key does not exist.

    ``LazyConfig.apply_overrides`` creates any key it is given, so a typo such as ``train.max_itr=100`` is
    silently ignored by training. A key that is not in the config is accepted only as a new argument of a
    ``LazyCall`` target whose signature has that parameter (or ``**kwargs``).

    Raises:
        ValueError: naming the key, the closest existing keys and the keys available at that level.
    """
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "the config"
            if isinstance(node, ListConfig):
                if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                    raise ValueError(
                        f"Unknown config key {key!r}: {where} is a list of {len(node)} items, {part!r} is not an "
                        "index of it."
                    )
                node = node[int(part)]
            elif isinstance(node, (DictConfig, Mapping)):
                if part in node:
                    node = node[part]
                    continue
                keys = [k for k in node.keys() if k != "_target_"]
                if "_target_" in node and i == len(parts) - 1:
                    params, var_kw = _target_params(node["_target_"])
                    if var_kw or part in params:
                        break  # a new argument of the called object: legitimate
                    keys = sorted(set(keys) | set(params))
                raise ValueError(
                    f"Unknown config key {key!r}: {where} has no entry {part!r}.{did_you_mean(part, keys)} "
                    f"Keys there: {', '.join(map(str, keys)) or '(none)'}."
                )
            else:
                raise ValueError(f"Unknown config key {key!r}: {where} is a value ({node!r}), not a group of keys.")


def unknown_yacs_key_message(cfg: CN, full_key: str) -> str:
    """The message for a yacs key that does not exist: closest keys, and ``add_mvitv2_config`` for MVIT keys."""
    parts = full_key.split(".")
    node, i = cfg, 0
    while i < len(parts) - 1 and isinstance(node, CN) and parts[i] in node:
        node, i = node[parts[i]], i + 1
    where = ".".join(parts[:i]) or "the config"
    keys = list(node.keys()) if isinstance(node, CN) else []
    msg = f"Unknown config key {full_key}: {where} has no key {parts[i]!r}.{did_you_mean(parts[i], keys)}"
    if parts[:2] == ["MODEL", "MVIT"] and "MVIT" not in cfg.MODEL:
        msg += (
            " MODEL.MVIT exists only after mvit_det.detection.add_mvitv2_config(cfg); call it before "
            "merge_from_file."
        )
    return msg
