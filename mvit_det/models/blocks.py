"""One MViTv2 block: multi-head pooling attention and the pre-norm block around it.

Attention runs through ``F.scaled_dot_product_attention``; the decomposed relative-position term is
passed as an additive mask, which is mathematically identical to the reference
``softmax(q k^T * scale + rel)`` formulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fastpath import _onednn_dtype, attention, cast_weight, depthwise_conv, linear
from .layers import LARGEST_HEAP_BLOCK, DropPath, Mlp, rel_pos_bias, window_partition, window_unpartition

__all__ = ["BlockSpec", "MultiScaleBlock", "PoolingAttention"]

MLP_RATIO = 4
# Inference builds the (B, heads, Nq, Nk) rel-pos bias in chunks of at most BIAS_CHUNK_BYTES once the whole would
# exceed BIAS_WHOLE_BYTES (at 1024x1024 the detection trunk's biases reach 134 MB, each a fresh mmap that glibc's heap
# does not reuse: see LARGEST_HEAP_BLOCK). Measured capped to AVX2 on 2 vCPUs: the trunk's peak memory at 1024x1024
# falls from 1007 MB to 664-675 MB; the large attention calls run 10-30% faster alone, the whole trunk within
# run-to-run noise. The values are the same bit for bit.
BIAS_CHUNK_BYTES = 16 << 20
BIAS_WHOLE_BYTES = LARGEST_HEAP_BLOCK


@dataclass(frozen=True)
class BlockSpec:
    """Geometry of one block, derived from the size and the mode (see ``block_specs``)."""

    dim: int
    dim_out: int
    num_heads: int
    stride_q: int
    stride_kv: int
    expand_attn: bool
    window_size: int  # 0: global attention; else window side in pre-pooling tokens
    rel_pos_grid: int  # token-grid side that sizes the rel-pos tables (the pre-training grid)

    @property
    def attn_dim(self) -> int:
        return self.dim_out if self.expand_attn else self.dim


class PoolingAttention(nn.Module):
    """Multi-head pooling attention with decomposed relative position and residual pooling.

    q, k and v are pooled by a depthwise 3x3 conv (shared by all heads) and LayerNorm-ed; q with
    ``stride_q`` (the block's output resolution), k and v with ``stride_kv``. With ``window_size`` > 0,
    attention is computed inside non-overlapping windows of the pooled maps (detection mode).

    Tokens stay in (B, N, heads, c) memory throughout: q/k/v come out of their own projections
    contiguous, pooling runs channels-last over all heads at once, and SDPA both accepts and returns that
    layout, so no transposing copies are needed.

    forward: (B, [1 +] H*W, dim) and (H, W) -> (B, [1 +] H'*W', dim_out) and (H', W').
    """

    def __init__(self, spec: BlockSpec, has_cls_token: bool, eps: float):
        super().__init__()
        dim_out = spec.attn_dim
        self.num_heads = spec.num_heads
        self.head_dim = dim_out // spec.num_heads
        self.has_cls_token = has_cls_token
        self.qkv = nn.Linear(spec.dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

        c = self.head_dim
        self.pool_q = nn.Conv2d(c, c, 3, stride=spec.stride_q, padding=1, groups=c, bias=False)
        self.pool_k = nn.Conv2d(c, c, 3, stride=spec.stride_kv, padding=1, groups=c, bias=False)
        self.pool_v = nn.Conv2d(c, c, 3, stride=spec.stride_kv, padding=1, groups=c, bias=False)
        self.norm_q = nn.LayerNorm(c, eps=eps)
        self.norm_k = nn.LayerNorm(c, eps=eps)
        self.norm_v = nn.LayerNorm(c, eps=eps)

        grid = spec.rel_pos_grid
        length = 2 * max(grid // spec.stride_q, grid // spec.stride_kv) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(length, c))
        self.rel_pos_w = nn.Parameter(torch.zeros(length, c))

        self.window_size = spec.window_size
        self.q_window = spec.window_size // spec.stride_q
        self.kv_window = spec.window_size // spec.stride_kv

    def _pool(self, x: Tensor, hw: tuple[int, int], pool: nn.Conv2d, norm: nn.LayerNorm) -> tuple[Tensor, tuple[int, int]]:
        """(B, [1 +] H*W, heads*c) -> (B, [1 +] H'*W', heads, c): depthwise conv per head, then LN."""
        b, _, hc = x.shape
        t = 1 if self.has_cls_token else 0
        sp = x[:, t:].reshape(b, hw[0], hw[1], hc).permute(0, 3, 1, 2)  # channels-last view
        # The kernel is shared by the heads; repeating it lets one grouped conv cover all of them.
        weight = pool.weight.repeat(self.num_heads, 1, 1, 1)
        sp = depthwise_conv(sp, weight, pool.stride, pool.padding)
        out_hw = (sp.shape[2], sp.shape[3])
        sp = sp.permute(0, 2, 3, 1).reshape(b, -1, hc)
        if t:
            sp = torch.cat((x[:, :1], sp), dim=1)
        return norm(sp.view(b, sp.shape[1], self.num_heads, self.head_dim)), out_hw

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        b = x.shape[0]
        dtype = _onednn_dtype(x, self.qkv.weight)
        # cast once before chunking, not per chunk view
        weight, bias = cast_weight(self.qkv.weight, dtype), cast_weight(self.qkv.bias, dtype)
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = bias.chunk(3)
        q, q_hw = self._pool(linear(x, w_q, b_q), hw, self.pool_q, self.norm_q)
        k, kv_hw = self._pool(linear(x, w_k, b_k), hw, self.pool_k, self.norm_k)
        v, _ = self._pool(linear(x, w_v, b_v), hw, self.pool_v, self.norm_v)
        # q, k, v: (B, [1 +] N, heads, c)

        if self.window_size:
            out = self._window_attention(q, k, v, q_hw, kv_hw)
        else:
            out = self._global_attention(q, k, v, q_hw, kv_hw)

        # Residual pooling; the class token is left out, as in the official code since 2022-08.
        if self.has_cls_token:
            out = torch.cat((out[:, :1], out[:, 1:] + q[:, 1:]), dim=1)
        else:
            out = out + q
        out = out.reshape(b, -1, self.num_heads * self.head_dim)
        return linear(out, self.proj.weight, self.proj.bias), q_hw

    def _global_attention(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw) -> Tensor:
        """(B, [1 +] N, heads, c) each -> (B, [1 +] Nq, heads, c)."""
        if not self.has_cls_token:
            return self._biased_attention(q, k, v, q_hw, kv_hw)
        bias = rel_pos_bias(q[:, 1:], q_hw, kv_hw, self.rel_pos_h, self.rel_pos_w)
        return _attend(q, k, v, F.pad(bias, (1, 0, 1, 0)))  # no positional bias to or from the class token

    def _biased_attention(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw, cols: Optional[int] = None,
                          k_real: Optional[tuple[int, int]] = None) -> Tensor:
        """(B, Nq, heads, c) queries, (B, Nk, heads, c) keys and values -> (B, Nq, heads, c), with the rel-pos bias;
        built in chunks of images, then of query rows, where it is large (see BIAS_CHUNK_BYTES). The queries are
        the first ``cols`` columns (default: all) of the first rows of the q grid; with ``k_real``, the keys are
        the real part of the kv grid and one zero key for its padding (see ``rel_pos_bias``)."""
        b, nq, heads = q.shape[:3]
        per_image = heads * nq * k.shape[1] * q.element_size()
        if b * per_image <= BIAS_WHOLE_BYTES or torch.is_grad_enabled() or torch.jit.is_tracing():
            return self._attend_rows(q, k, v, q_hw, kv_hw, 0, cols, k_real)
        images = max(1, BIAS_CHUNK_BYTES // per_image)
        q_w = q_hw[1] if cols is None else cols
        rows = nq // q_w
        row_step = rows if images > 1 else max(1, BIAS_CHUNK_BYTES * rows // per_image)
        parts = []
        for i in range(0, b, images):
            qi, ki, vi = q[i : i + images], k[i : i + images], v[i : i + images]
            parts.append(_cat([self._attend_rows(qi[:, r * q_w : (r + row_step) * q_w], ki, vi, q_hw, kv_hw, r, cols,
                                                 k_real) for r in range(0, rows, row_step)], 1))  # fmt: skip
        return _cat(parts, 0)

    def _attend_rows(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw, first_row: int = 0,
                     cols: Optional[int] = None, k_real: Optional[tuple[int, int]] = None) -> Tensor:
        """Queries are the rows ``first_row``.. (and the first ``cols`` columns) of the q grid: (B, rows * cols, heads,
        c) -> the same shape."""
        bias = rel_pos_bias(q, q_hw, kv_hw, self.rel_pos_h, self.rel_pos_w, first_row, cols, k_real)
        return _attend(q, k, v, bias)

    def _window_attention(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw) -> Tensor:
        """(B, N, heads, c) each -> (B, Nq, heads, c), attending within windows.

        detectron2's MViT pads the maps to whole windows and attends to the padding; its checkpoints were trained so.
        Only the real queries are computed here, because the padded ones' outputs are cut off again. The padded keys
        still count, but they are zero keys with zero values: in a window that has any, one zero key carries their
        summed weight (see ``rel_pos_bias``). Windows are taken in up to four groups of one shape each (the full ones,
        the last column, the last row, the corner). The toy recipe's maps (24x30-32x40 tokens in one 56-token window;
        80 real keys of 196) train 12-15% faster for the queries, then about 4% for the keys; the T trunk's attention
        work at 1024x1024 falls by 14% (inference 4-7% faster on the CPU, docs/performance.md).
        """
        if torch.jit.is_tracing():  # ONNX has no logaddexp: exports attend to the padding, as detectron2 does
            return self._padded_window_attention(q, k, v, q_hw, kv_hw)
        b, _, h, c = q.shape
        qw, kvw = self.q_window, self.kv_window
        q_map, k_map, v_map = q.view(b, *q_hw, h, c), k.view(b, *kv_hw, h, c), v.view(b, *kv_hw, h, c)
        rows = []
        for r0, nr, qr, kr in _window_groups(q_hw[0], kv_hw[0], qw, kvw):
            cols = []
            for c0, nc, qc, kc in _window_groups(q_hw[1], kv_hw[1], qw, kvw):
                q_win = _windows(q_map, r0, nr, c0, nc, qw, qr, qc)
                k_win, v_win = (_windows(t, r0, nr, c0, nc, kvw, kr, kc) for t in (k_map, v_map))
                k_real = None
                if (kr, kc) != (kvw, kvw):
                    k_real = (kr, kc)
                    k_win, v_win = F.pad(k_win, (0, 0, 0, 0, 0, 1)), F.pad(v_win, (0, 0, 0, 0, 0, 1))
                out = self._biased_attention(q_win, k_win, v_win, (qw, qw), (kvw, kvw), cols=qc, k_real=k_real)
                cols.append(out.reshape(b, nr, nc, qr, qc, h, c).transpose(2, 3).reshape(b, nr * qr, nc * qc, h, c))
            rows.append(_cat(cols, 2))
        return _cat(rows, 1).view(b, -1, h, c)

    def _padded_window_attention(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw) -> Tensor:
        """detectron2's way, for tracing: pad the maps to whole windows, attend to the padding, crop."""
        b, _, h, c = q.shape
        qw, kvw = self.q_window, self.kv_window
        k_win, _ = window_partition(k.reshape(b, kv_hw[0], kv_hw[1], h * c), kvw)
        v_win, _ = window_partition(v.reshape(b, kv_hw[0], kv_hw[1], h * c), kvw)
        k_win, v_win = (t.view(t.shape[0], t.shape[1], h, c) for t in (k_win, v_win))
        q_win, q_pad_hw = window_partition(q.reshape(b, q_hw[0], q_hw[1], h * c), qw)
        q_win = q_win.view(q_win.shape[0], q_win.shape[1], h, c)
        out = self._biased_attention(q_win, k_win, v_win, (qw, qw), (kvw, kvw))
        out = out.reshape(out.shape[0], -1, h * c)
        out = window_unpartition(out, qw, q_pad_hw, q_hw)
        return out.reshape(b, q_hw[0] * q_hw[1], h, c)


def _window_groups(n_q: int, n_kv: int, q_win: int, kv_win: int) -> list[tuple[int, int, int, int]]:
    """Along one axis of n_q query and n_kv key tokens: (first window, windows, real q tokens, real kv tokens) of
    each run of windows with the same real extent: the full windows, then the last one where it is partial."""
    n = -(-n_q // q_win)
    if -(-n_kv // kv_win) != n:
        raise ValueError(f"{n_q} query tokens make {n} windows of {q_win}, but {n_kv} key tokens do not (window "
                         f"{kv_win}); detectron2's MViT cannot run this input either.")  # fmt: skip
    last = (n_q - (n - 1) * q_win, n_kv - (n - 1) * kv_win)
    if last == (q_win, kv_win):
        return [(0, n, q_win, kv_win)]
    return ([(0, n - 1, q_win, kv_win)] if n > 1 else []) + [(n - 1, 1, *last)]


def _windows(x: Tensor, r0: int, nr: int, c0: int, nc: int, win: int, rows: int, cols: int) -> Tensor:
    """The real top-left ``rows`` x ``cols`` tokens of windows r0..r0+nr-1 x c0..c0+nc-1 of a (B, H, W, heads, c)
    map -> (B * nr * nc, rows * cols, heads, c)."""
    b, _, _, h, c = x.shape
    part = x[:, r0 * win : r0 * win + (nr - 1) * win + rows, c0 * win : c0 * win + (nc - 1) * win + cols]
    part = part.reshape(b, nr, rows, nc, cols, h, c).transpose(2, 3)
    return part.reshape(b * nr * nc, rows * cols, h, c)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """(B, N, heads, c) tokens and a (B, heads, Nq, Nk) bias -> (B, Nq, heads, c)."""
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block: pooling attention and an MLP, each with a (pooled) shortcut.

    When the width changes, the shortcut is a Linear on the *normalised* input (official behaviour),
    placed on the attention branch (``expand_attn``) or on the MLP branch.

    forward: (B, [1 +] H*W, dim) and (H, W) -> (B, [1 +] H'*W', dim_out) and (H', W').
    """

    def __init__(self, spec: BlockSpec, has_cls_token: bool, drop_path: float, eps: float):
        super().__init__()
        attn_dim = spec.attn_dim
        self.has_cls_token = has_cls_token
        self.expand_attn = spec.expand_attn
        self.norm1 = nn.LayerNorm(spec.dim, eps=eps)
        self.attn = PoolingAttention(spec, has_cls_token, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(attn_dim, eps=eps)
        self.mlp = Mlp(attn_dim, attn_dim * MLP_RATIO, spec.dim_out)
        self.proj = nn.Linear(spec.dim, spec.dim_out) if spec.dim != spec.dim_out else None
        s = spec.stride_q
        self.pool_skip = nn.MaxPool2d(s + 1, s, (s + 1) // 2) if s > 1 else None

    def _shortcut(self, x: Tensor, x_norm: Tensor, branch_widens: bool) -> Tensor:
        """The input itself, or a projection of its normalised form on the branch that widens."""
        if self.proj is None or not branch_widens:
            return x
        return linear(x_norm, self.proj.weight, self.proj.bias)

    def _pool_shortcut(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self.pool_skip is None:
            return x
        t = 1 if self.has_cls_token else 0
        cls_tok, x = x[:, :t], x[:, t:]
        b, _, c = x.shape
        x = self.pool_skip(x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).reshape(b, -1, c)
        return torch.cat((cls_tok, x), dim=1) if cls_tok.shape[1] else x

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        x_norm = self.norm1(x)
        attn_out, out_hw = self.attn(x_norm, hw)
        shortcut = self._shortcut(x, x_norm, branch_widens=self.expand_attn)
        x = self._pool_shortcut(shortcut, hw) + self.drop_path(attn_out)

        x_norm = self.norm2(x)
        shortcut = self._shortcut(x, x_norm, branch_widens=not self.expand_attn)
        return shortcut + self.drop_path(self.mlp(x_norm)), out_hw
