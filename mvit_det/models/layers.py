"""Generic layers of MViTv2: stochastic depth, MLP, patch stem, decomposed rel-pos bias, windows.

Shapes use B (batch), N (tokens), C (channels); token grids are (H, W) in row-major order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fastpath import _onednn_dtype, linear

__all__ = ["DropPath", "Mlp", "PatchEmbed", "rel_pos_bias", "rel_pos_lookup", "window_partition", "window_unpartition"]

PATCH_STRIDE = 4
# glibc serves every block larger than this with a fresh mmap, page-faulted in anew on each call: the size above which
# CPU inference splits its large temporaries (the MLP's hidden activations here, the rel-pos bias in blocks.py).
LARGEST_HEAP_BLOCK = 32 << 20
# CPU inference runs the MLP over chunks of HIDDEN_CHUNK_BYTES of hidden activations once the whole hidden tensor
# would exceed HIDDEN_WHOLE_BYTES; a chunk's hidden rows are also still in cache when fc2 reads them. The chunks change
# only which rows one GEMM call covers. Measured on MViTv2-T (AMD EPYC, interleaved in one process): 2-5% less time
# for the classifier at batch 8 and 224 (its first stage's hidden tensor is 38.5 MB), 2% for the detection trunk at
# 1024x1024.
HIDDEN_CHUNK_BYTES = 2 << 20
HIDDEN_WHOLE_BYTES = LARGEST_HEAP_BLOCK


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2. (B, N, in_dim) -> (B, N, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _onednn_dtype(x, self.fc1.weight)  # None: autograd, tracing, compile or GPU take the plain ops
        if dtype is None:
            return self._mlp(x)
        rows, row_bytes = x.numel() // x.shape[-1], self.fc1.out_features * dtype.itemsize  # of the hidden tensor
        if rows * row_bytes <= HIDDEN_WHOLE_BYTES:
            return self._mlp(x)
        step = max(1, HIDDEN_CHUNK_BYTES // row_bytes)
        flat = x.reshape(rows, x.shape[-1])
        out = torch.cat([self._mlp(flat[i : i + step]) for i in range(0, rows, step)])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mlp(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight, self.fc2.bias)


class PatchEmbed(nn.Module):
    """Conv 7x7 / stride 4 stem. (B, 3, H, W) -> (B, H/4 * W/4, C) and the token grid (H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        # A channels-last conv output makes the token sequence a free view rather than a transposed copy.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        hw = (x.shape[2], x.shape[3])
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], hw[0] * hw[1], -1), hw


def rel_pos_lookup(table: Tensor, q_size: int, k_size: int) -> Tensor:
    """Relative-position embeddings for every (query, key) offset along one axis.

    table: (L, c), built for the pre-training grid; resized by linear interpolation when the current
    grid needs a different length (as in detectron2 and mmpretrain). Returns (q_size, k_size, c).
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    # Offsets are scaled when q and k grids differ, so that both index the same physical distance.
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


def rel_pos_bias(
    q: Tensor,
    q_hw: tuple[int, int],
    k_hw: tuple[int, int],
    table_h: Tensor,
    table_w: Tensor,
    first_row: int = 0,
    cols: Optional[int] = None,
    k_real: Optional[tuple[int, int]] = None,
) -> Tensor:
    """Decomposed relative-position bias as an additive attention mask.

    q: (B, rows * cols, heads, c), pooled and normalised but not scaled: the rows ``first_row`` onwards and the
    first ``cols`` columns (default: all q_w) of the (q_h, q_w) query grid.
    Returns (B, heads, rows * cols, k_h * k_w).

    k_real: (k_h', k_w'), set when only the top-left k_h' x k_w' keys of the k grid are real and the rest is a
    window's zero padding (k = v = 0). A padded key's logit is its bias alone and it adds nothing to the output, so
    the padded keys act together as one zero key whose bias is the log-sum-exp of theirs. Returns the real keys'
    bias and that one column: (B, heads, rows * cols, k_h' * k_w' + 1). The bias is a sum of a row and a column
    term, so the log-sum-exp separates over rows and columns and the padded part of the bias is never built.
    """
    (q_h, q_w), (k_h, k_w) = q_hw, k_hw
    b, n, n_heads, c = q.shape
    cols = q_w if cols is None else cols
    rows = n // cols
    r_h = rel_pos_lookup(table_h, q_h, k_h)[first_row : first_row + rows].to(q.dtype)
    r_w = rel_pos_lookup(table_w, q_w, k_w)[:cols].to(q.dtype)
    r_q = q.reshape(b, rows, cols, n_heads, c)
    # einsum returns permuted views; making the small factors contiguous makes the large sum contiguous,
    # so the final reshape is free.
    bias_h = torch.einsum("bhwnc,hkc->bnhwk", r_q, r_h).contiguous()
    bias_w = torch.einsum("bhwnc,wkc->bnhwk", r_q, r_w).contiguous()
    if k_real is None or tuple(k_real) == (k_h, k_w):
        bias = bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)  # (B, heads, rows, cols, k_h, k_w)
        return bias.reshape(b, n_heads, rows * cols, k_h * k_w)
    kh, kw = k_real
    bias = (bias_h[..., :kh, None] + bias_w[..., None, :kw]).reshape(b, n_heads, rows * cols, kh * kw)
    # padded = (rows kh.. x all columns) + (rows ..kh x columns kw..); a sum of positive terms, so it is stable
    padded = torch.logaddexp(
        bias_h[..., kh:].logsumexp(-1) + bias_w.logsumexp(-1),
        bias_h[..., :kh].logsumexp(-1) + bias_w[..., kw:].logsumexp(-1),
    )
    return torch.cat((bias, padded.reshape(b, n_heads, rows * cols, 1)), -1)


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, window * window, C), zero-padding H and W up to multiples of window.

    The padding is left unmasked on purpose: detectron2's MViT attends to it, and its checkpoints were
    trained that way.
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c), (hp, wp)


def window_unpartition(x: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``: (B * nW, window * window, C) -> (B, H, W, C)."""
    hp, wp = padded_hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1).transpose(2, 3)
    return x.reshape(b, hp, wp, -1)[:, : hw[0], : hw[1]]
