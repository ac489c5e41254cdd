"""Reference MViTv2 implementations (timm, mmpretrain, detectron2) carrying *our* weights.

Every builder takes one of our models and returns the other library's network with the same numbers in
it, so a benchmark or a parity test compares implementations, not initialisations:

* :func:`timm_classifier`: ``timm.models.mvitv2.MultiScaleVit`` (the ``mvitv2_{tiny,small,base,large}``
  family); blocks are renamed ``blocks.{i}`` -> ``stages.{s}.blocks.{j}`` and the width-changing
  shortcut ``proj`` -> ``shortcut_proj_attn`` / ``shortcut_proj_mlp``.
* :func:`mmpretrain_classifier`: mmpretrain's ``ImageClassifier`` = ``MViT`` backbone + global average
  pooling + ``LinearClsHead``; ``patch_embed.proj`` -> ``backbone.patch_embed.projection``,
  ``norm`` -> ``backbone.norm3``, everything else under ``backbone.``.
* :func:`detectron2_mvit`: ``detectron2.modeling.MViT``, whose keys equal our detection-mode keys.
* :func:`detectron2_mask_rcnn`: detectron2's own MViTv2 Mask R-CNN, built as in
  ``projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py`` (model zoo ``common/models/mask_rcnn_fpn.py`` with
  ``bottom_up`` = ``MViT``), loading the weights of our Mask R-CNN (same keys). Its config alone,
  :func:`detectron2_mask_rcnn_config`, is the skeleton the detector parity tests build detectron2's models on.

A library that is not installed raises :class:`ReferenceUnavailable` (an ``ImportError``) naming the
install command, so callers can skip it with a note.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn

from mvit_det.checkpoint.formats import to_mmpretrain_state_dict, to_timm_state_dict
from mvit_det.models import ARCHS, MViTv2, MViTv2Arch, get_arch
from mvit_det.models.mvitv2 import STAGE_NAMES
from mvit_det.utils.numerics import max_rel_diff  # noqa: F401  (re-exported for the benchmark and tests)

__all__ = [
    "REFERENCE_INSTALL",
    "ReferenceUnavailable",
    "detectron2_mask_rcnn",
    "detectron2_mask_rcnn_config",
    "detectron2_mvit",
    "max_rel_diff",
    "mmpretrain_classifier",
    "randomize_",
    "reference_version",
    "timm_classifier",
    "to_mmpretrain_state_dict",
    "to_timm_state_dict",
]

#: How to install each reference library (mmpretrain needs mmengine and mmcv-lite beside it).
REFERENCE_INSTALL = {
    "timm": "pip install timm",
    "mmpretrain": "pip install mmengine mmcv-lite && pip install --no-deps mmpretrain",
    "detectron2": "see README, 'Installation details' (detectron2 is not on PyPI)",
}


class ReferenceUnavailable(ImportError):
    """The reference library is not installed (or too old to have MViTv2)."""

    def __init__(self, library: str, error: BaseException, install: Optional[str] = None):
        install = install or REFERENCE_INSTALL[library]
        super().__init__(f"{library} is not available ({error}); install it with: {install}")
        self.library = library


def _size_name(arch: MViTv2Arch) -> str:
    for name, a in ARCHS.items():
        if a == arch:
            return name
    raise ValueError(f"{arch} is not one of the MViTv2 sizes {list(ARCHS)}.")


def _expand_attn(model: MViTv2) -> bool:
    return model.specs[0].expand_attn


def _pretrain_img_size(model: MViTv2) -> int:
    # Every block's rel-pos tables are sized for the pre-training token grid (input side / 4).
    return model.specs[0].rel_pos_grid * 4


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter an informative random value, in place, so that comparisons can fail.

    rel-pos tables ~ 0.1 N (detectron2 zero-inits them), LayerNorm weights 1 + 0.2 N, biases 0.05 N, and
    detection predictors (class scores, box deltas, mask logits) 0.05 N so that detections spread out
    instead of tying at the initial near-constant scores. Other weights keep their initialisation.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p)
        if name.endswith(("rel_pos_h", "rel_pos_w")):
            p.copy_(0.1 * noise)
        elif "norm" in name and name.endswith(".weight") and p.ndim == 1:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.05 * noise)
        elif any(k in name for k in ("cls_score", "bbox_pred", "mask_head.predictor")):
            p.copy_(0.05 * noise)
    return model


# ---------------------------------------------------------------------------------------------
# Classification: timm
# ---------------------------------------------------------------------------------------------
def timm_classifier(ours: MViTv2) -> nn.Module:
    """timm's ``MultiScaleVit`` of the same size, width placement and input size, with ``ours``'s weights.

    ``ours`` must be a classification-mode model without a class token (the in1k ``mvitv2_*`` family).
    timm sizes its rel-pos tables for ``img_size`` and cannot resize them at run time, so the model is
    built for ``ours``'s ``pretrain_img_size``: feed it inputs of that size.
    """
    try:
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    except ImportError as e:
        raise ReferenceUnavailable("timm", e) from None
    if ours.detection or ours.has_cls_token:
        raise ValueError("timm_classifier needs a classification-mode MViTv2 without a class token.")
    arch = ours.arch
    cfg = MultiScaleVitCfg(
        depths=arch.depths,
        embed_dim=arch.embed_dim,
        num_heads=arch.num_heads,
        expand_attn=_expand_attn(ours),
    )
    size = _pretrain_img_size(ours)
    ref = MultiScaleVit(cfg, img_size=(size, size), num_classes=ours.num_classes)
    ref.load_state_dict(to_timm_state_dict(ours.state_dict(), arch.depths, _expand_attn(ours)))
    return ref.to(next(ours.parameters()).device).train(ours.training)


# ---------------------------------------------------------------------------------------------
# Classification: mmpretrain
# ---------------------------------------------------------------------------------------------
class _TensorMode(nn.Module):
    """Calls an mmengine model in ``mode="tensor"``: (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode="tensor")


def mmpretrain_classifier(ours: MViTv2) -> nn.Module:
    """mmpretrain ``MViT`` + ``GlobalAveragePooling`` + ``LinearClsHead`` with ``ours``'s weights.

    Returned wrapped so that ``model(x)`` gives logits (mmpretrain's ``mode="tensor"``); the mmpretrain
    classifier itself is ``.model``.
    """
    try:
        from mmpretrain.models import ImageClassifier
    except ImportError as e:
        raise ReferenceUnavailable("mmpretrain", e) from None
    if ours.detection or ours.has_cls_token:
        raise ValueError("mmpretrain_classifier needs a classification-mode MViTv2 without a class token.")
    arch = ours.arch
    ends = arch.last_block_indexes
    backbone = dict(
        type="MViT",
        arch=dict(
            embed_dims=arch.embed_dim,
            num_layers=arch.depth,
            num_heads=arch.num_heads,
            downscale_indices=[i + 1 for i in ends[:-1]],  # first block of stages 2-4
        ),
        img_size=_pretrain_img_size(ours),
        dim_mul_in_attention=_expand_attn(ours),
    )
    ref = ImageClassifier(
        backbone=backbone,
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=ours.num_classes, in_channels=ours.num_features),
    )
    ref.load_state_dict(to_mmpretrain_state_dict(ours.state_dict()))
    return _TensorMode(ref).to(next(ours.parameters()).device).train(ours.training)


# ---------------------------------------------------------------------------------------------
# Detection: detectron2
# ---------------------------------------------------------------------------------------------
def _detectron2_mvit_kwargs(arch: MViTv2Arch, out_features, drop_path_rate: float, pretrain_img_size: int) -> dict:
    """``detectron2.modeling.MViT`` arguments of detectron2's MViTv2 configs for ``arch``."""
    return dict(
        img_size=pretrain_img_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        last_block_indexes=arch.last_block_indexes,
        residual_pooling=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        out_features=tuple(out_features),
    )


def _drop_path_rate(model: MViTv2) -> float:
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    return float(rates[-1])


def detectron2_mvit(ours: MViTv2) -> nn.Module:
    """``detectron2.modeling.MViT`` (as configured by detectron2's MViTv2 projects) with ``ours``'s weights.

    ``ours`` must be a detection-mode model (``MViTv2(..., detection=True)`` or ``MViTv2Backbone``); the
    state-dict keys are identical. Same outputs: ``{"scale2": (B, C, H/4, W/4), ...}``.
    """
    try:
        from detectron2.modeling import MViT
    except ImportError as e:
        raise ReferenceUnavailable("detectron2", e) from None
    if not ours.detection:
        raise ValueError("detectron2_mvit needs a detection-mode MViTv2 (detection=True).")
    ref = MViT(**_detectron2_mvit_kwargs(ours.arch, ours.out_features, _drop_path_rate(ours), _pretrain_img_size(ours)))
    ref.load_state_dict(ours.state_dict())
    return ref.to(next(ours.parameters()).device).train(ours.training)


def detectron2_mask_rcnn_config(
    size: str | MViTv2Arch,
    *,
    drop_path_rate: float,
    out_features=STAGE_NAMES,
    pretrain_img_size: int = 224,
    act_checkpoint: bool = False,
):
    """The LazyCall config of detectron2's own MViTv2 Mask R-CNN of ``size``, as
    projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py writes it for T: model zoo ``common/models/mask_rcnn_fpn.py``
    with ``bottom_up`` = detectron2's ``MViT``, ImageNet RGB normalisation. Parity tests change its heads (a
    cascade, other proposal counts) before instantiating it. ``act_checkpoint`` uses detectron2's
    ``use_act_checkpoint`` (needs fairscale)."""
    try:
        from detectron2 import model_zoo
        from detectron2.config import LazyCall as L
        from detectron2.modeling import MViT
    except ImportError as e:
        raise ReferenceUnavailable("detectron2", e) from None
    if act_checkpoint:
        try:
            import fairscale  # noqa: F401  (detectron2's MViT wraps blocks with fairscale's checkpoint_wrapper)
        except ImportError as e:
            raise ReferenceUnavailable("detectron2 activation checkpointing", e, "pip install fairscale") from None
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    constants = model_zoo.get_config("common/data/constants.py").constants
    model.pixel_mean = constants.imagenet_rgb256_mean
    model.pixel_std = constants.imagenet_rgb256_std
    model.input_format = "RGB"
    model.backbone.bottom_up = L(MViT)(
        **_detectron2_mvit_kwargs(get_arch(size), out_features, drop_path_rate, pretrain_img_size),
        use_act_checkpoint=act_checkpoint,
    )
    model.backbone.in_features = "${.bottom_up.out_features}"
    return model


def detectron2_mask_rcnn(ours: nn.Module, act_checkpoint: bool = False) -> nn.Module:
    """detectron2's own MViTv2 Mask R-CNN (:func:`detectron2_mask_rcnn_config`), loaded with the weights of
    ``ours``, a ``GeneralizedRCNN`` whose ``backbone.bottom_up`` is our MViTv2.

    The size, drop-path rate and the score threshold / detections per image of the box predictor are
    taken from ``ours``. ``act_checkpoint`` uses detectron2's ``use_act_checkpoint`` (needs fairscale).
    """
    trunk: MViTv2 = ours.backbone.bottom_up
    model = detectron2_mask_rcnn_config(
        trunk.arch, drop_path_rate=_drop_path_rate(trunk), out_features=trunk.out_features,
        pretrain_img_size=_pretrain_img_size(trunk), act_checkpoint=act_checkpoint,
    )
    from detectron2.config import instantiate  # importable: detectron2_mask_rcnn_config found detectron2

    # Same head hyper-parameters as ours (the recipe values unless a config changed them).
    rpn, roi_heads, predictor = ours.proposal_generator, ours.roi_heads, ours.roi_heads.box_predictor
    model.proposal_generator.pre_nms_topk = (rpn.pre_nms_topk[True], rpn.pre_nms_topk[False])
    model.proposal_generator.post_nms_topk = (rpn.post_nms_topk[True], rpn.post_nms_topk[False])
    model.proposal_generator.batch_size_per_image = rpn.batch_size_per_image
    model.proposal_generator.positive_fraction = rpn.positive_fraction
    model.roi_heads.num_classes = roi_heads.num_classes
    model.roi_heads.batch_size_per_image = roi_heads.batch_size_per_image
    model.roi_heads.positive_fraction = roi_heads.positive_fraction
    model.roi_heads.box_predictor.test_score_thresh = predictor.test_score_thresh
    model.roi_heads.box_predictor.test_topk_per_image = predictor.test_topk_per_image
    ref = instantiate(model)
    ref.load_state_dict(ours.state_dict())
    return ref.to(next(ours.parameters()).device).train(ours.training)


def reference_version(library: str) -> Optional[str]:
    """Installed version of a reference library, or None if it is not importable."""
    try:
        module = __import__(library)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")
