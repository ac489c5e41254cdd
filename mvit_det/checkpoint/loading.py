"""Load a checkpoint of any supported format into an MViTv2, with strict checks and useful errors.

Two partial loads are expected and therefore reported at INFO level only:

* a detection trunk (``MViTv2(..., detection=True)``) initialised from an ImageNet classifier: the
  classifier's ``norm``, ``head`` and ``cls_token`` are unused and ``scale{2..5}_norm`` keep their
  initialisation;
* ``skip_head=True`` (a new number of classes): ``head.fc`` keeps its initialisation.

Anything else that does not fit raises with ``strict=True``; with ``strict=False`` the matching weights
are loaded and everything skipped is logged as a warning and returned in the ``LoadReport``.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MODEL_CARDS, MViTv2
from .formats import CheckpointInfo, ConvertedCheckpoint, convert, describe_state_dict
from .io import download, is_url, load_file

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "check_checkpoint",
    "load_checkpoint",
    "open_source",
    "read_checkpoint",
    "read_converted",
    "refuse_integer_weights",
]

logger = logging.getLogger(__name__)

#: What the loaders take: a path, an http(s) URL, a checkpoint dict in memory, or a checkpoint already converted
#: (``read_converted``), which is used as it is.
Source = Union[str, os.PathLike, Mapping[str, Any], ConvertedCheckpoint]

_LIST_CAP = 10
_SCALE_NORM_RE = re.compile(r"^scale\d_norm\.")
_CLASSIFIER_ONLY = ("norm.", "head.")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model (strict load). The message gives the Python fixes; the fields let a
    command-line tool name its own flags instead (``headline``, then its fix, then ``details``)."""

    def __init__(self, message: str, *, headline: str, details: list[str], checkpoint_info: CheckpointInfo,
                 model_info: CheckpointInfo, detection: bool):
        super().__init__(message)
        self.headline, self.details = headline, details
        self.checkpoint_info, self.model_info, self.detection = checkpoint_info, model_info, detection


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did. Key lists use mvit-det's parameter names."""

    source: str
    format: str
    #: model weights set from the checkpoint
    loaded: list[str] = field(default_factory=list)
    #: model weights the checkpoint lacks; they keep their initialisation (only with strict=False)
    missing: list[str] = field(default_factory=list)
    #: checkpoint weights with no place in the model (only with strict=False)
    unexpected: list[str] = field(default_factory=list)
    #: (name, checkpoint shape, model shape) not loaded because the shapes differ (only with strict=False)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    #: classifier weights kept freshly initialised because of skip_head
    head_skipped: list[str] = field(default_factory=list)
    #: expected: model weights this kind of checkpoint cannot provide (scale*_norm from a classifier)
    initialized: list[str] = field(default_factory=list)
    #: expected: checkpoint weights this model does not use (a classifier's norm/head/cls_token in a
    #: detection trunk, the head with num_classes=0 or skip_head, stage norms outside out_features)
    unused: list[str] = field(default_factory=list)
    #: detector weights outside the trunk (FPN, RPN, ROI heads), left to Detectron2's checkpointer
    ignored: list[str] = field(default_factory=list)
    #: (name, checkpoint length, model length) of rel-pos tables resized by linear interpolation
    resized: list[tuple[str, int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when nothing was skipped beyond the expected partial loads listed above."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} weights from {self.source} ({self.format} format)"]
        for label, items in [
            ("missing (kept initialisation)", self.missing),
            ("unexpected (unused)", self.unexpected),
            ("shape mismatch (skipped)", [m[0] for m in self.mismatched]),
            ("head skipped", self.head_skipped),
            ("freshly initialised as expected", self.initialized),
            ("unused as expected", self.unused),
            ("detector weights ignored", self.ignored),
            ("rel-pos tables resized", [r[0] for r in self.resized]),
        ]:
            if items:
                parts.append(f"{label}: {len(items)}")
        parts += self.notes
        return "; ".join(parts)

    __str__ = summary


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def open_source(source: Source) -> tuple[Mapping[str, Any], str]:
    """Read a path or URL once: (the loaded object, the label that error messages name it by). A dict already in
    memory is returned as it is, labelled ``<dict>``."""
    if isinstance(source, Mapping):
        return source, "<dict>"
    if is_url(source):
        return load_file(download(source)), str(source)
    if isinstance(source, (str, os.PathLike)):
        return load_file(source), repr(os.fspath(source))
    raise TypeError(
        f"A checkpoint source must be a file path, an http(s) URL or a loaded checkpoint dict; "
        f"got {type(source).__name__}."
    )


def read_converted(source: Source, *, label: Optional[str] = None) -> ConvertedCheckpoint:
    """Read a path, URL or loaded dict and convert it to mvit-det's layout once; the loaders take the result as it
    is, so a caller that inspects the weights first (``get_model`` reads the head size) does not convert twice."""
    return _read(source, label)[0]


def _read(source: Source, label: Optional[str] = None) -> tuple[ConvertedCheckpoint, str]:
    if isinstance(source, ConvertedCheckpoint):
        return source, label or "<converted>"
    obj, default_label = open_source(source)
    label = label or default_label
    try:
        return convert(obj), label
    except ValueError as e:
        raise ValueError(f"Cannot use checkpoint {label}: {e}") from None


def read_checkpoint(source: Source, *, label: Optional[str] = None) -> tuple[dict[str, Tensor], str]:
    """Read a path, URL or loaded dict and return (state dict in mvit-det's layout, format name). ``label`` names
    a dict already read from a file (see ``open_source``) in error messages."""
    conv = read_converted(source, label=label)
    return conv.state_dict, conv.format


# --------------------------------------------------------------------------------------------
# Diagnosis
# --------------------------------------------------------------------------------------------
def _cap(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_CAP])
    return shown + (f", ... and {len(items) - _LIST_CAP} more" if len(items) > _LIST_CAP else "")


def _model_label(info: CheckpointInfo, detection: bool) -> str:
    kind = "detection trunk" if detection else f"classifier with {info.num_classes or 0} classes"
    return f"{info.size_label}, {kind}"


def _registry_names(size: str, expand_attn) -> list[str]:
    return [n for n, c in MODEL_CARDS.items() if c.size == size and (expand_attn is None or c.expand_attn == expand_attn)]


def _diagnose(ck: CheckpointInfo, m: CheckpointInfo, detection: bool) -> list[str]:
    """Likely causes of a mismatch, each with its fix."""
    hints = []
    if ck.video:
        hints.append(
            "the checkpoint holds 5-D conv weights with a temporal size > 1: it is a video MViT. Only image "
            "(2-D) MViTv2 checkpoints can be loaded."
        )
    if (ck.depth, ck.embed_dim) != (m.depth, m.embed_dim) and ck.depth:
        fix = "build the model with the checkpoint's size"
        if ck.size:
            names = _registry_names(ck.size, ck.expand_attn)
            fix += f", e.g. MViTv2({ck.size!r}, ...)" + (f" or get_model({names[0]!r}, pretrained=...)" if names else "")
        hints.append(f"wrong model size: the checkpoint looks like {ck.size_label}, the model is {m.size_label}; {fix}.")
        return hints  # every other difference follows from the size
    if ck.expand_attn is not None and m.expand_attn is not None and ck.expand_attn != m.expand_attn:
        where = {True: "inside attention (expand_attn=True)", False: "inside the MLP (expand_attn=False)"}
        hints.append(
            f"the checkpoint widens channels {where[ck.expand_attn]} but the model widens {where[m.expand_attn]}. "
            "MViTv2-L differs between releases: the ImageNet-1k L checkpoint uses expand_attn=False "
            "(get_model('mvitv2-large_3rdparty_in1k')), the ImageNet-21k L checkpoint and all other sizes use "
            f"expand_attn=True. Build the model with expand_attn={ck.expand_attn}."
        )
    if ck.cls_token != m.cls_token and not detection:
        hints.append(
            "the checkpoint has a class token (the ImageNet-21k releases): build the model with cls_token=True."
            if ck.cls_token
            else "the model has a class token but the checkpoint has none: build the model with cls_token=False."
        )
    if not detection and (ck.detection or not ck.has_final_norm) and m.has_final_norm:
        hints.append(
            "the checkpoint is a trunk without the classifier's final norm and head (a detection backbone): "
            "load it into MViTv2(..., detection=True), or pass strict=False to initialise only the trunk."
        )
    elif not detection and m.num_classes is not None and ck.num_classes != m.num_classes:
        if ck.num_classes is None:
            hints.append(
                "the checkpoint has no classifier head (head.fc): pass skip_head=True to keep a freshly "
                "initialised head."
            )
        else:
            hints.append(
                f"classifier head size: the checkpoint has {ck.num_classes} classes, the model {m.num_classes}. "
                f"To use the checkpoint's classifier, build the model with num_classes={ck.num_classes} "
                f"(MViTv2(..., num_classes={ck.num_classes})). "
                f"To fine-tune on {m.num_classes} classes pass num_classes={m.num_classes} to get_model (the head "
                "is then freshly initialised), or load_checkpoint(..., skip_head=True), or strict=False."
            )
    return hints


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _non_float_dtype(value: Any) -> Union[str, None]:
    """The dtype of a tensor or numpy array that is not floating point, else None."""
    if isinstance(value, Tensor):
        return None if value.is_floating_point() else str(value.dtype).replace("torch.", "")
    if isinstance(value, np.ndarray):
        return None if value.dtype.kind == "f" else str(value.dtype)
    return None


def refuse_integer_weights(ckpt: Mapping[str, Any], model_sd: Mapping[str, Tensor], label: str) -> None:
    """Raise ``ValueError`` when the checkpoint stores a floating-point weight of the model as integers (int8, ...).

    ``load_state_dict`` would cast them to float without a word, and the model would compute with values that
    are off by the quantization scale.
    """
    bad = [
        (k, dtype)
        for k, v in ckpt.items()
        if k in model_sd and model_sd[k].is_floating_point() and (dtype := _non_float_dtype(v)) is not None
    ]
    if bad:
        shown = _cap([f"{k} ({dtype})" for k, dtype in bad])
        raise ValueError(
            f"Checkpoint {label} stores {len(bad)} floating-point weights of the model as integers: {shown}. "
            "Loading them would cast the integers to float silently and the model would compute with wrong values: "
            "integer weights are quantized (they need their scale and zero point, which a state dict of plain "
            "tensors does not carry) or the file is damaged. Use the float checkpoint, or dequantize the weights "
            "(tensor.dequantize(), or the integer values times their scale) and save float tensors."
        )


def _resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """(L, c) -> (length, c) by linear interpolation, as ``mvitv2.rel_pos_lookup`` does at run time."""
    out = F.interpolate(table.float().T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    return out.to(table.dtype)


def load_checkpoint(
    model: nn.Module,
    source: Source,
    *,
    strict: bool = True,
    skip_head: bool = False,
    label: Optional[str] = None,
) -> LoadReport:
    """Load weights of any supported format (official, mmpretrain, timm, detectron2, mvit-det).

    Args:
        model: an ``MViTv2`` (classification or ``detection=True``).
        source: a file path, an http(s) URL (downloaded once into the torch hub cache) or a checkpoint
            dict already in memory.
        strict: raise ``ValueError`` on any missing, unexpected or mis-shaped weight, naming the likely
            cause and the fix. With False, load what fits and log everything that was skipped.
        skip_head: do not take the classifier head (``head.fc.*``) from the checkpoint (a new number of
            classes); every other weight must still load.
        label: what error messages and the report call ``source`` when it is a dict already read from a file
            (``open_source`` returns both, so a caller that inspects the file first reads it once).

    Rel-pos tables of another length are resized by linear interpolation.
    Returns a ``LoadReport``.
    """
    report, weights = check_checkpoint(model, source, strict=strict, skip_head=skip_head, label=label)
    model.load_state_dict(weights, strict=False)
    _log(report, bool(getattr(model, "detection", False)))
    return report


def check_checkpoint(
    model: nn.Module,
    source: Source,
    *,
    strict: bool = True,
    skip_head: bool = False,
    label: Optional[str] = None,
) -> tuple[LoadReport, dict[str, Tensor]]:
    """What ``load_checkpoint`` would load, without touching ``model``: (the report, the weights converted to
    ``model``'s names and shapes, rel-pos tables resized). Raises as ``load_checkpoint`` does."""
    _check_model(model)
    conv, label = _read(source, label)
    ckpt = dict(conv.state_dict)
    model_sd = model.state_dict()
    detection = bool(getattr(model, "detection", False))
    ck_info, m_info = describe_state_dict(ckpt), describe_state_dict(model_sd)
    report = LoadReport(source=label, format=conv.format, ignored=list(conv.ignored), notes=list(conv.notes))
    refuse_integer_weights(ckpt, model_sd, label)

    is_trunk_ckpt = ck_info.detection or conv.format == "detectron2"
    if strict and not detection and is_trunk_ckpt and not ck_info.has_final_norm:
        raise ValueError(
            f"Checkpoint {label} is from a detector ({conv.format} format): its MViTv2 trunk has no classifier "
            "norm and head, so it cannot fill a classification model. Load it into MViTv2(arch, detection=True), "
            "use an ImageNet checkpoint for classification, or pass strict=False to initialise only the trunk "
            "(norm and head then stay random)."
        )

    # The expected partial loads.
    if detection and not ck_info.detection:  # ImageNet classifier -> detection trunk
        report.unused = sorted(k for k in ckpt if k.startswith(_CLASSIFIER_ONLY) or k == "cls_token")
        report.initialized = sorted(k for k in model_sd if _SCALE_NORM_RE.match(k))
    elif detection:  # stage norms of outputs this trunk does not produce (out_features)
        report.unused = sorted(k for k in ckpt if _SCALE_NORM_RE.match(k) and k not in model_sd)
    elif not any(k.startswith("head.") for k in model_sd):  # num_classes=0: features only
        report.unused = sorted(k for k in ckpt if k.startswith("head."))
    if skip_head and not detection:
        report.head_skipped = sorted(k for k in model_sd if k.startswith("head."))
        report.unused += sorted(k for k in ckpt if k.startswith("head.") and k not in report.unused)
    for k in report.unused:
        ckpt.pop(k)
    skip = set(report.initialized) | set(report.head_skipped)

    to_load: dict[str, Tensor] = {}
    for k, v in ckpt.items():
        if k not in model_sd:
            report.unexpected.append(k)
            continue
        target = model_sd[k]
        if (
            k.endswith(("rel_pos_h", "rel_pos_w"))
            and v.ndim == target.ndim == 2
            and v.shape[1] == target.shape[1]
            and v.shape[0] != target.shape[0]
        ):
            report.resized.append((k, v.shape[0], target.shape[0]))
            v = _resize_rel_pos(v, target.shape[0])
        if v.shape != target.shape:
            report.mismatched.append((k, tuple(v.shape), tuple(target.shape)))
            continue
        to_load[k] = v
    report.missing = [k for k in model_sd if k not in ckpt and k not in skip]

    if strict and not report.complete:
        raise _mismatch_error(label, conv.format, ck_info, m_info, detection, report)

    report.loaded = sorted(to_load)
    return report, to_load


def _check_model(model: nn.Module) -> None:
    """load_checkpoint fills one MViTv2; a whole detector (or any other module) gets the way to do that instead."""
    if isinstance(model, MViTv2):
        return
    inner = [name for name, m in model.named_modules() if isinstance(m, MViTv2)]
    if inner:
        raise TypeError(
            f"load_checkpoint loads into an MViTv2, got a {type(model).__name__} that contains one at "
            f"{inner[0]!r}. For a detectron2 detector use mvit_det.detection.MViTv2Checkpointer(model).load(path) "
            f"(it also loads detector checkpoints), or load the backbone only: load_checkpoint(model.{inner[0]}, path)."
        )
    raise TypeError(f"load_checkpoint loads into an MViTv2 model, got a {type(model).__name__}.")


def _mismatch_error(
    label: str, fmt: str, ck: CheckpointInfo, m: CheckpointInfo, detection: bool, report: LoadReport
) -> CheckpointMismatchError:
    headline = f"Checkpoint {label} ({fmt} format) does not fit the model ({_model_label(m, detection)})."
    hints = _diagnose(ck, m, detection)
    details = []
    if report.missing:
        details.append(f"Missing from the checkpoint ({len(report.missing)}): {_cap(report.missing)}")
    if report.unexpected:
        details.append(f"Unexpected in the checkpoint ({len(report.unexpected)}): {_cap(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
        details.append(f"Shape mismatch ({len(shapes)}): {_cap(shapes)}")
    lines = [headline, *(f"Likely cause: {h}" for h in hints), *details]
    lines.append(
        "Fix: "
        + ("see the likely cause above. " if hints else "use the checkpoint made for this model. ")
        + "Or pass strict=False to load only the matching weights (everything skipped is logged and listed "
        "in the returned LoadReport)."
    )
    return CheckpointMismatchError("\n".join(lines), headline=headline, details=details, checkpoint_info=ck,
                                   model_info=m, detection=detection)


def _log(report: LoadReport, detection: bool) -> None:
    logger.info("Loaded %d weights from %s (%s format).", len(report.loaded), report.source, report.format)
    for note in report.notes:
        logger.info("Checkpoint conversion: %s.", note)
    if report.ignored:
        logger.info(
            "Ignored %d detector weights outside the MViTv2 trunk (FPN, RPN, ROI heads; Detectron2's "
            "DetectionCheckpointer loads those): %s",
            len(report.ignored),
            _cap(report.ignored),
        )
    if detection and report.initialized:
        logger.info(
            "Initialising a detection trunk from a classification checkpoint, as expected: the classifier "
            "weights %s are not used and %s keep their initialisation.",
            ", ".join(report.unused) or "(none)",
            ", ".join(sorted({k.split('.')[0] for k in report.initialized})),
        )
    elif report.unused:
        logger.info("Checkpoint weights not used by this model, as expected: %s", ", ".join(report.unused))
    if report.head_skipped:
        logger.info(
            "Classifier head not loaded (skip_head=True): %s keep their fresh initialisation.",
            ", ".join(report.head_skipped),
        )
    if report.resized:
        logger.info(
            "Resized %d rel-pos tables by linear interpolation: %s",
            len(report.resized),
            _cap([f"{k} {a}->{b}" for k, a, b in report.resized]),
        )
    if not report.complete:
        shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
        logger.warning(
            "Partial load from %s (strict=False). %d model weights were not in the checkpoint and keep their "
            "random initialisation: %s. %d checkpoint weights have no place in the model: %s. %d skipped for "
            "shape mismatch: %s.",
            report.source,
            len(report.missing),
            ", ".join(report.missing) or "none",
            len(report.unexpected),
            ", ".join(report.unexpected) or "none",
            len(shapes),
            ", ".join(shapes) or "none",
        )
