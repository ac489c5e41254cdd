"""MViTv2 as a detectron2 backbone, and its yacs builders.

``MViTv2Backbone`` *is* the detection-mode :class:`mvit_det.models.MViTv2` (it subclasses it), so there
is one implementation of the network and no extra name level: inside an FPN its parameters are
``backbone.bottom_up.patch_embed.proj.*``, ``backbone.bottom_up.blocks.{i}.*`` and
``backbone.bottom_up.scale{2..5}_norm.*``, exactly the keys of detectron2's own ``MViT``. Model-zoo
``.pkl`` files and the official ImageNet ``.pyth`` files therefore load with a plain
``DetectionCheckpointer``.

Builders registered in ``BACKBONE_REGISTRY`` (importing ``mvit_det.detection`` registers them):

* ``build_mvitv2_backbone``: the bare trunk (outputs ``scale2..scale5``).
* ``build_mvitv2_fpn_backbone``: FPN p2-p6 (``LastLevelMaxPool``), as in detectron2's MViTv2 project.
* ``build_retinanet_mvitv2_fpn_backbone``: FPN p3-p7 with ``LastLevelP6P7`` computed from p5.
"""
from __future__ import annotations

from typing import Optional, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from ..models import ARCHS, MViTv2, get_arch
from ..models.mvitv2 import STAGE_NAMES, STAGE_STRIDES, WINDOW_SIZE

__all__ = [
    "MViTv2Backbone",
    "build_mvitv2_backbone",
    "build_mvitv2_fpn_backbone",
    "build_retinanet_mvitv2_fpn_backbone",
]


#: stochastic depth of detectron2's MViTv2 detection recipes, per size (a training-recipe value, not a size fact)
DET_DROP_PATH = {"tiny": 0.2, "small": 0.2, "base": 0.4, "large": 0.5, "huge": 0.6}


def det_drop_path(size: str) -> float:
    """``DET_DROP_PATH`` for any spelling of a size (``"T"``, ``"tiny"``, ``"mvitv2_t"``)."""
    arch = get_arch(size)
    return next(DET_DROP_PATH[name] for name, a in ARCHS.items() if a == arch)


class MViTv2Backbone(MViTv2, Backbone):
    """Detection-mode MViTv2 with detectron2's ``Backbone`` interface.

    Args:
        size: "tiny"/"T", "small"/"S", "base"/"B", "large"/"L", "huge"/"H" (see ``mvit_det.models.ARCHS``).
        out_features: subset of ``("scale2", "scale3", "scale4", "scale5")``.
        drop_path_rate: stochastic depth. ``None`` takes the value of detectron2's MViTv2 recipe for this
            size (``DET_DROP_PATH``: T/S 0.2, B 0.4, L 0.5, H 0.6).
        act_checkpoint: recompute every block in the backward pass (``torch.utils.checkpoint``; trades
            compute for memory, used for H).
        pretrain_img_size: ImageNet resolution of the checkpoint; sizes the rel-pos tables, which are
            interpolated for other inputs.
        window_size: stage 1's attention window in tokens (detectron2's 56, halved per stage); 0 for global
            attention in every block (cheaper, and no attention to padding, when inputs are small).
        in_chans: input channels.

    Input: (B, in_chans, H, W), normalised. Any H, W >= 32 works; the detector pads to ``size_divisibility``
    (32) so that the FPN levels line up.
    Output: ``{"scale2": (B, C, H/4, W/4), "scale3": (B, 2C, H/8, W/8), "scale4": (B, 4C, H/16, W/16),
    "scale5": (B, 8C, H/32, W/32)}`` (sizes rounded up), restricted to ``out_features``.
    """

    def __init__(
        self,
        size: str = "tiny",
        *,
        out_features: Sequence[str] = STAGE_NAMES,
        drop_path_rate: Optional[float] = None,
        act_checkpoint: bool = False,
        pretrain_img_size: int = 224,
        window_size: int = WINDOW_SIZE,
        in_chans: int = 3,
    ):
        arch = get_arch(size)
        super().__init__(
            arch,
            detection=True,
            out_features=out_features,
            in_chans=in_chans,
            pretrain_img_size=pretrain_img_size,
            window_size=window_size,
            drop_path_rate=det_drop_path(size) if drop_path_rate is None else drop_path_rate,
            act_checkpoint=act_checkpoint,
        )
        channels = dict(zip(STAGE_NAMES, self.stage_channels))
        strides = dict(zip(STAGE_NAMES, STAGE_STRIDES))
        # Read by Backbone.output_shape() -> {name: ShapeSpec(channels, stride)}.
        self._out_features = list(self.out_features)
        self._out_feature_channels = {f: channels[f] for f in self._out_features}
        self._out_feature_strides = {f: strides[f] for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        # Every stage rounds its grid up (ceil(H / stride)); padding to the largest stride keeps the
        # maps exactly 2x apart, which the FPN top-down path needs.
        return STAGE_STRIDES[-1]


# --------------------------------------------------------------------------------------------
# yacs builders
# --------------------------------------------------------------------------------------------
def _check_cfg(cfg) -> None:
    if "MVIT" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.MVIT is missing: call mvit_det.detection.add_mvitv2_config(cfg) before "
            "merge_from_file() and build_model()."
        )


@BACKBONE_REGISTRY.register()
def build_mvitv2_backbone(cfg, input_shape: ShapeSpec) -> MViTv2Backbone:
    """``cfg.MODEL.MVIT`` -> :class:`MViTv2Backbone` (outputs ``cfg.MODEL.MVIT.OUT_FEATURES``)."""
    _check_cfg(cfg)
    mcfg = cfg.MODEL.MVIT
    try:
        get_arch(mcfg.SIZE)
    except ValueError as e:
        raise ValueError(f"cfg.MODEL.MVIT.SIZE = {mcfg.SIZE!r}: {e}") from None
    unknown = [f for f in mcfg.OUT_FEATURES if f not in STAGE_NAMES]
    if unknown:
        raise ValueError(
            f"cfg.MODEL.MVIT.OUT_FEATURES has unknown names {unknown}; choose from {list(STAGE_NAMES)}."
        )
    return MViTv2Backbone(
        mcfg.SIZE,
        out_features=mcfg.OUT_FEATURES,
        drop_path_rate=mcfg.DROP_PATH_RATE,
        act_checkpoint=mcfg.ACT_CHECKPOINT,
        pretrain_img_size=mcfg.PRETRAIN_IMG_SIZE,
        window_size=mcfg.WINDOW_SIZE,
        in_chans=input_shape.channels,
    )


def _fpn_bottom_up(cfg, input_shape: ShapeSpec) -> MViTv2Backbone:
    bottom_up = build_mvitv2_backbone(cfg, input_shape)
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.out_features]
    if missing:
        raise ValueError(
            f"cfg.MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} asks for {missing}, which "
            f"cfg.MODEL.MVIT.OUT_FEATURES {list(cfg.MODEL.MVIT.OUT_FEATURES)} does not produce; add them there."
        )
    return bottom_up


@BACKBONE_REGISTRY.register()
def build_mvitv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MViTv2 + FPN with p2-p6 (``LastLevelMaxPool``), the Mask R-CNN / Cascade R-CNN backbone."""
    return FPN(
        bottom_up=_fpn_bottom_up(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_mvitv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MViTv2 + FPN for RetinaNet: p6 and p7 are computed from p5 (``LastLevelP6P7``)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=_fpn_bottom_up(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
