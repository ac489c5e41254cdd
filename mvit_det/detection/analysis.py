"""What detectron2's ``tools/analyze_model.py`` counts (FLOPs, activations, parameters, structure), for a config
of either kind and without COCO.

detectron2 counts a detector's FLOPs with ``detectron2.utils.analysis.FlopCountAnalysis`` (plain fvcore behind
detectron2's ``TracingAdapter``) on images from the config's test loader, in eval mode, and averages over the first
``--num-inputs`` images. Here the images are real photographs (by default the four colour photographs that ship
with scikit-image, written to PNG and read back through the config's own test mapper, so they are resized exactly
as the test loader resizes COCO images), because COCO is not available. The counter is not patched: MViTv2 writes
its attention with matmuls under tracing (``mvit_det.models.fastpath``), so plain fvcore sees every product.

A detector's cost depends on the input and, through the RoI heads, on the weights: the box heads run on the
proposals (``post_nms_topk`` of the RPN, 1000 at test time, whatever the weights), the mask head on the final
detections (0 to ``test_topk_per_image``, 100). With random weights almost every score is below the test
threshold, so ``count_flops`` reports the mask head's cost per detection and the total for any number of
detections (:meth:`FlopCount.total_with`), and ``all_detections=True`` lowers the score threshold to 0 so that the
mask head runs on the most detections the config allows.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
from torch import nn

from detectron2.config import instantiate
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators

from .builders import _yacs_mapper, build_model
from .checkpoint import MViTv2Checkpointer
from .run_config import AnyConfig, is_lazy, load_config

__all__ = [
    "PHOTOGRAPHS",
    "ZOO_INPUTS",
    "FlopCount",
    "build_for_counting",
    "by_operator",
    "count_activations",
    "count_flops",
    "photographs",
    "test_inputs",
]

#: scikit-image's colour photographs (bundled with it, no download): 512x512, 400x600, 300x451 and 427x640.
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")
#: What the zoo table's counted FLOPs are counted on: one 640x427 photograph, the shape of most COCO images
#: (scaled to 640 pixels on the longer side, landscape), which the MViTv2 configs' test resize makes 800x1199.
ZOO_INPUTS = ("rocket",)


def photographs(names: Sequence[str] = PHOTOGRAPHS) -> list[tuple[str, np.ndarray]]:
    """``(name, RGB uint8 HxWx3)`` for each of scikit-image's bundled photographs named."""
    import skimage.data

    return [(name, np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])) for name in names]


def test_mapper(cfg: AnyConfig):
    """The mapper of the config's test loader (``dataloader.test.mapper`` or the yacs ``DatasetMapper``)."""
    return instantiate(cfg.dataloader.test.mapper) if is_lazy(cfg) else _yacs_mapper(cfg, is_train=False)


def test_inputs(cfg: AnyConfig, images: Iterable[tuple[str, np.ndarray]]) -> list[dict]:
    """Model inputs made from ``(name, RGB image)`` pairs by the config's test mapper, as its test loader makes them
    from dataset files (read from disk, channel order of the config, test resize)."""
    from PIL import Image

    mapper = test_mapper(cfg)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rgb) in enumerate(images):
            path = os.path.join(tmp, f"{i}.png")  # lossless, so the mapper reads back exactly these pixels
            Image.fromarray(rgb).save(path)
            d = mapper({"file_name": path, "image_id": i, "height": rgb.shape[0], "width": rgb.shape[1]})
            d["file_name"] = name
            out.append(d)
    return out


def build_for_counting(
    config: str, opts: Sequence[str] = (), weights: Optional[str] = None
) -> tuple[AnyConfig, nn.Module]:
    """``(cfg, model)`` for a ``.py`` or ``.yaml`` config on the CPU, in eval mode, with ``weights`` loaded if given
    (random initialisation otherwise: no download)."""

    device = ["train.device=cpu"] if config.endswith(".py") else ["MODEL.DEVICE", "cpu"]
    cfg = load_config(config, [*opts, *device])
    model = build_model(cfg)
    if weights:
        MViTv2Checkpointer(model).load(weights)
    return cfg, model.eval()


def _predictors(model: nn.Module) -> list[nn.Module]:
    p = model.roi_heads.box_predictor
    return list(p) if isinstance(p, nn.ModuleList) else [p]


def _record_batch_sizes(module: Optional[nn.Module], sizes: list[int], handles: list) -> None:
    """Append to ``sizes`` the number of RoIs each call of ``module`` (or of each module of a list) gets."""
    if module is None:
        return
    for m in module if isinstance(module, nn.ModuleList) else [module]:
        handles.append(m.register_forward_hook(lambda _m, args, _out: sizes.append(int(args[0].shape[0]))))


@dataclass
class FlopCount:
    """fvcore's count for one input, in multiply-accumulates (the unit of every published MViTv2 "FLOPs")."""

    image: str
    input_hw: tuple[int, int]
    total: float
    #: part of ``total`` spent in ``roi_heads.mask_head`` (0 without a mask head; detectron2's wrapper names it
    #: ``model.roi_heads.mask_head``)
    mask_head: float
    #: RoIs the box head(s) ran on, one entry per cascade stage
    proposals: list[int]
    detections: int
    by_operator: dict[str, float] = field(default_factory=dict)

    @property
    def mask_head_per_detection(self) -> float:
        return self.mask_head / self.detections if self.detections else float("nan")

    def total_with(self, detections: int) -> float:
        """The count this input would give with ``detections`` final detections instead (the mask head's cost is
        linear in them; nothing else depends on them)."""
        if detections == self.detections:
            return self.total
        return self.total - self.mask_head + detections * self.mask_head_per_detection


def count_flops(model: nn.Module, inputs: Sequence[dict], *, all_detections: bool = False) -> list[FlopCount]:
    """Count each input with detectron2's ``FlopCountAnalysis`` (plain fvcore), as ``analyze_model.py --tasks flop``
    does, with the model in eval mode. ``all_detections`` sets every box predictor's ``test_score_thresh`` to 0
    for the count, so that the mask head runs on ``test_topk_per_image`` detections whatever the weights."""
    saved = [(p, p.test_score_thresh) for p in _predictors(model)]
    box_sizes: list[int] = []
    mask_sizes: list[int] = []
    handles: list = []
    _record_batch_sizes(getattr(model.roi_heads, "box_head", None), box_sizes, handles)
    _record_batch_sizes(getattr(model.roi_heads, "mask_head", None), mask_sizes, handles)
    was_training = model.training
    model.eval()
    results = []
    try:
        if all_detections:
            for p, _ in saved:
                p.test_score_thresh = 0.0
        for d in inputs:
            box_sizes.clear()
            mask_sizes.clear()
            analysis = FlopCountAnalysis(model, [d])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = analysis.by_module()
            results.append(FlopCount(
                image=str(d.get("file_name", "")), input_hw=tuple(d["image"].shape[1:]), total=float(analysis.total()),
                mask_head=float(by_module.get("model.roi_heads.mask_head", 0)), proposals=list(box_sizes),
                detections=sum(mask_sizes), by_operator={k: float(v) for k, v in analysis.by_operator().items()},
            ))  # fmt: skip
    finally:
        for p, thresh in saved:
            p.test_score_thresh = thresh
        for h in handles:
            h.remove()
        model.train(was_training)
    return results


def count_activations(model: nn.Module, inputs: Sequence[dict]) -> list[float]:
    """Millions of activations per input, as ``analyze_model.py --tasks activation`` counts them."""
    was_training = model.training
    model.eval()
    try:
        return [float(sum(activation_count_operators(model, [d]).values())) for d in inputs]
    finally:
        model.train(was_training)


def by_operator(counts: Sequence[FlopCount]) -> dict[str, float]:
    """Mean per input of each operator's count, as analyze_model.py logs it."""
    total: Counter = Counter()
    for c in counts:
        total.update(c.by_operator)
    return {k: v / len(counts) for k, v in total.items()}
