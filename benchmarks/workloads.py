"""Workloads: how to build our model, the references, the inputs, one step and its outputs."""
from __future__ import annotations

import copy
import os
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from mvit_det.detection import MViTv2Backbone
from mvit_det.models import get_card
from mvit_det.utils.flops import flop_count

from . import references as refs
from .references import detectron2_mask_rcnn, detectron2_mvit
from .settings import CONFIGS, DTYPES, OURS, Settings


# =============================================================================================
# Workloads: how to build our model, the references, the inputs, one step and its outputs
# =============================================================================================
@contextmanager
def precision(s: Settings, grad: bool) -> Iterator[None]:
    """no_grad (inference) and autocast to ``s.dtype`` (bf16/fp16)."""
    with ExitStack() as stack:
        if not grad:
            stack.enter_context(torch.no_grad())
        if s.dtype != "fp32":
            stack.enter_context(torch.autocast(device_type=s.device, dtype=DTYPES[s.dtype]))
        yield


def _natural_image(h: int, w: int, flip: bool = False) -> Tensor:
    """(3, h, w) float RGB in 0..255: skimage's astronaut resized (random noise if skimage is missing)."""
    try:
        from skimage import data as skdata

        img = torch.as_tensor(skdata.astronaut()).permute(2, 0, 1).float()[None]
        img = torch.nn.functional.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0]
    except ImportError:
        img = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    return img.flip(-1) if flip else img


def _synthetic_instances(h: int, w: int, num_classes: int, n: int, seed: int):
    """``n`` random boxes with elliptical masks inside them, as detectron2 training targets."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1  # 10-40% of the image side
    xy = torch.rand(n, 2, generator=g) * (1 - wh)
    boxes = torch.cat([xy, xy + wh], dim=1) * torch.tensor([w, h, w, h], dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    masks = []
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(num_classes, (n,), generator=g)
    inst.gt_masks = BitMasks(torch.stack(masks))
    return inst


def compile_backend() -> str:
    """``torch.compile`` backend: inductor, or ``eager`` for the GPU plan's CPU dry run (tracing, no codegen)."""
    return os.environ.get("MVIT_BENCH_COMPILE_BACKEND", "inductor")


class Workload:
    """A task: builds our model and the references, and knows what one benchmark step is."""

    #: the reference libraries of this task, in table order
    references: tuple[str, ...] = ()
    #: whether a step runs autograd
    grad = False

    def __init__(self, s: Settings):
        self.s = s
        self.device = torch.device(s.device)

    @property
    def images_per_step(self) -> int:
        return self.s.batch_size

    def build_ours(self) -> nn.Module:
        raise NotImplementedError

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        raise NotImplementedError

    def variants(self, ours: nn.Module) -> dict[str, nn.Module]:
        """Extra contenders derived from ours (e.g. activation checkpointing)."""
        return {}

    def reference_variants(self, library: str) -> dict[str, Callable[[nn.Module], nn.Module]]:
        """Extra contenders of a reference library: name -> builder from ours."""
        return {}

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        """A closure that runs one benchmark step of ``model`` under the run's precision."""
        raise NotImplementedError

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        """The model's outputs on the benchmark inputs (eager), for the numerics check."""
        raise NotImplementedError

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        """(multiply-accumulates per image, how they were counted)."""
        raise NotImplementedError

    def compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model, backend=compile_backend())


class _Float32(nn.Module):
    """``model`` run in float32 whatever autocast says: ours at full precision, timed beside its bf16 run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.model(x.float())


class ClsWorkload(Workload):
    references = ("timm", "mmpretrain")

    def variants(self, ours: nn.Module) -> dict[str, nn.Module]:
        # With --dtype bf16/fp16, ours in fp32 too: is reduced precision worth it on this machine? (On a CPU
        # without native bf16, "bf16" computes in fp32 and must cost no more than fp32 itself.)
        return {} if self.s.dtype == "fp32" else {f"{OURS} fp32": _Float32(ours)}

    def __init__(self, s: Settings):
        super().__init__(s)
        if s.size == "H":
            raise ValueError(
                "--task cls supports --size T/S/B/L; MViTv2-H exists here only as a detection backbone "
                "(no reference implements an in1k MViTv2-H classifier)."
            )
        if s.img_size[0] != s.img_size[1]:
            raise ValueError(f"--task cls needs a square --img-size (timm builds for one side), got {s.img_size}.")
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(s.batch_size, 3, *s.img_size, generator=g).to(self.device)

    def build_ours(self) -> nn.Module:
        # The released in1k model of this size (L widens in the MLP), with rel-pos tables sized for the
        # input so that timm, which cannot resize them at run time, runs the same network.
        card = get_card(f"mvitv2-{self.s.size_name}_3rdparty_in1k")
        return card.build(pretrain_img_size=self.s.img_size[0])

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        return {"timm": refs.timm_classifier, "mmpretrain": refs.mmpretrain_classifier}[library](ours)

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        def step() -> Tensor:
            with precision(self.s, grad=False):
                return model(self.x)

        return step

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        with precision(replace(self.s, dtype=dtype), grad=False):
            return [model(self.x).float()]

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        total = flop_count(ours, self.x[:1]).total()
        return float(total), "fvcore (mvit_det.utils.flops), multiply-accumulates per image"


class DetBackboneWorkload(Workload):
    references = ("detectron2",)

    def __init__(self, s: Settings):
        super().__init__(s)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(s.batch_size, 3, *s.img_size, generator=g).to(self.device)

    def build_ours(self) -> nn.Module:
        return MViTv2Backbone(self.s.size_name)

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        return detectron2_mvit(ours)

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        def step() -> dict[str, Tensor]:
            with precision(self.s, grad=False):
                return model(self.x)

        return step

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        with precision(replace(self.s, dtype=dtype), grad=False):
            out = model(self.x)
        return [out[k].float() for k in sorted(out)]

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        total = flop_count(ours, self.x[:1]).total()
        # Tracing takes detectron2's padded windows (see PoolingAttention._window_attention), so this counts the work
        # detectron2 does; eager inference skips the padded queries (14% of the attention at 1024x1024).
        return float(total), ("fvcore (mvit_det.utils.flops), multiply-accumulates per image, counted as traced: "
                              "detectron2's padded attention windows, whose padded queries ours skips")


class _RCNNOutputs(nn.Module):
    """Image (3, H, W) -> (boxes, scores, masks) of a GeneralizedRCNN, for fvcore's tracer.

    detectron2's ``TracingAdapter`` traces under ``no_grad``, which sends our model down its fused
    oneDNN CPU path that the JIT tracer cannot record; this wrapper keeps the caller's grad mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        (out,) = self.model.inference([{"image": image}], do_postprocess=False)
        return out.pred_boxes.tensor, out.scores, out.pred_masks


class DetModelWorkload(Workload):
    """Mask R-CNN as configured by configs/mvitv2_t_maskrcnn.py (backbone size from ``--size``)."""

    references = ("detectron2",)

    def __init__(self, s: Settings):
        super().__init__(s)
        h, w = s.img_size
        self.inputs = [
            {"image": _natural_image(h, w, flip=bool(i % 2)).to(self.device), "height": h, "width": w}
            for i in range(s.batch_size)
        ]

    def build_ours(self) -> nn.Module:
        path = CONFIGS / "mvitv2_t_maskrcnn.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the benchmark from an mvit-det source checkout.")
        cfg = LazyConfig.load(str(path))
        cfg.model.backbone.bottom_up.size = self.s.size_name
        try:
            cfg = LazyConfig.apply_overrides(cfg, list(self.s.opts))
        except Exception as e:  # hydra's parse errors, OmegaConf key errors: all are bad --opts
            raise ValueError(f"--opts {list(self.s.opts)} do not apply to {path.name}: {e}") from None
        return instantiate(cfg.model)

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        return detectron2_mask_rcnn(ours)

    def compile(self, model: nn.Module) -> nn.Module:
        # The detector's heads are dynamic (data-dependent proposal counts); compile the trunk, which is
        # where the implementations differ.
        model.backbone.bottom_up = torch.compile(model.backbone.bottom_up, backend=compile_backend())
        return model

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        def step() -> list[dict]:
            with precision(self.s, grad=False):
                return model(self.inputs)

        return step

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        with precision(replace(self.s, dtype=dtype), grad=False):
            results = model.inference(self.inputs, do_postprocess=False)
        out = []
        for r in results:
            out += [r.pred_boxes.tensor.float(), r.scores.float(), r.pred_classes.float(), r.pred_masks.float()]
        return out

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        with precision(replace(self.s, dtype="fp32"), grad=True):
            total = flop_count(_RCNNOutputs(ours), (self.inputs[0]["image"],)).total()
        note = "fvcore (mvit_det.utils.flops), multiply-accumulates per image, inference without post-processing"
        return float(total), note


class DetTrainWorkload(DetModelWorkload):
    """One training step: losses, backward, AdamW update (GradScaler with fp16)."""

    grad = True

    def __init__(self, s: Settings):
        Workload.__init__(self, s)
        h, w = s.img_size
        self.inputs = [
            {
                "image": _natural_image(h, w, flip=bool(i % 2)).to(self.device),
                "instances": _synthetic_instances(h, w, num_classes=80, n=8, seed=i).to(self.device),
            }
            for i in range(s.batch_size)
        ]

    def build_ours(self) -> nn.Module:
        return super().build_ours().train()

    def variants(self, ours: nn.Module) -> dict[str, nn.Module]:
        if not self.s.act_checkpoint:
            return {}
        ckpt = copy.deepcopy(ours)
        ckpt.backbone.bottom_up.act_checkpoint = True
        return {f"{OURS}+ckpt": ckpt}

    def reference_variants(self, library: str) -> dict[str, Callable[[nn.Module], nn.Module]]:
        """detectron2's own activation checkpointing (``use_act_checkpoint``, needs fairscale)."""
        if not self.s.act_checkpoint:
            return {}
        return {f"{library}+ckpt": lambda ours: detectron2_mask_rcnn(ours, act_checkpoint=True)}

    def _loss(self, model: nn.Module) -> Tensor:
        with EventStorage(0):  # the heads log training statistics into the current storage
            losses = model(self.inputs)
        return sum(losses.values())

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
        scaler = torch.amp.GradScaler(self.s.device, enabled=self.s.dtype == "fp16")

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            with precision(self.s, grad=True):
                loss = self._loss(model)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach()

        return step

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        """Every loss of one training forward, with the RNG (drop path, RoI sampling) seeded alike."""
        model.train()
        torch.manual_seed(1234)
        with precision(replace(self.s, dtype=dtype), grad=True), EventStorage(0):
            losses = model(self.inputs)
        return [losses[k].detach().float().reshape(1) for k in sorted(losses)]

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        return None, "not counted: fvcore counts forward inference only (see --task det-model)"


WORKLOADS: dict[str, type[Workload]] = {
    "cls": ClsWorkload,
    "det-backbone": DetBackboneWorkload,
    "det-model": DetModelWorkload,
    "det-train": DetTrainWorkload,
}
