"""CPU fast paths and what this CPU can run: oneDNN's fused linear, native bfloat16, attention.

What a CPU can run is decided once per process by probing a tiny call, not by reading CPU flags: settings such
as ``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY`` switch off kernels that the CPU has, and oneDNN's bf16
inner product cannot even be created on a CPU without AVX-512 bf16 (or AMX). Where bf16 is asked for on such a
CPU, emulated bf16 GEMMs run 6-20x slower than fp32, so MViTv2 computes in fp32 there and returns bf16 outputs
(see :func:`bf16_fallback_needed`); this is logged once per process.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call runs on

__all__ = [
    "attention", "bf16_as_fp32", "bf16_fallback_needed", "cpu_info", "cpu_isa", "depthwise_conv", "gelu_post_op_pays",
    "linear", "log_bf16_fallback", "native_bf16", "onednn_linear_ok",
]

logger = logging.getLogger(__name__)

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def onednn_linear_ok(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear runs in ``dtype`` on this CPU and gives the right answer (probed once)."""
    if dtype not in _ONEDNN_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((4, 32), (16, 32), (16,)))
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the probe may first run inside autocast
        try:
            out = torch.ops.mkldnn._linear_pointwise(x.to(dtype), w.to(dtype), b.to(dtype), "none", [], "")
        except RuntimeError:  # "could not create a primitive descriptor": no kernel for this dtype on this ISA
            return False
        tol = 1e-4 if dtype == torch.float32 else 0.1
        return bool(torch.allclose(out.float(), F.linear(x, w, b), atol=tol, rtol=tol))


def native_bf16() -> bool:
    """True when this CPU runs bf16 GEMMs natively (AVX-512 bf16 or AMX, and not capped by the environment)."""
    return onednn_linear_ok(torch.bfloat16)


def _proc_cpuinfo() -> dict[str, str]:
    """The fields of /proc/cpuinfo, each as it first appears (empty where there is none, as on macOS)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_model(proc: dict[str, str]) -> str:
    return proc.get("model name") or platform.processor() or platform.machine()


def _isa_name(amx: bool, avx512: bool, avx2: bool) -> str:
    return "AMX" if amx else "AVX-512" if avx512 else "AVX2" if avx2 else "other"


def cpu_isa(proc: Optional[dict[str, str]] = None) -> str:
    """The vector ISA the CPU itself has (not what the environment caps torch to): AMX, AVX-512, AVX2 or other.

    Read from CPUID through torch's cpuinfo, the source oneDNN and ATen choose their kernels from. /proc/cpuinfo is
    only the fallback (a torch without these probes): it is absent on macOS and Windows, and under an emulator such
    as QEMU's user mode it describes the host, not the CPU the program runs on.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_supported",
                                                           "_is_avx2_supported")]
    if all(callable(p) for p in probes):
        return _isa_name(*(bool(p()) for p in probes))
    flags = set((_proc_cpuinfo() if proc is None else proc).get("flags", "").split())
    return _isa_name("amx_bf16" in flags, "avx512f" in flags, "avx2" in flags)


def cpu_info() -> dict:
    """The CPU as the numbers should be read: model, vector ISA that torch uses, native bf16 or not."""
    proc = _proc_cpuinfo()
    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "cpu_model": _cpu_model(proc),
        "cpu_isa": cpu_isa(proc),
        "torch_cpu_capability": capability,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        "native_bf16": native_bf16(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


_fallback_logged = False


def bf16_fallback_needed(x: Tensor, param_dtype: torch.dtype) -> bool:
    """True when bf16 is asked for (autocast or bf16 weights/input) on a CPU without native bf16.

    The caller then runs the network in fp32 and casts its outputs to bf16: faster than emulated bf16 and at
    least as accurate. Tracing and ``torch.compile`` keep the ops as written (they record, not run, the model).
    """
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    wants_bf16 = (
        (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        or x.dtype == torch.bfloat16
        or param_dtype == torch.bfloat16
    )
    if not wants_bf16 or native_bf16():
        return False
    log_bf16_fallback("MViTv2 computes in float32 and returns bfloat16 outputs")
    return True


def log_bf16_fallback(path: str) -> None:
    """Say once per process that bf16 was asked for without native bf16, and which path runs instead."""
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning(
            "bfloat16 was requested, but this CPU has no native bf16 kernels (%s, torch capability %s): "
            "%s (faster than emulated bf16 here).",
            _cpu_model(_proc_cpuinfo()), torch.backends.cpu.get_cpu_capability(), path,
        )


def _onednn_dtype(x: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """The dtype for oneDNN's fused linear, or None when the standard ops must be used."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        # autograd, torch.compile (which fuses by itself) and tracing for export take the standard op
        return None
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if dtype not in _ONEDNN_DTYPES or (weight.dtype != dtype and not autocast):
        return None
    return dtype if onednn_linear_ok(dtype) else None


@functools.lru_cache(maxsize=None)
def gelu_post_op_pays() -> bool:
    """Whether oneDNN's exact-GELU post-op beats the GEMM followed by ATen's in-place GELU on this CPU.

    Only measured to pay with AVX-512 kernels, where the two are even. With AVX2 kernels the post-op made MViTv2-T's
    fc1 layers (batch 8, 224, one thread, capped to AVX2 on an AMD EPYC) take 274 ms against 236 ms with ``gelu_``
    after the GEMM, with the same values.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def cast_weight(p: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``p`` in ``dtype`` for the fused kernel. Cast per call, as autocast does: a cache keyed on the tensor
    cannot see every way a user updates weights (``p.data.copy_`` changes neither version nor pointer)."""
    return p if p is None or dtype is None or p.dtype == dtype else p.to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool = False) -> Tensor:
    """``F.linear`` (then exact GELU when ``gelu``), fused by oneDNN for CPU inference.

    oneDNN adds the bias and applies the GELU inside the GEMM instead of in extra passes over memory,
    which on CPU is worth about 1.5x for the linear layers that dominate MViTv2's cost. The result is the
    same as the unfused ops (tested); training, CUDA and torch.compile use the standard ops.
    """
    dtype = _onednn_dtype(x, weight)
    if dtype is not None:
        fuse_gelu = gelu and gelu_post_op_pays()
        out = torch.ops.mkldnn._linear_pointwise(
            x.to(dtype), cast_weight(weight, dtype), cast_weight(bias, dtype),
            "gelu" if fuse_gelu else "none", [], "none" if fuse_gelu else "",
        )
        return torch.ops.aten.gelu_(out) if gelu and not fuse_gelu else out
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(c) + bias) v for (B, heads, Nq | Nk, c) inputs and a (B, heads, Nq, Nk) bias.

    ``F.scaled_dot_product_attention`` for inference and GPU training. Two cases use plain batched matmuls:
    CPU autograd, where PyTorch's fused CPU kernel cannot return the gradient of ``attn_mask`` (the rel-pos
    bias is learned) and SDPA's math fallback adds three extra passes over the attention matrix; and
    ``torch.jit`` tracing, which fvcore (and detectron2's ``analyze_model.py``) use to count FLOPs and which
    would otherwise see one opaque fused op and count nothing for it.
    """
    if torch.jit.is_tracing():  # ops that every fvcore-based counter knows (aten::matmul)
        attn = (torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(dim=-1)
        return torch.matmul(attn, v)
    if q.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        attn = torch.baddbmm(
            bias.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=q.shape[-1] ** -0.5
        ).softmax(dim=-1)
        return torch.bmm(attn, v.flatten(0, 1)).view(*q.shape[:-1], v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


# Maps of at most this many positions take the per-tap weight gradient in CPU training (see depthwise_conv).
TINY_MAP = 4
_SUM_DTYPES = (torch.float32, torch.float64)  # bf16 sums would lose what oneDNN's fp32 accumulation keeps


class _TinyMapDepthwise(torch.autograd.Function):
    """A depthwise conv whose weight gradient is a sum per kernel tap (input gradient and forward: the usual ops)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: tuple, padding: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors
        (sh, sw), (ph, pw) = ctx.stride, ctx.padding
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                gy, x, weight, None, [sh, sw], [ph, pw], [1, 1], False, [0, 0], weight.shape[0], [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            # (B, H, W, C) views: the pooled maps are channels-last, so each tap's sum runs over contiguous C
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
            g = gy.permute(0, 2, 3, 1)
            oh, ow = g.shape[1], g.shape[2]
            kh, kw = weight.shape[2], weight.shape[3]
            taps = [
                (g * xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw]).sum((0, 1, 2))
                for i in range(kh) for j in range(kw)
            ]
            gw = torch.stack(taps, 1).view_as(weight)
        return gx, gw, None, None


def depthwise_conv(x: Tensor, weight: Tensor, stride: tuple, padding: tuple) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding, groups=C)`` for a (C, 1, kh, kw) ``weight``.

    On maps of at most ``TINY_MAP`` positions (the last stages of a 32x32 input, as in the digits pre-training of
    ``make demo``) oneDNN computes the weight gradient with a slow kernel: at batch 32, 3-7 ms per call capped to
    AVX2 and about 1 ms on AVX-512, against 0.14-0.31 ms for one sum per kernel tap. CPU fp32 training on such
    maps (float32 or float64) takes the sums; everything else runs ``F.conv2d``. The gradients agree to rounding
    (tested in float64).
    """
    tiny = (
        x.device.type == "cpu" and x.shape[2] * x.shape[3] <= TINY_MAP and torch.is_grad_enabled()
        and weight.requires_grad and x.dtype == weight.dtype and x.dtype in _SUM_DTYPES
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
    )
    if tiny:
        return _TinyMapDepthwise.apply(x, weight, tuple(stride), tuple(padding))
    return F.conv2d(x, weight, None, stride, padding, groups=weight.shape[0])


def _to_dtype(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, Tensor):
        return out.to(dtype)
    if isinstance(out, dict):
        return {k: _to_dtype(v, dtype) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_to_dtype(v, dtype) for v in out)
    return out


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def bf16_as_fp32(method: Callable) -> Callable:
    """Run ``method`` in fp32 and return bf16 outputs when bf16 is asked for on a CPU without native bf16.

    Emulated bf16 GEMMs are 6-20x slower than fp32 there, and oneDNN's fused bf16 kernel cannot be created at
    all. bf16 weights are viewed as fp32 copies for the call (gradients still reach the originals).
    """

    @functools.wraps(method)
    def wrapper(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(x, Tensor) and x.is_floating_point()) or not bf16_fallback_needed(
            x, _param_dtype(self)
        ):
            return method(self, x, *args, **kwargs)
        state = {n: t.float() if t.is_floating_point() else t for n, t in self.state_dict(keep_vars=True).items()}
        with torch.autocast("cpu", enabled=False), _reparametrize_module(self, state):
            out = method(self, x.float(), *args, **kwargs)
        return _to_dtype(out, torch.bfloat16)

    return wrapper
