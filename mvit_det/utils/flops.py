"""FLOP counting with fvcore, made to count fused attention like the explicit matmuls it replaces.

MViTv2 itself needs nothing special: under ``torch.jit`` tracing (which fvcore uses) its attention is written
with ``aten::matmul``, so plain ``FlopCountAnalysis`` and detectron2's ``analyze_model.py`` give the published
figures. The handles below are for the reference models (timm, mmpretrain) that call
``aten::scaled_dot_product_attention`` or ``aten::baddbmm``, which fvcore would silently drop. Published MViTv2
numbers (official README, mmpretrain, timm) count those matmuls, and like them we count one multiply-accumulate
as one FLOP.
"""
from __future__ import annotations

from math import prod
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn


def _sdpa_flop(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (get_shape(t) for t in inputs[:3])
    n_q, c = q[-2], q[-1]
    n_k, c_v = k[-2], v[-1]
    batch = prod(q[:-2])
    return batch * n_q * n_k * (c + c_v)


def _baddbmm_flop(inputs: list[Any], outputs: list[Any]) -> int:
    (batch, n, k), m = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return batch * n * k * m


def flop_count(model: nn.Module, inputs: torch.Tensor | tuple) -> FlopCountAnalysis:
    """An fvcore ``FlopCountAnalysis`` that also counts ``scaled_dot_product_attention`` and ``baddbmm``.

    ``.total()`` is in multiply-accumulates, the unit of every published MViTv2 "FLOPs" figure.
    """
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop)
    analysis.set_op_handle("aten::baddbmm", _baddbmm_flop)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis
