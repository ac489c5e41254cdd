#!/usr/bin/env python
"""Side-by-side benchmark of mvit-det against the installed reference implementations.

Every run builds our model with random (informative) weights, copies the same weights into each installed
reference (timm and mmpretrain for classification, detectron2 for detection; see
``mvit_det.utils.references``), checks that all of them compute the same outputs on the benchmark inputs,
and then times them **in the same process, interleaved round-robin** (ours, ref 1, ref 2, ours, ...), so
that load from other processes hits every model alike. Per model it reports images/s (from the median
step time), latency p50/p90/p99, peak memory, and ours' speed-up (reference time / our time).

Tasks:
  cls           ImageNet classifier, MViTv2-T/S/B/L (timm ``mvitv2_*``, mmpretrain ``MViT``).
  det-backbone  detection trunk (``MViTv2Backbone`` vs ``detectron2.modeling.MViT``), default 1024x1024.
  det-model     whole Mask R-CNN inference (eval mode, with post-processing), default one 800x1088 image.
  det-train     one Mask R-CNN training step (forward, backward, AdamW) on synthetic targets, default
                batch 2 at 1024x1024; ``--act-checkpoint`` adds activation-checkpointed variants.

Examples:
  python tools/benchmark.py --task cls --arch T --batch-size 8
  python tools/benchmark.py --task cls --arch B --dtype bf16 --compile
  python tools/benchmark.py --task det-model --iters 5
  python tools/benchmark.py --task det-train --act-checkpoint --iters 3 --warmup 1
  python tools/benchmark.py --scaling --out-md scaling.md        # the README's resolution table
  python tools/benchmark.py --device cuda --dtype bf16 --task det-train --act-checkpoint

Peak memory is the extra memory one step needs beyond what is already resident (weights, and for
training the optimizer state): on CUDA ``torch.cuda.max_memory_allocated`` above the allocated bytes before
the step; on CPU the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
above its resident set before the step. With ``--act-checkpoint`` on CPU every variant is also measured
alone in a fresh process (peak VmHWM over two training steps), so their peaks cannot mix.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mvit_det.models.fastpath import cpu_info
from mvit_det.utils.cli import parse_img_size
from mvit_det.utils.references import max_rel_diff

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

OURS = "mvit-det"
TASKS = ("cls", "det-backbone", "det-model", "det-train")
ARCH_NAMES = {"T": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH = {"cls": 8, "det-backbone": 1, "det-model": 1, "det-train": 2}
DEFAULT_SIZE = {"cls": (224, 224), "det-backbone": (1024, 1024), "det-model": (800, 1088), "det-train": (1024, 1024)}
SCALING_SIZES = (224, 384, 512, 768, 1024)
#: fp32 outputs of every reference must agree with ours to this max relative difference
NUMERICS_TOL = 1e-4
#: a model's step times are flagged as noisy above this coefficient of variation ...
NOISE_MAX_CV = 0.10
#: ... or above this p90 / p50 ratio
NOISE_MAX_SPREAD = 1.25


# =============================================================================================
# Settings and small utilities
# =============================================================================================
@dataclass(frozen=True)
class Settings:
    """One benchmark configuration (one table)."""

    task: str = "cls"
    arch: str = "T"
    batch_size: int = 8
    img_size: tuple[int, int] = (224, 224)
    dtype: str = "fp32"
    compile: bool = False
    device: str = "cpu"
    threads: Optional[int] = 2
    warmup: int = 2
    iters: int = 10
    act_checkpoint: bool = False
    #: LazyConfig overrides of the detector (det-model, det-train), e.g. "model.roi_heads.batch_size_per_image=128"
    opts: tuple[str, ...] = ()

    @property
    def size_name(self) -> str:
        return ARCH_NAMES[self.arch]

    @property
    def title(self) -> str:
        what = {
            "cls": "classification",
            "det-backbone": "detection backbone",
            "det-model": "Mask R-CNN inference",
            "det-train": "Mask R-CNN training step",
        }[self.task]
        h, w = self.img_size
        mode = "torch.compile" if self.compile else "eager"
        threads = f", {self.threads} threads" if self.device == "cpu" else ""
        return (
            f"MViTv2-{self.arch} {what}, batch {self.batch_size}, {h}x{w}, {self.dtype}, {mode}, "
            f"{self.device}{threads}"
        )


def percentile(times: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(times, dtype=np.float64), q))


def noise_warning(
    times: Sequence[float], max_cv: float = NOISE_MAX_CV, max_spread: float = NOISE_MAX_SPREAD
) -> Optional[str]:
    """A message if a model's step times vary too much to trust the comparison, else None.

    Flags a coefficient of variation (std / mean) above ``max_cv`` or a p90 / p50 ratio above
    ``max_spread``. Fewer than 3 samples carry no spread information and are never flagged.
    """
    if len(times) < 3:
        return None
    t = np.asarray(times, dtype=np.float64)
    cv = float(t.std() / t.mean())
    spread = percentile(t, 90) / percentile(t, 50)
    problems = []
    if cv > max_cv:
        problems.append(f"coefficient of variation {cv:.2f} > {max_cv:.2f}")
    if spread > max_spread:
        problems.append(f"p90/p50 {spread:.2f} > {max_spread:.2f}")
    if not problems:
        return None
    return "noisy timings (" + ", ".join(problems) + "): other processes are probably competing for the machine"


def load_warning(threads: Optional[int]) -> Optional[str]:
    """A message if the 1-minute load average says other processes already occupy the cores we need."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    free = cpus - load
    need = threads or cpus
    if free < need - 0.5:
        return (
            f"load average {load:.2f} on {cpus} CPUs before the benchmark started: fewer than the {need} "
            "cores this run uses are idle, so absolute timings are inflated (ratios are less affected)"
        )
    return None


def _git_commit() -> Optional[str]:
    try:
        run = dict(cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run)
        dirty = subprocess.run(["git", "status", "--porcelain"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def gemm_gflops(device: str, n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of an fp32 (n x n) @ (n x n) ``torch.mm`` (2 n^3 FLOPs): what this machine can do."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e9


def hardware_info(device: str) -> dict[str, Any]:
    """Machine, library versions and date, stored with every result."""
    from mvit_det.utils.references import reference_version

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **{k: v for k, v in cpu_info().items() if k not in ("torch", "threads")},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_info()["cpu_model"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "mvit_det_commit": _git_commit(),
    }
    for lib in ("timm", "mmpretrain", "detectron2", "fvcore"):
        info[lib] = reference_version(lib)
    return info


# =============================================================================================
# Peak memory
# =============================================================================================
def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so an earlier model's freed memory cannot hide this one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_kind(device: str) -> str:
    if device == "cuda":
        return "cuda max_memory_allocated above the bytes allocated before the step"
    return "peak RSS (VmHWM) above the RSS before the step"


def measure_peak_memory(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Extra bytes that one call of ``fn`` needs at its peak (see the module docstring), or None."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    _release_free_heap()
    if not _reset_peak_rss():
        return None
    base = _proc_status_bytes("VmRSS:")
    fn()
    peak = _proc_status_bytes("VmHWM:")
    if base is None or peak is None:
        return None
    return float(peak - base)


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
    from detectron2.structures import BitMasks, Boxes, Instances

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
        return torch.compile(model)


class ClsWorkload(Workload):
    references = ("timm", "mmpretrain")

    def __init__(self, s: Settings):
        super().__init__(s)
        if s.arch == "H":
            raise ValueError(
                "--task cls supports --arch T/S/B/L; MViTv2-H exists here only as a detection backbone "
                "(no reference implements an in1k MViTv2-H classifier)."
            )
        if s.img_size[0] != s.img_size[1]:
            raise ValueError(f"--task cls needs a square --img-size (timm builds for one side), got {s.img_size}.")
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(s.batch_size, 3, *s.img_size, generator=g).to(self.device)

    def build_ours(self) -> nn.Module:
        from mvit_det.models import get_card

        # The released in1k model of this size (L widens in the MLP), with rel-pos tables sized for the
        # input so that timm, which cannot resize them at run time, runs the same network.
        card = get_card(f"mvitv2-{self.s.size_name}_3rdparty_in1k")
        return card.build(pretrain_img_size=self.s.img_size[0])

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        from mvit_det.utils import references

        return {"timm": references.timm_classifier, "mmpretrain": references.mmpretrain_classifier}[library](ours)

    def make_step(self, model: nn.Module) -> Callable[[], Any]:
        def step() -> Tensor:
            with precision(self.s, grad=False):
                return model(self.x)

        return step

    def outputs(self, model: nn.Module, dtype: str) -> list[Tensor]:
        with precision(replace(self.s, dtype=dtype), grad=False):
            return [model(self.x).float()]

    def flops(self, ours: nn.Module) -> tuple[Optional[float], str]:
        from mvit_det.utils.flops import flop_count

        total = flop_count(ours, self.x[:1]).total()
        return float(total), "fvcore (mvit_det.utils.flops), multiply-accumulates per image"


class DetBackboneWorkload(Workload):
    references = ("detectron2",)

    def __init__(self, s: Settings):
        super().__init__(s)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(s.batch_size, 3, *s.img_size, generator=g).to(self.device)

    def build_ours(self) -> nn.Module:
        from mvit_det.detection import MViTv2Backbone

        return MViTv2Backbone(self.s.size_name)

    def build_reference(self, library: str, ours: nn.Module) -> nn.Module:
        from mvit_det.utils.references import detectron2_mvit

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
        from mvit_det.utils.flops import flop_count

        total = flop_count(ours, self.x[:1]).total()
        return float(total), "fvcore (mvit_det.utils.flops), multiply-accumulates per image"


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
    """Mask R-CNN as configured by configs/mvitv2_t_maskrcnn.py (backbone size from ``--arch``)."""

    references = ("detectron2",)

    def __init__(self, s: Settings):
        super().__init__(s)
        h, w = s.img_size
        self.inputs = [
            {"image": _natural_image(h, w, flip=bool(i % 2)).to(self.device), "height": h, "width": w}
            for i in range(s.batch_size)
        ]

    def build_ours(self) -> nn.Module:
        from detectron2.config import LazyConfig, instantiate

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
        from mvit_det.utils.references import detectron2_mask_rcnn

        return detectron2_mask_rcnn(ours)

    def compile(self, model: nn.Module) -> nn.Module:
        # The detector's heads are dynamic (data-dependent proposal counts); compile the trunk, which is
        # where the implementations differ.
        model.backbone.bottom_up = torch.compile(model.backbone.bottom_up)
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
        from mvit_det.utils.flops import flop_count

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
        from mvit_det.utils.references import detectron2_mask_rcnn

        return {f"{library}+ckpt": lambda ours: detectron2_mask_rcnn(ours, act_checkpoint=True)}

    def _loss(self, model: nn.Module) -> Tensor:
        from detectron2.utils.events import EventStorage

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
        from detectron2.utils.events import EventStorage

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


# =============================================================================================
# The benchmark
# =============================================================================================
@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Optional[Callable[[], Any]] = None


def time_round_robin(
    steps: dict[str, Callable[[], Any]], warmup: int, iters: int, device: str, desc: str = ""
) -> dict[str, list[float]]:
    """Run ``warmup + iters`` rounds; each round runs every step once, in order. Returns the seconds of the
    last ``iters`` rounds per name."""
    from tqdm import tqdm

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    total = (warmup + iters) * len(steps)
    with tqdm(total=total, desc=desc or "benchmark", unit="step", file=sys.stderr, leave=False) as bar:
        for r in range(warmup + iters):
            for name, step in steps.items():
                bar.set_postfix_str(f"{'warm-up' if r < warmup else 'timed'} {name}")
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
                bar.update()
    return times


def _latency_ms(times: Sequence[float]) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64) * 1e3
    return {
        "p50": percentile(t, 50),
        "p90": percentile(t, 90),
        "p99": percentile(t, 99),
        "mean": float(t.mean()),
        "min": float(t.min()),
        "cv": float(t.std() / t.mean()) if len(t) > 1 else 0.0,
    }


def build_contenders(wl: Workload, only: Optional[str] = None) -> tuple[list[Contender], list[dict[str, str]]]:
    """Ours (random informative weights), its variants, and every installed reference with ours' weights.

    ``only``: build just that contender (ours is still built, to supply the weights, but not returned).
    """
    from mvit_det.utils.references import ReferenceUnavailable, randomize_

    torch.manual_seed(0)
    ours = randomize_(wl.build_ours()).to(wl.device)
    ours.train(wl.grad)
    wanted = lambda name: only is None or only == name  # noqa: E731
    contenders = [Contender(OURS, ours)] if wanted(OURS) else []
    contenders += [Contender(n, m) for n, m in wl.variants(ours).items() if wanted(n)]
    skipped = []
    for lib in wl.references:
        builders = {lib: lambda m, lib=lib: wl.build_reference(lib, m), **wl.reference_variants(lib)}
        for name, build in builders.items():
            if not wanted(name):
                continue
            try:
                contenders.append(Contender(name, build(ours).train(wl.grad)))
            except ReferenceUnavailable as e:
                skipped.append({"name": name, "reason": str(e)})
                if name == lib:
                    break  # no library, no variants of it either
    return contenders, skipped


def run_benchmark(s: Settings, progress_desc: str = "") -> dict[str, Any]:
    """Benchmark one configuration; returns the JSON-ready result (see ``--out-json``)."""
    wl = WORKLOADS[s.task](s)
    contenders, skipped = build_contenders(wl)
    warnings: list[str] = []

    # 1. Numerics, eager, before any training step changes the weights.
    ours = contenders[0]
    numerics: dict[str, dict[str, float]] = {c.name: {} for c in contenders}
    dtypes = ["fp32"] + ([s.dtype] if s.dtype != "fp32" else [])
    for dtype in dtypes:
        ref_out = wl.outputs(ours.model, dtype)
        for c in contenders[1:]:
            numerics[c.name][dtype] = max_rel_diff(ref_out, wl.outputs(c.model, dtype))
    for c in contenders[1:]:
        if not numerics[c.name]["fp32"] < NUMERICS_TOL:
            warnings.append(
                f"numerics: {c.name} differs from {OURS} by {numerics[c.name]['fp32']:.3g} (max relative, fp32) "
                f"> {NUMERICS_TOL:g}"
            )
    flops, flops_note = wl.flops(ours.model)

    # 2. Timing, interleaved.
    for c in contenders:
        if s.compile:
            c.model = wl.compile(c.model)
        c.step = wl.make_step(c.model)
    times = time_round_robin({c.name: c.step for c in contenders}, s.warmup, s.iters, s.device, progress_desc)

    # 3. Peak memory of one more step each (not timed).
    memory = {c.name: measure_peak_memory(c.step, s.device) for c in contenders}

    rows = []
    ours_p50 = percentile(times[OURS], 50)
    for c in contenders:
        lat = _latency_ms(times[c.name])
        noisy = noise_warning(times[c.name])
        if noisy:
            warnings.append(f"{c.name}: {noisy}")
        mem = memory[c.name]
        rows.append(
            {
                "name": c.name,
                "images_per_s": wl.images_per_step / (lat["p50"] / 1e3),
                "latency_ms": lat,
                "times_s": times[c.name],
                "peak_memory_mb": None if mem is None else mem / 2**20,
                "ours_speedup": lat["p50"] / (ours_p50 * 1e3),
                "memory_ratio": None if mem is None or not memory[OURS] else mem / memory[OURS],
                "max_rel_diff": numerics[c.name] or None,
                "noise_warning": noisy,
            }
        )
    result = {
        "task": s.task,
        "title": s.title,
        "settings": {**asdict(s), "img_size": list(s.img_size)},
        "images_per_step": wl.images_per_step,
        "gflops_per_image": None if flops is None else flops / 1e9,
        "flops_note": flops_note,
        "memory_kind": memory_kind(s.device),
        "numerics_tolerance_fp32": NUMERICS_TOL,
        "models": rows,
        "skipped": skipped,
        "warnings": warnings,
    }
    if s.task == "det-train" and s.act_checkpoint and s.device == "cpu":
        result["fresh_process_memory"] = {
            c.name: fresh_process_peak_rss(s, c.name) for c in contenders
        }
    return result


# ---------------------------------------------------------------------------------------------
# Activation-checkpointing memory in fresh processes (CPU)
# ---------------------------------------------------------------------------------------------
def _settings_argv(s: Settings) -> list[str]:
    h, w = s.img_size
    argv = [
        "--task", s.task, "--arch", s.arch, "--batch-size", str(s.batch_size), "--img-size", f"{h}x{w}",
        "--dtype", s.dtype, "--device", s.device,
    ]
    if s.threads:
        argv += ["--threads", str(s.threads)]
    if s.act_checkpoint:
        argv.append("--act-checkpoint")
    if s.compile:
        argv.append("--compile")
    if s.opts:
        argv += ["--opts", *s.opts]
    return argv


def fresh_process_peak_rss(s: Settings, name: str) -> Optional[float]:
    """Peak RSS (MB) that two training steps of contender ``name`` add, measured in a new process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *_settings_argv(s), "--memory-probe", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_rss_mb"]
    raise RuntimeError(f"memory probe for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def memory_probe(s: Settings, name: str) -> dict[str, Any]:
    """Child side of ``fresh_process_peak_rss``: build only contender ``name`` and run 2 training steps.

    The peak is VmHWM above the resident set before the steps, after resetting VmHWM through
    /proc/self/clear_refs, so that building the models (ours is built too, for the weights) cannot be what the
    peak records. ``ru_maxrss`` is no substitute: the kernel seeds it at exec with the *parent's* high-water
    mark, so under a large parent process every probe would report the parent's peak.
    """
    wl = WORKLOADS[s.task](s)
    contenders, skipped = build_contenders(wl, only=name)
    if not contenders:
        raise SystemExit(f"memory probe: no contender {name!r} ({skipped})")
    model = wl.compile(contenders[0].model) if s.compile else contenders[0].model
    del contenders
    step = wl.make_step(model)
    _release_free_heap()
    if not _reset_peak_rss():
        raise SystemExit("memory probe: /proc/self/clear_refs is not writable, so the peak cannot be isolated")
    base = _proc_status_bytes("VmRSS:")
    for _ in range(2):  # the second step also holds the AdamW state created by the first
        step()
    peak = _proc_status_bytes("VmHWM:")
    if base is None or peak is None:
        raise SystemExit("memory probe: /proc/self/status has no VmRSS/VmHWM")
    return {"name": name, "peak_rss_mb": (peak - base) / 2**20}


# =============================================================================================
# Reports
# =============================================================================================
def _fmt(x: Optional[float], spec: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _version(name: str, hw: dict[str, Any]) -> str:
    lib = name.split("+")[0]
    if lib == OURS:
        return f"{name} (ours)"
    v = hw.get(lib)
    return f"{name} {v}" if v else name


def run_markdown(run: dict[str, Any], hw: dict[str, Any]) -> str:
    dtype = run["settings"]["dtype"]
    diff_cols = ["max rel diff fp32"] + ([f"max rel diff {dtype}"] if dtype != "fp32" else [])
    head = ["implementation", "img/s", "p50 ms", "p90 ms", "p99 ms", "peak mem MB", *diff_cols, "speed-up of ours",
            "GFLOP/s (% of fp32 mm)"]
    gemm = hw.get("gemm_fp32_gflops")
    fresh = run.get("fresh_process_memory")
    if fresh:
        head.insert(6, "fresh-process peak MB")
    lines = [f"### {run['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in run["models"]:
        diffs = m["max_rel_diff"] or {}
        cells = [
            _version(m["name"], hw),
            _fmt(m["images_per_s"], ".3g"),
            _fmt(m["latency_ms"]["p50"], ".1f"),
            _fmt(m["latency_ms"]["p90"], ".1f"),
            _fmt(m["latency_ms"]["p99"], ".1f"),
            _fmt(m["peak_memory_mb"], ".0f"),
        ]
        if fresh:
            cells.append(_fmt(fresh.get(m["name"]), ".0f"))
        cells += [_fmt(diffs.get(d), ".1e") for d in (["fp32"] + ([dtype] if dtype != "fp32" else []))]
        cells.append("1.00 (ref.)" if m["name"] == OURS else f"{m['ours_speedup']:.2f}x")
        # The same network whoever implements it: 2 FLOPs per multiply-accumulate of ours.
        rate = None if run["gflops_per_image"] is None else 2 * run["gflops_per_image"] * m["images_per_s"]
        share = f" ({100 * rate / gemm:.0f}%)" if rate is not None and gemm else ""
        cells.append(_fmt(rate, ".3g") + share)
        lines.append("| " + " | ".join(cells) + " |")
    gf = run["gflops_per_image"]
    lines += [
        "",
        f"GFLOPs per image (ours): {_fmt(gf, '.2f')} ({run['flops_note']}). "
        f"Speed-up of ours = reference p50 / ours p50; img/s from p50. Peak memory: {run['memory_kind']}.",
    ]
    if fresh:
        lines.append("Fresh-process peak: extra peak RSS of two training steps, each variant alone in a new process.")
    for sk in run["skipped"]:
        lines.append(f"- skipped {sk['name']}: {sk['reason']}")
    for w in run["warnings"]:
        lines.append(f"- **warning**: {w}")
    return "\n".join(lines)


def scaling_markdown(runs: list[dict[str, Any]]) -> str:
    """One table per task: time and FLOPs per input size, ours vs each reference."""
    out = []
    for task in ("cls", "det-backbone"):
        task_runs = [r for r in runs if r["task"] == task]
        if not task_runs:
            continue
        names = [m["name"] for m in task_runs[0]["models"]]
        refs = names[1:]
        s0 = task_runs[0]["settings"]
        head = ["input", "GFLOPs/img", f"{OURS} ms"]
        for r in refs:
            head += [f"{r} ms", f"{r} / ours"]
        head.append("max rel diff fp32")
        what = "classification" if task == "cls" else "detection backbone"
        mode = "torch.compile" if s0["compile"] else "eager"
        where = f"cpu, {s0['threads']} threads" if s0["device"] == "cpu" else s0["device"]
        out += [
            f"### MViTv2-{s0['arch']} {what}: time (p50 per batch of {s0['batch_size']}) and FLOPs vs input size "
            f"({s0['dtype']}, {mode}, {where})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for run in task_runs:
            by_name = {m["name"]: m for m in run["models"]}
            h, w = run["settings"]["img_size"]
            cells = [f"{h}x{w}", _fmt(run["gflops_per_image"], ".1f"), _fmt(by_name[OURS]["latency_ms"]["p50"], ".1f")]
            worst = 0.0
            for r in refs:
                m = by_name.get(r)
                cells += [_fmt(m and m["latency_ms"]["p50"], ".1f"), f"{m['ours_speedup']:.2f}x" if m else "–"]
                if m and m["max_rel_diff"]:
                    worst = max(worst, m["max_rel_diff"]["fp32"])
            cells.append(_fmt(worst, ".1e") if refs else "–")
            out.append("| " + " | ".join(cells) + " |")
        notes = [f"- skipped {sk['name']}: {sk['reason']}" for sk in task_runs[0]["skipped"]]
        out += ([""] + notes if notes else []) + [""]
    return "\n".join(out).rstrip()


def report_markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        f"## MViTv2 benchmark ({hw['date']})",
        "",
        f"{hw['device_name']} ({hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads), torch {hw['torch']}, "
        f"python {hw['python']}, mvit-det {hw['mvit_det_commit'] or 'unknown commit'}",
        "",
        f"CPU {hw['cpu_model']}: {hw['cpu_isa']}, torch kernels {hw['torch_cpu_capability']}"
        + (f" (ONEDNN_MAX_CPU_ISA={hw['onednn_max_cpu_isa']})" if hw.get("onednn_max_cpu_isa") else "")
        + f", native bf16 {'yes' if hw['native_bf16'] else 'no'}; fp32 2048x2048 torch.mm "
        f"{_fmt(hw.get('gemm_fp32_gflops'), '.0f')} GFLOP/s ({hw['device']}).",
        "",
    ]
    if report["mode"] == "scaling":
        lines.append(scaling_markdown(report["runs"]))
    else:
        lines += [run_markdown(r, hw) for r in report["runs"]]
    if report["load_warning"]:
        lines.append(f"- **warning**: {report['load_warning']}")
    if report["noisy"]:
        lines.append(
            "\n**The machine was noisy during this run; repeat it on an idle machine before quoting numbers.**"
        )
    return "\n".join(lines) + "\n"


def run_report(settings: Sequence[Settings], mode: str = "single") -> dict[str, Any]:
    """Run every configuration and assemble the JSON report (hardware, runs, warnings)."""
    s0 = settings[0]
    early = load_warning(s0.threads if s0.device == "cpu" else None)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if s0.device == "cpu" and s0.threads:
        torch.set_num_threads(s0.threads)
    gemm = gemm_gflops(s0.device)
    runs = []
    for i, s in enumerate(settings):
        desc = f"[{i + 1}/{len(settings)}] {s.task} {s.img_size[0]}x{s.img_size[1]}" if len(settings) > 1 else s.task
        runs.append(run_benchmark(s, desc))
    warnings = [early] if early else []
    warnings += [f"{r['task']} {r['settings']['img_size']}: {w}" for r in runs for w in r["warnings"]]
    return {
        "mode": mode,
        "hardware": {**hardware_info(s0.device), "gemm_fp32_gflops": gemm, "load_average_1min_before": load_before},
        "runs": runs,
        "load_warning": early,
        "warnings": warnings,
        # Measured spread only: the load average also counts this script's own previous runs.
        "noisy": any(m["noise_warning"] for r in runs for m in r["models"]),
    }


# =============================================================================================
# Command line
# =============================================================================================
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=TASKS, default="cls")
    p.add_argument("--arch", choices=list(ARCH_NAMES), default="T", help="model size (cls: T/S/B/L)")
    p.add_argument("--batch-size", type=_positive, help="images per step (default: cls 8, det-train 2, else 1)")
    p.add_argument("--img-size", type=parse_img_size,
                   help="SIDE or HxW (default: cls 224, det-backbone/det-train 1024, det-model 800x1088)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast precision (weights stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (det tasks: the trunk)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads (default 2 on CPU; unchanged on CUDA)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed rounds per model")
    p.add_argument("--iters", type=_positive, default=10, help="timed rounds per model")
    p.add_argument("--act-checkpoint", action="store_true",
                   help="det-train: also run the activation-checkpointed variants and compare memory and time")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="det-model/det-train: overrides of configs/mvitv2_t_maskrcnn.py (the detectron2 "
                        "reference copies the RPN/RoI-head sizes and test thresholds), "
                        "e.g. model.roi_heads.batch_size_per_image=128")
    p.add_argument("--scaling", action="store_true",
                   help="cls and det-backbone at every --scaling-sizes (batch --batch-size, default 1): "
                        "the README table")
    p.add_argument("--scaling-sizes", type=lambda t: [parse_img_size(x)[0] for x in t.split(",")],
                   default=list(SCALING_SIZES), help="comma-separated square sizes for --scaling")
    p.add_argument("--out-json", type=Path, help="write the full report (every step time) as JSON")
    p.add_argument("--out-md", type=Path, help="also write the Markdown tables to this file")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: child of fresh_process_peak_rss
    return p


def settings_from_args(args: argparse.Namespace) -> list[Settings]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False; use --device cpu.")
    if args.dtype == "fp16" and args.device == "cpu" and args.task == "det-train":
        raise SystemExit("error: fp16 training needs CUDA (GradScaler); use --dtype bf16 on the CPU.")
    if args.act_checkpoint and (args.task != "det-train" or args.scaling):
        raise SystemExit("error: --act-checkpoint applies to --task det-train only.")
    if args.opts and (args.task not in ("det-model", "det-train") or args.scaling):
        raise SystemExit("error: --opts applies to --task det-model and det-train only.")
    threads = args.threads if args.threads else (2 if args.device == "cpu" else None)
    common = dict(arch=args.arch, dtype=args.dtype, compile=args.compile, device=args.device, threads=threads,
                  warmup=args.warmup, iters=args.iters)
    if args.scaling:
        batch = args.batch_size or 1
        return [
            Settings(task=task, batch_size=batch, img_size=(size, size), **common)
            for task in ("cls", "det-backbone")
            for size in args.scaling_sizes
        ]
    return [
        Settings(
            task=args.task,
            batch_size=args.batch_size or DEFAULT_BATCH[args.task],
            img_size=args.img_size or DEFAULT_SIZE[args.task],
            act_checkpoint=args.act_checkpoint,
            opts=tuple(args.opts),
            **common,
        )
    ]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if settings[0].threads:
        torch.set_num_threads(settings[0].threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(settings[0], args.memory_probe)))
        return {}
    try:
        report = run_report(settings, mode="scaling" if args.scaling else "single")
    except (ValueError, FileNotFoundError) as e:  # bad settings, explained by the workload
        raise SystemExit(f"error: {e}") from None
    text = report_markdown(report)
    print(text)
    if args.out_md:
        args.out_md.write_text(text)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
