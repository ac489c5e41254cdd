"""MViTv2: Improved Multiscale Vision Transformers (Li et al., CVPR 2022).

One network serves two purposes:

* **classification** (``MViTv2(arch, num_classes=1000)``): global pooling attention in every block,
  a final LayerNorm, mean (or class-token) pooling and a linear head. Matches the official
  ``facebookresearch/mvit`` model, timm's ``mvitv2_*`` and mmpretrain's ``MViT``.
* **detection** (``MViTv2(arch, detection=True)``): the same blocks with the hybrid window attention
  of detectron2's ``MViT`` (windows 56/28/14/7 in pre-pooling tokens, global attention with a doubled
  kv stride in the last block of stages 2-4) and one LayerNorm per output stage, returning
  ``scale2..scale5`` feature maps at strides 4, 8, 16 and 32.

Parameter names follow the official / detectron2 layout (``blocks.{i}.attn.qkv`` and so on) so that
both families of checkpoints map onto this module one-to-one.

Attention runs through ``F.scaled_dot_product_attention``; the decomposed relative-position term is
passed as an additive mask, which is mathematically identical to the reference
``softmax(q k^T * scale + rel)`` formulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .fastpath import _onednn_dtype, attention, bf16_as_fp32, cast_weight, linear
from .layers import PATCH_STRIDE, DropPath, Mlp, PatchEmbed, rel_pos_bias, window_partition, window_unpartition

__all__ = [
    "ARCHS",
    "MViTv2",
    "MViTv2Arch",
    "get_arch",
]

STAGE_NAMES = ("scale2", "scale3", "scale4", "scale5")
STAGE_STRIDES = (4, 8, 16, 32)  # of STAGE_NAMES, in input pixels
#: kv pooling stride of stage 1 and window side (pre-pooling tokens) of stage 1 in detection mode
KV_STRIDE, WINDOW_SIZE = 4, 56
MLP_RATIO = 4
#: parameters kept out of weight decay by every published recipe (besides norms and biases)
NO_WEIGHT_DECAY = ("rel_pos_h", "rel_pos_w", "cls_token")


# --------------------------------------------------------------------------------------------
# Size presets: the single source of truth for T/S/B/L/H.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MViTv2Arch:
    """One size of the MViTv2 family.

    Channels and heads double at every stage, so a size is fixed by its stage-1 width, its stage-1
    head count and the number of blocks per stage.
    """

    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: int

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**s for s in range(4))

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(self.num_heads * 2**s for s in range(4))

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def last_block_indexes(self) -> tuple[int, ...]:
        """Index of the last block of every stage (detectron2's ``last_block_indexes``)."""
        ends, total = [], 0
        for d in self.depths:
            total += d
            ends.append(total - 1)
        return tuple(ends)


ARCHS: dict[str, MViTv2Arch] = {
    "tiny": MViTv2Arch(96, (1, 2, 5, 2), 1),
    "small": MViTv2Arch(96, (1, 2, 11, 2), 1),
    "base": MViTv2Arch(96, (2, 3, 16, 3), 1),
    "large": MViTv2Arch(144, (2, 6, 36, 4), 2),
    "huge": MViTv2Arch(192, (4, 8, 60, 8), 3),
}
_ALIASES = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}


def get_arch(name: str | MViTv2Arch) -> MViTv2Arch:
    """Look up a size by name: ``"tiny"``, ``"T"``, ``"mvitv2_t"`` and ``"MViTv2-T"`` all work."""
    if isinstance(name, MViTv2Arch):
        return name
    key = str(name).lower().replace("-", "_")
    for prefix in ("mvitv2_", "mvit_v2_", "mvit_"):
        key = key.removeprefix(prefix)
    key = _ALIASES.get(key, key)
    if key not in ARCHS:
        valid = ", ".join(f"{k} ({k[0].upper()})" for k in ARCHS)
        raise ValueError(f"Unknown MViTv2 size {name!r}. Valid sizes: {valid}.")
    return ARCHS[key]


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


def block_specs(
    arch: MViTv2Arch,
    *,
    expand_attn: bool = True,
    detection: bool = False,
    pretrain_img_size: int = 224,
) -> list[BlockSpec]:
    """Per-block geometry.

    The first block of stages 2-4 halves the resolution (q stride 2). With ``expand_attn`` that block
    also doubles the width inside attention; without it (the L in1k checkpoint) the last block of the
    previous stage doubles the width inside its MLP. The kv stride starts at ``KV_STRIDE`` and
    is divided by the q stride at each resolution drop, so that kv is pooled to the same grid in all
    stages (4, 2, 1, 1).

    In detection mode the blocks follow detectron2's hybrid window attention: windowed everywhere except
    the last block of stages 2-4, whose global attention uses a doubled kv stride in stages 2 and 3.
    """
    specs: list[BlockSpec] = []
    lbi = arch.last_block_indexes
    grid = pretrain_img_size // PATCH_STRIDE
    kv_stride, window = KV_STRIDE, WINDOW_SIZE
    i = 0
    for s, depth in enumerate(arch.depths):
        for j in range(depth):
            first = j == 0 and s > 0
            if first:
                kv_stride = max(kv_stride // 2, 1)
            if expand_attn:
                dim = arch.dims[s - 1] if first else arch.dims[s]
                dim_out = arch.dims[s]
            else:
                dim = arch.dims[s]
                dim_out = arch.dims[s + 1] if j == depth - 1 and s < 3 else arch.dims[s]
            is_global = detection and i in lbi[1:]
            stride_kv = kv_stride * 2 if detection and i in lbi[1:3] else kv_stride
            specs.append(
                BlockSpec(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=arch.heads[s],
                    stride_q=2 if first else 1,
                    stride_kv=stride_kv,
                    expand_attn=expand_attn,
                    window_size=0 if (not detection or is_global) else window,
                    rel_pos_grid=grid,
                )
            )
            if first:  # later blocks of the stage see the pooled grid
                grid //= 2
                window //= 2
            i += 1
    return specs


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
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
        sp = F.conv2d(sp, weight, None, pool.stride, pool.padding, groups=hc)
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
        t = 1 if self.has_cls_token else 0
        bias = rel_pos_bias(q[:, t:], q_hw, kv_hw, self.rel_pos_h, self.rel_pos_w)
        if t:  # no positional bias to or from the class token
            bias = F.pad(bias, (1, 0, 1, 0))
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias).transpose(1, 2)

    def _window_attention(self, q: Tensor, k: Tensor, v: Tensor, q_hw, kv_hw) -> Tensor:
        """(B, N, heads, c) each -> (B, Nq, heads, c), attending within windows."""
        b, _, h, c = q.shape
        qw, kvw = self.q_window, self.kv_window
        q_win, q_pad_hw = window_partition(q.reshape(b, q_hw[0], q_hw[1], h * c), qw)
        k_win, _ = window_partition(k.reshape(b, kv_hw[0], kv_hw[1], h * c), kvw)
        v_win, _ = window_partition(v.reshape(b, kv_hw[0], kv_hw[1], h * c), kvw)
        q_win, k_win, v_win = (t.view(t.shape[0], t.shape[1], h, c) for t in (q_win, k_win, v_win))
        bias = rel_pos_bias(q_win, (qw, qw), (kvw, kvw), self.rel_pos_h, self.rel_pos_w)
        out = attention(q_win.transpose(1, 2), k_win.transpose(1, 2), v_win.transpose(1, 2), bias)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, h * c)
        out = window_unpartition(out, qw, q_pad_hw, q_hw)
        return out.reshape(b, q_hw[0] * q_hw[1], h, c)


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


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class MViTv2(nn.Module):
    """MViTv2 image classifier, or (``detection=True``) its multiscale detection trunk.

    Args:
        arch: a size name ("tiny"/"T", "small", "base", "large", "huge") or an ``MViTv2Arch``.
        num_classes: classifier outputs; 0 keeps the pooled features (classification mode only).
        expand_attn: widen channels inside attention (every released checkpoint except L in1k).
        cls_token: prepend a class token and classify from it (the in21k checkpoints).
        detection: build the detectron2-style trunk (window attention, per-stage norms, no head).
        out_features: detection outputs to produce, a subset of ``scale2..scale5``.
        pretrain_img_size: input side the rel-pos tables are sized for. Any input size works; tables are
            resized on the fly.
        drop_path_rate: stochastic depth, rising linearly from 0 over the blocks.
        drop_rate: dropout before the classifier.
        act_checkpoint: recompute block activations in the backward pass (``torch.utils.checkpoint``).
        eps: LayerNorm epsilon (1e-6 in every released checkpoint).

    Input: (B, in_chans, H, W), already normalised.
    Output: classification: logits (B, num_classes); detection: ``{"scale2": (B, C, H/4, W/4), ...,
    "scale5": (B, 8C, H/32, W/32)}``.
    """

    def __init__(
        self,
        arch: str | MViTv2Arch = "tiny",
        num_classes: int = 1000,
        *,
        expand_attn: bool = True,
        cls_token: bool = False,
        detection: bool = False,
        out_features: Sequence[str] = STAGE_NAMES,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        act_checkpoint: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.arch = get_arch(arch)
        if detection and cls_token:
            raise ValueError("detection=True does not use a class token; build with cls_token=False.")
        if detection and not expand_attn:
            raise ValueError(
                "detection=True follows detectron2's MViT, which always widens inside attention; "
                "use expand_attn=True (the L in1k checkpoint cannot initialise a detector)."
            )
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"Unknown out_features {sorted(unknown)}; choose from {STAGE_NAMES}.")
        self.in_chans = in_chans
        self.detection = detection
        self.num_classes = 0 if detection else num_classes
        self.has_cls_token = cls_token
        self.act_checkpoint = act_checkpoint
        self.out_features = tuple(f for f in STAGE_NAMES if f in out_features) if detection else ()

        specs = block_specs(self.arch, expand_attn=expand_attn, detection=detection, pretrain_img_size=pretrain_img_size)
        self.specs = specs
        self.patch_embed = PatchEmbed(in_chans, self.arch.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.arch.embed_dim)) if cls_token else None
        rates = torch.linspace(0, drop_path_rate, len(specs), device="cpu").tolist()
        self.blocks = nn.ModuleList(
            MultiScaleBlock(spec, cls_token, rate, eps) for spec, rate in zip(specs, rates)
        )
        self.num_features = specs[-1].dim_out

        if detection:
            for name, idx in zip(STAGE_NAMES, self.arch.last_block_indexes):
                if name in self.out_features:
                    self.add_module(f"{name}_norm", nn.LayerNorm(specs[idx].dim_out, eps=eps))
            self.norm = None
            self.head = None
        else:
            self.norm = nn.LayerNorm(self.num_features, eps=eps)
            self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.apply(_init_weights)
        for blk in self.blocks:
            nn.init.trunc_normal_(blk.attn.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(blk.attn.rel_pos_w, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    # -- shapes ------------------------------------------------------------------------------
    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.specs[i].dim_out for i in self.arch.last_block_indexes)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MViTv2 expects a torch.Tensor of shape (B, {self.in_chans}, H, W), got {type(x).__name__}.")
        if x.ndim != 4:
            raise ValueError(
                f"MViTv2 expects a 4-D batch (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}. "
                "Add a batch dimension with x.unsqueeze(0) for a single image."
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"MViTv2 expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}). "
                "Convert grayscale or RGBA images to RGB first (PIL: image.convert('RGB'))."
            )
        if x.shape[2] < 32 or x.shape[3] < 32:
            raise ValueError(
                f"Input {x.shape[2]}x{x.shape[3]} is smaller than the network's total stride (32). "
                "Resize or pad the image to at least 32x32."
            )
        if not x.is_floating_point():
            raise TypeError(f"MViTv2 expects a floating-point tensor, got {x.dtype}; normalise the image first.")
        if x.shape[0] == 0:
            raise ValueError(f"MViTv2 got an empty batch (shape {tuple(x.shape)}); pass at least one image.")
        weight_dtype = self.patch_embed.proj.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"MViTv2 got a {x.dtype} input but its weights are {weight_dtype}. Convert the input "
                f"(x.to({weight_dtype})), or run under torch.autocast for reduced precision."
            )

    # -- forward -----------------------------------------------------------------------------
    def _run_block(self, blk: MultiScaleBlock, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        if self.act_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)

    def _forward_stages(self, x: Tensor) -> list[tuple[Tensor, tuple[int, int]]]:
        """Run every block; return the token sequence and grid at the end of each stage."""
        self._check_input(x)
        x, hw = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        outs = []
        ends = set(self.arch.last_block_indexes)
        for i, blk in enumerate(self.blocks):
            x, hw = self._run_block(blk, x, hw)
            if i in ends:
                outs.append((x, hw))
        return outs

    def _tokens_to_map(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """(B, [1 +] H*W, C) -> (B, C, H, W)."""
        if self.has_cls_token:
            x = x[:, 1:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])

    @bf16_as_fp32
    def forward_pyramid(self, x: Tensor) -> dict[str, Tensor]:
        """Detection mode: ``{name: (B, C_s, H/stride_s, W/stride_s)}`` for ``out_features``."""
        if not self.detection:
            raise RuntimeError("forward_pyramid needs a model built with detection=True.")
        outs = {}
        for name, (tokens, hw) in zip(STAGE_NAMES, self._forward_stages(x)):
            if name in self.out_features:
                tokens = getattr(self, f"{name}_norm")(tokens)
                outs[name] = self._tokens_to_map(tokens, hw)
        return outs

    @bf16_as_fp32
    def forward_features(self, x: Tensor) -> Tensor:
        """Classification mode: final normalised tokens (B, [1 +] H/32 * W/32, C)."""
        tokens, _ = self._forward_stages(x)[-1]
        return self.norm(tokens)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, [1 +] N, C) -> pooled (B, C) if ``pre_logits`` else logits (B, num_classes)."""
        pooled = tokens[:, 0] if self.has_cls_token else tokens.mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    @bf16_as_fp32
    def extract_feat(self, x: Tensor) -> tuple[Tensor, ...]:
        """Feature maps at the end of each stage, (B, C_s, H/stride_s, W/stride_s) for s = 1..4.

        In classification mode the last map is taken after the final LayerNorm; in detection mode every
        map goes through its stage norm (as ``forward_pyramid``).
        """
        if self.detection:
            return tuple(self.forward_pyramid(x).values())
        stages = self._forward_stages(x)
        maps = [self._tokens_to_map(t, hw) for t, hw in stages[:-1]]
        last, hw = stages[-1]
        maps.append(self._tokens_to_map(self.norm(last), hw))
        return tuple(maps)

    @bf16_as_fp32
    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        if self.detection:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))

    # -- training helpers --------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names that the published recipes exclude from weight decay (see ``NO_WEIGHT_DECAY``)."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY}

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for fine-tuning on ``num_classes`` classes."""
        if self.detection:
            raise RuntimeError("A detection-mode MViTv2 has no classifier.")
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, self.head.drop.p)
        self.head.apply(_init_weights)


class ClassifierHead(nn.Module):
    """Dropout + Linear. (B, C) -> (B, num_classes); identity when num_classes is 0."""

    def __init__(self, in_dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
