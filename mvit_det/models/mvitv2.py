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

The blocks (pooling attention and the block around it) are in ``blocks``, the generic layers in ``layers``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# PoolingAttention and attention are re-exported: they were importable from here before the blocks moved out.
from .blocks import BlockSpec, MultiScaleBlock, PoolingAttention  # noqa: F401
from .fastpath import attention, bf16_as_fp32  # noqa: F401
from .layers import PATCH_STRIDE, PatchEmbed

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


def block_specs(
    arch: MViTv2Arch,
    *,
    expand_attn: bool = True,
    detection: bool = False,
    pretrain_img_size: int = 224,
    window_size: int = WINDOW_SIZE,
) -> list[BlockSpec]:
    """Per-block geometry.

    The first block of stages 2-4 halves the resolution (q stride 2). With ``expand_attn`` that block
    also doubles the width inside attention; without it (the L in1k checkpoint) the last block of the
    previous stage doubles the width inside its MLP. The kv stride starts at ``KV_STRIDE`` and
    is divided by the q stride at each resolution drop, so that kv is pooled to the same grid in all
    stages (4, 2, 1, 1).

    In detection mode the blocks follow detectron2's hybrid window attention: windowed everywhere except
    the last block of stages 2-4, whose global attention uses a doubled kv stride in stages 2 and 3.
    ``window_size`` is the window side of stage 1 in pre-pooling tokens, halved at each later stage;
    0 makes every block attend globally (detectron2's ``MViT(adaptive_window_size=0)`` does the same).
    """
    specs: list[BlockSpec] = []
    lbi = arch.last_block_indexes
    grid = pretrain_img_size // PATCH_STRIDE
    kv_stride, window = KV_STRIDE, window_size
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
                    window_size=0 if (not detection or is_global or not window) else window,
                    rel_pos_grid=grid,
                )
            )
            if first:  # later blocks of the stage see the pooled grid
                grid //= 2
                window //= 2
            i += 1
    return specs


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
        window_size: detection mode only: the window side of stage 1 in pre-pooling tokens (detectron2's MViT
            ``adaptive_window_size``, 56, halved at each later stage); 0 for global attention in every block,
            which costs less and attends to no padding when every feature map is smaller than its window.
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
        window_size: int = WINDOW_SIZE,
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

        if window_size < 0 or (window_size and window_size % 8):
            raise ValueError(
                "window_size must be 0 (global attention) or a multiple of 8 (it is halved three times), "
                f"got {window_size}."
            )
        specs = block_specs(
            self.arch, expand_attn=expand_attn, detection=detection, pretrain_img_size=pretrain_img_size,
            window_size=window_size,
        )  # fmt: skip
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
        # bool is an int, and a negative size would quietly give the identity head (features, not logits)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ValueError(
                f"num_classes must be an int >= 1 (the classifier's outputs), or 0 for the pooled features without "
                f"a classifier; got {num_classes!r}."
            )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_dim, int(num_classes)) if num_classes > 0 else nn.Identity()

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
