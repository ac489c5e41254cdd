"""Recognise the public MViTv2 checkpoint layouts and rewrite them into mvit-det's parameter names.

Our names are the official / detectron2 ones (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ...,
``norm``, ``head.fc``; ``scale{2..5}_norm`` in detection mode). The other layouts differ as follows:

============  ==========================================  =============================================
format        container                                   key differences
============  ==========================================  =============================================
mvit-det      ``{"model": sd, "meta": {"format": ...}}``  none (also: a bare state dict in our layout)
official      ``{"model_state": sd, ...}`` (``.pyth``)     ``head.projection`` -> ``head.fc``; conv weights
                                                          may be 5-D with a temporal size of 1
mmpretrain    ``{"state_dict": sd, "meta": ...}``         ``backbone.`` prefix, ``patch_embed.projection``,
                                                          final norm ``backbone.norm3``
timm          bare state dict                             ``stages.{s}.blocks.{j}``, shortcut
                                                          ``shortcut_proj_attn`` / ``shortcut_proj_mlp``
detectron2    ``{"model": sd, ...}`` (``.pth`` or a       trunk under ``backbone.bottom_up.``; FPN and
              model-zoo ``.pkl`` of numpy arrays)         heads belong to the detector and are dropped
============  ==========================================  =============================================
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..models.mvitv2 import ARCHS

__all__ = [
    "FORMATS",
    "CheckpointInfo",
    "ConvertedCheckpoint",
    "convert",
    "to_mmpretrain_state_dict",
    "to_timm_state_dict",
    "describe_state_dict",
    "detect_format",
    "unwrap_keys",
]

FORMATS = ("mvit-det", "official", "mmpretrain", "timm", "detectron2")

D2_TRUNK_PREFIX = "backbone.bottom_up."
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_TIMM_BLOCK_RE = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$")


@dataclass
class ConvertedCheckpoint:
    """A checkpoint rewritten into our layout.

    ``ignored`` lists checkpoint keys that belong to something other than the MViTv2 network (the FPN
    and heads of a detectron2 detector); they are dropped on purpose. ``notes`` are human-readable
    remarks about the conversion (for example squeezed 5-D weights).
    """

    state_dict: dict[str, Tensor]
    format: str
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------
#: torch.compile's wrapper name, wherever a compiled module sits in the model.
_COMPILED_RE = re.compile(r"(?:^|(?<=\.))_orig_mod\.")


def unwrap_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove the ``module.`` prefix of DistributedDataParallel (when every key has it) and every ``_orig_mod.`` of
    ``torch.compile``; return the new dict and the wrappers removed (empty when nothing changed)."""
    removed = []
    sd = dict(state_dict)
    if any(isinstance(k, str) and _COMPILED_RE.search(k) for k in sd):
        sd = {(_COMPILED_RE.sub("", k) if isinstance(k, str) else k): v for k, v in sd.items()}
        removed.append("_orig_mod. (torch.compile)")
    while sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        removed.append("module. (DistributedDataParallel)")
    return sd, removed


def _strip_module_prefix(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Remove the wrapper prefixes of DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``)."""
    unwrapped, removed = unwrap_keys(sd)
    return unwrapped if removed else sd


def _layout_of(keys: list[str]) -> Optional[str]:
    """Name the key layout of a bare state dict, or None if it is no MViTv2 layout we know."""
    if any(k.startswith(D2_TRUNK_PREFIX) for k in keys):
        return "detectron2"
    if any(k.startswith(("backbone.blocks.", "backbone.patch_embed.")) for k in keys):
        return "mmpretrain"
    if any(_TIMM_BLOCK_RE.match(k) for k in keys):
        return "timm"
    if any(k.startswith("head.projection.") for k in keys):
        return "official"
    if any(_BLOCK_RE.match(k) for k in keys) or "patch_embed.proj.weight" in keys:
        return "mvit-det"
    return None


def _unwrap(obj: Any) -> tuple[Mapping[str, Any], str]:
    """Find the state dict inside a loaded checkpoint and name its format."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"Expected a checkpoint dict (a state dict, or a dict holding one under 'model', 'model_state' "
            f"or 'state_dict'), got {type(obj).__name__}. If you saved a whole nn.Module with torch.save(model), "
            "save model.state_dict() instead (or use mvit_det.checkpoint.save_checkpoint)."
        )
    meta = obj.get("meta")
    if "model_state" in obj:  # official (PySlowFast / pycls style) .pyth
        inner, container = obj["model_state"], "official"
    elif "state_dict" in obj:  # mmpretrain / mmengine (also Lightning-style and timm training checkpoints)
        inner, container = obj["state_dict"], None
    elif "model" in obj and isinstance(obj["model"], Mapping):  # detectron2, mvit-det, DeiT-style
        inner = obj["model"]
        container = "mvit-det" if isinstance(meta, Mapping) and meta.get("format") == "mvit-det" else None
    else:
        inner, container = obj, None
    if not isinstance(inner, Mapping):
        raise ValueError(f"The checkpoint's weights entry is a {type(inner).__name__}, not a state dict.")
    inner = _strip_module_prefix(inner)
    keys = [k for k in inner if isinstance(k, str)]
    layout = container or _layout_of(keys)
    if layout == "mvit-det" and _layout_of(keys) == "detectron2":  # save_checkpoint of a whole detector
        layout = "detectron2"
    if layout is None:
        top = ", ".join(repr(k) for k in list(obj)[:6])
        sample = ", ".join(repr(k) for k in keys[:6]) or "none"
        raise ValueError(
            "This does not look like an MViTv2 checkpoint: no MViTv2 parameter names found "
            f"(top-level keys: {top}; first weight names: {sample}). Supported formats: {', '.join(FORMATS)}."
        )
    return inner, layout


def detect_format(obj: Any) -> str:
    """Name the format of a loaded checkpoint: one of ``FORMATS``.

    ``obj`` is what ``torch.load`` / ``pickle.load`` returned (or a bare state dict).
    """
    return _unwrap(obj)[1]


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _as_tensor(key: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(
        f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor or numpy array; "
        "the file does not hold a plain state dict."
    )


def _rename_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``stages.{s}.blocks.{j}`` -> ``blocks.{i}``, counting the blocks of each stage in the checkpoint."""
    per_stage: dict[int, int] = {}
    for k in sd:
        m = _TIMM_BLOCK_RE.match(k)
        if m:
            s, j = int(m.group(1)), int(m.group(2))
            per_stage[s] = max(per_stage.get(s, 0), j + 1)
    if sorted(per_stage) != list(range(len(per_stage))):
        raise ValueError(f"timm checkpoint has blocks for stages {sorted(per_stage)}; expected consecutive stages from 0.")
    offsets, total = {}, 0
    for s in range(len(per_stage)):
        offsets[s] = total
        total += per_stage[s]
    out = {}
    for k, v in sd.items():
        m = _TIMM_BLOCK_RE.match(k)
        if m:
            i = offsets[int(m.group(1))] + int(m.group(2))
            rest = re.sub(r"^shortcut_proj_(attn|mlp)\.", "proj.", m.group(3))
            k = f"blocks.{i}.{rest}"
        out[k] = v
    return out


def to_timm_state_dict(state_dict: dict[str, Tensor], depths: tuple[int, ...], expand_attn: bool) -> dict:
    """Writer, the inverse of ``_rename_timm``: our (official-layout) classifier keys -> timm ``MultiScaleVit`` keys.

    ``blocks.{i}.X`` -> ``stages.{s}.blocks.{j}.X`` (``i`` counted through ``depths``), and the block's
    width-changing shortcut ``proj`` -> ``shortcut_proj_attn`` (``expand_attn``) or ``shortcut_proj_mlp``.
    """
    stage_of: list[tuple[int, int]] = [(s, j) for s, d in enumerate(depths) for j in range(d)]
    shortcut = "shortcut_proj_attn" if expand_attn else "shortcut_proj_mlp"
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m:
            s, j = stage_of[int(m.group(1))]
            rest = re.sub(r"^proj\.", f"{shortcut}.", m.group(2))
            k = f"stages.{s}.blocks.{j}.{rest}"
        out[k] = v
    return out


def _rename_mmpretrain(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # mmpretrain's block submodules carry the official names (checked against mmpretrain 1.2
    # backbones/mvit.py), so only the stem, the final norm and the prefix differ.
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            k = k[len("backbone."):]
            if k.startswith("patch_embed.projection."):
                k = "patch_embed.proj." + k[len("patch_embed.projection."):]
            elif k.startswith("norm3."):
                k = "norm." + k[len("norm3."):]
        out[k] = v
    return out


def to_mmpretrain_state_dict(state_dict: dict[str, Tensor]) -> dict:
    """Writer, the inverse of ``_rename_mmpretrain``: our classifier keys -> mmpretrain ``ImageClassifier`` keys."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            out[k] = v
            continue
        k = re.sub(r"^patch_embed\.proj\.", "patch_embed.projection.", k)
        k = re.sub(r"^norm\.", "norm3.", k)
        out["backbone." + k] = v
    return out


def _rename_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {("head.fc." + k[len("head.projection."):] if k.startswith("head.projection.") else k): v for k, v in sd.items()}


def convert(obj: Any) -> ConvertedCheckpoint:
    """Unwrap, rename and tensorise a loaded checkpoint of any supported format."""
    inner, fmt = _unwrap(obj)
    sd = {k: _as_tensor(k, v) for k, v in inner.items() if not str(k).endswith("num_batches_tracked")}
    ignored: list[str] = []
    notes: list[str] = []
    if fmt == "timm":
        sd = _rename_timm(sd)
    elif fmt == "mmpretrain":
        sd = _rename_mmpretrain(sd)
    elif fmt == "official":
        sd = _rename_official(sd)
    elif fmt == "detectron2":
        # Only the trunk is ours; the FPN, RPN and ROI heads are loaded by Detectron2's own checkpointer.
        ignored = sorted(k for k in sd if not k.startswith(D2_TRUNK_PREFIX))
        sd = {k[len(D2_TRUNK_PREFIX):]: v for k, v in sd.items() if k.startswith(D2_TRUNK_PREFIX)}

    if not any(_BLOCK_RE.match(k) for k in sd) and "patch_embed.proj.weight" not in sd:
        sample = ", ".join(repr(k) for k in list(sd)[:6]) or "none"
        where = "its backbone is not an MViTv2" if fmt == "detectron2" else "no MViTv2 weights found"
        raise ValueError(f"This {fmt} checkpoint holds no MViTv2 network: {where} (first weight names: {sample}).")

    # Official checkpoints can carry PySlowFast's 5-D conv weights (C_out, C_in, T=1, kh, kw).
    squeezed = [k for k, v in sd.items() if v.ndim == 5 and v.shape[2] == 1]
    for k in squeezed:
        sd[k] = sd[k].squeeze(2)
    if squeezed:
        notes.append(f"squeezed the temporal dimension (size 1) of {len(squeezed)} 5-D conv weights")
    return ConvertedCheckpoint(sd, fmt, ignored, notes)


# --------------------------------------------------------------------------------------------
# Description (for messages and the converter tool)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What a state dict in our layout says about the network it belongs to."""

    depth: int
    embed_dim: Optional[int]
    #: True: widens inside attention; False: inside the MLP (L in1k); None: no widening block found
    expand_attn: Optional[bool]
    cls_token: bool
    #: classifier outputs, None when there is no ``head.fc`` (a trunk)
    num_classes: Optional[int]
    #: has the detection trunk's ``scale{2..5}_norm``
    detection: bool
    #: has the classification ``norm``
    has_final_norm: bool
    #: 5-D weights with a temporal size > 1 (a video model)
    video: bool

    @property
    def size(self) -> Optional[str]:
        """``"tiny"`` ... ``"huge"`` when depth and width match a standard size."""
        for name, arch in ARCHS.items():
            if arch.depth == self.depth and arch.embed_dim == self.embed_dim:
                return name
        return None

    @property
    def size_label(self) -> str:
        """For example ``"MViTv2-S (16 blocks, width 96)"``."""
        shape = f"{self.depth} blocks, width {self.embed_dim}"
        return f"MViTv2-{self.size[0].upper()} ({shape})" if self.size else f"a non-standard MViTv2 ({shape})"


def describe_state_dict(sd: Mapping[str, Tensor]) -> CheckpointInfo:
    """Infer size, widening mode, class token and head size from a state dict in our layout."""
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    stem = sd.get("patch_embed.proj.weight")
    expand_attn = None
    for i in sorted(blocks):
        proj, qkv = sd.get(f"blocks.{i}.proj.weight"), sd.get(f"blocks.{i}.attn.qkv.weight")
        if proj is not None and qkv is not None:
            # Widening in attention: qkv already produces 3 * dim_out; in the MLP: 3 * dim_in.
            expand_attn = qkv.shape[0] == 3 * proj.shape[0]
            break
    head = sd.get("head.fc.weight")
    return CheckpointInfo(
        depth=max(blocks) + 1 if blocks else 0,
        embed_dim=int(stem.shape[0]) if stem is not None else None,
        expand_attn=expand_attn,
        cls_token="cls_token" in sd,
        num_classes=int(head.shape[0]) if head is not None else None,
        detection=any(k.startswith("scale") and "_norm." in k for k in sd),
        has_final_norm="norm.weight" in sd,
        video=any(v.ndim == 5 for v in sd.values()),
    )
