"""``MViTv2Checkpointer``: detectron2's ``DetectionCheckpointer`` that reads every MViTv2 checkpoint format and
never leaves a layer randomly initialised without saying so.

What it changes, and why:

* **Any ImageNet checkpoint initialises the backbone.** Official ``.pyth``, mmpretrain, timm and mvit-det files
  (paths or URLs, including ``detectron2://ImageNetPretrained/mvitv2/*.pyth``) are converted with
  :mod:`mvit_det.checkpoint` and loaded into the MViTv2 trunk by exact name. detectron2 alone reads only the
  ``.pyth`` layout, through suffix-matching heuristics; an mmpretrain or timm file makes it fail with
  "Unsupported type found in checkpoint", and an MViTv2-S file is half-loaded into a -T detector with a warning.
* **A backbone of the wrong shape is an error**, for ImageNet and detector checkpoints alike: wrong size (S into
  T), the L in1k vs in21k layout, a class token. The message names the checkpoint's size and the fix. Only the
  expected partial loads pass: a classifier's ``norm``/``head`` are unused and the detector's stage norms
  (``scale2..5_norm``), FPN, RPN and ROI heads keep their initialisation. detectron2's usual "Some model
  parameters or buffers are not found in the checkpoint" warning then lists exactly those layers.
* **``require_all=True``** (used for inference and evaluation) turns any weight the checkpoint does not provide,
  or provides with another shape, into a ``ValueError`` that lists them and names the likely cause (a
  different ``num_classes``, an ImageNet checkpoint where a trained detector is needed). With ``False``
  (training initialisation) these are logged by detectron2 as warnings, as usual, since fine-tuning a COCO
  detector with a new number of classes is a normal recipe.
* Unreadable files (missing, empty, truncated, an HTML page, pickled objects) fail with
  :func:`mvit_det.checkpoint.load_file`'s messages instead of a zip or unpickling traceback. Every file is read
  once, by ``load_file``, without running pickled code (``weights_only=True``; ``.pkl`` through a numpy-only
  unpickler), whatever its suffix: a detectron2 ``.pkl`` renamed to ``.pth`` loads.
* Every checkpoint the project or detectron2 writes loads back: the keys of a model wrapped in
  ``DistributedDataParallel`` (``module.``) or compiled with ``torch.compile`` (``_orig_mod.``) are unwrapped, and a
  checkpoint of this very model (for example ``backbone.blocks.*`` from the yacs ``build_mvitv2_backbone``) is
  recognised as such before any ImageNet layout is guessed.
* Integer (int8, ...) tensors for floating-point weights are refused with the reason.
* A URL (``detectron2://``, ``https://``) that cannot be downloaded raises ``DownloadError`` with the "download it
  yourself and pass the file" advice.

Detector checkpoints (detectron2 model-zoo ``.pkl``, ``model_final.pth``, training checkpoints with optimizer
state) are otherwise loaded exactly as ``DetectionCheckpointer`` loads them, so ``--resume`` is unchanged.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoint import DownloadError, detect_format, load_file
from ..checkpoint.formats import unwrap_keys
from ..checkpoint.io import offline_hint
from ..checkpoint.loading import check_checkpoint, refuse_integer_weights
from ..models import MViTv2
from ..utils.atomic import atomic_open

__all__ = ["MViTv2Checkpointer"]

logger = logging.getLogger(__name__)

_CLASSIFIER_FORMATS = ("official", "mmpretrain", "timm", "mvit-det")
_SHOW = 10


def _cap(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f", ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


class MViTv2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` for models with an MViTv2 backbone (see the module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        require_all: raise ``ValueError`` when a loaded checkpoint does not provide every weight of the model
            with the right shape. Use it whenever the weights are used as they are (inference, evaluation).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, require_all: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.require_all = require_all
        self._path: Optional[str] = None
        self._imagenet_format: Optional[str] = None

    # -- reading ------------------------------------------------------------------------------------------
    def load(self, path: str, *args: Any, **kwargs: Any) -> dict:
        if not path:
            if self.require_all:
                self.logger.warning(
                    "No checkpoint given: every weight of the model keeps its RANDOM initialisation, so its "
                    "outputs are meaningless. Pass the trained checkpoint (--weights / train.init_checkpoint / "
                    "MODEL.WEIGHTS)."
                )
            return super().load(path, *args, **kwargs)
        local = path
        if "://" in path and not path.startswith("file://"):
            local = self._download(path)
        if not os.path.exists(local):
            raise FileNotFoundError(
                f"Checkpoint {path} not found. Check the path (relative paths are relative to {os.getcwd()})."
            )
        self._path, self._imagenet_format = path, None
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._path = None

    def _download(self, path: str) -> str:
        """The local copy of a URL (detectron2's path manager downloads it once); offline: the manual fix."""
        url = path.split("?", 1)[0]
        try:
            return self.path_manager.get_local_path(url)
        except Exception as e:  # URLError, HTTPError, timeouts, iopath's own errors: all mean "not downloaded"
            resolved = url
            if url.startswith("detectron2://"):
                from detectron2.utils.file_io import Detectron2Handler

                resolved = Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX):]
            reason = getattr(e, "reason", None) or e
            raise DownloadError(
                f"Could not download checkpoint {path}"
                + (f" ({resolved})" if resolved != url else "")
                + f": {reason}. "
                + offline_hint(resolved, setting="train.init_checkpoint=/path/to/{name} (LazyConfig) or MODEL.WEIGHTS "
                "/path/to/{name} (yacs), or --weights /path/to/{name}")
            ) from None

    def _trunk(self) -> tuple[str, Optional[MViTv2]]:
        """(prefix of its parameters, module) of the model's MViTv2 backbone, or ("", None) if it has none."""
        found = [(name, m) for name, m in self.model.named_modules() if isinstance(m, MViTv2)]
        if len(found) != 1:
            return "", None
        name, module = found[0]
        return (name + "." if name else ""), module

    def _load_file(self, filename: str) -> dict:
        # Read once, safely (no pickled code), with clear errors for missing / empty / truncated / non-checkpoint
        # files; detectron2's own reading (torch.load, or pickle.load for .pkl) is never used.
        raw = self._unwrapped(load_file(filename), filename)
        prefix, trunk = self._trunk()
        native = self._is_native(raw, prefix)
        fmt = None
        if not native:
            try:
                fmt = detect_format(raw)
            except ValueError:
                fmt = None  # not an MViTv2 layout we know: leave it to detectron2
        if fmt in _CLASSIFIER_FORMATS and trunk is not None:
            return self._from_imagenet(raw, filename, prefix, trunk)
        loaded = self._as_detectron2(raw, filename)
        if isinstance(loaded.get("model"), Mapping):
            refuse_integer_weights(loaded["model"], self.model.state_dict(), filename)
        if (native or fmt == "detectron2") and trunk is not None:
            self._check_trunk(loaded["model"], filename, prefix, trunk)
        return loaded

    def _unwrapped(self, raw: Any, filename: str) -> Any:
        """``raw`` with the DDP / torch.compile prefixes of its weights removed (logged)."""
        if not isinstance(raw, Mapping):
            return raw
        key = "model" if isinstance(raw.get("model"), Mapping) else None
        sd, removed = unwrap_keys(raw[key] if key else raw)
        if not removed:
            return raw
        self.logger.info("Removed the wrapper prefix(es) %s from the weight names of %s.", ", ".join(removed), filename)
        return {**raw, key: sd} if key else sd

    def _is_native(self, raw: Any, prefix: str) -> bool:
        """A checkpoint of this model's own layout (its trunk weights under the trunk's name), e.g. one written by
        training with the yacs ``build_mvitv2_backbone`` (``backbone.blocks.*``, which mmpretrain also uses)."""
        if not prefix or not isinstance(raw, Mapping):
            return False
        sd = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
        return f"{prefix}patch_embed.proj.weight" in sd

    def _as_detectron2(self, raw: Any, filename: str) -> dict:
        """What ``DetectionCheckpointer._load_file`` returns for this file, built from the already loaded ``raw``."""
        if isinstance(raw, Mapping) and "model" in raw and "__author__" in raw:  # detectron2 model zoo (any suffix)
            self.logger.info("Reading a file from '%s'", raw["__author__"])
            return dict(raw)
        if filename.endswith(".pkl") and isinstance(raw, Mapping):  # Caffe2 / Detectron1 model zoo, as detectron2
            data = raw.get("blobs", raw)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth") and isinstance(raw, Mapping) and "model_state" in raw:  # pycls
            state = {k: v for k, v in raw["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if filename.endswith((".pkl", ".pyth")):
            # detectron2 would read the file a second time (pickle.load / torch.load) only to reject it
            raise ValueError(
                f"Cannot load {filename}: a {os.path.splitext(filename)[1]} checkpoint must be a detectron2 or Caffe2 "
                f"model-zoo dict, or a pycls dict with 'model_state'; it holds a {type(raw).__name__}"
                + (f" with the keys {sorted(map(str, raw))[:10]}." if isinstance(raw, Mapping) else ".")
            )
        self._raw = raw  # detectron2's generic path (query options, "model" wrapping) reads it via _torch_load
        try:
            return super()._load_file(filename)
        finally:
            self._raw = None

    def _torch_load(self, f: str) -> Any:
        raw = getattr(self, "_raw", None)
        return raw if raw is not None else load_file(f)

    def _from_imagenet(self, raw: Any, filename: str, prefix: str, trunk: MViTv2) -> dict:
        """Convert an ImageNet checkpoint, check it strictly against the trunk, and hand the trunk weights under
        their full names to detectron2's loader (whose log then lists everything else as initialised). The trunk
        itself is left untouched until that loader runs."""
        try:
            report, weights = check_checkpoint(trunk, raw, strict=True)  # rel-pos tables resized to the trunk's
        except ValueError as e:
            raise ValueError(self._relabel(e, filename, prefix)) from None
        self._imagenet_format = report.format
        self.logger.info(
            "Read %s as an ImageNet MViTv2 checkpoint (%s format): %d backbone weights for %s; the classifier's %s "
            "are not used. The detector's other layers (%s, FPN, RPN, ROI heads) keep their initialisation, as "
            "expected when starting from ImageNet weights.",
            filename, report.format, len(report.loaded), prefix.rstrip(".") or "the model",
            ", ".join(report.unused) or "(nothing)", ", ".join(sorted({k.split(".")[0] for k in report.initialized})),
        )  # fmt: skip
        return {
            "model": {prefix + k: v for k, v in weights.items()},
            "__author__": f"mvit-det ({report.format})",
            "matching_heuristics": False,
        }

    def _check_trunk(self, model_sd: dict, filename: str, prefix: str, trunk: MViTv2) -> None:
        """The backbone part of a detector checkpoint must fit the trunk exactly (size, layout, class token)."""
        part = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(
                f"Checkpoint {filename} is a detector checkpoint without MViTv2 backbone weights (no keys under "
                f"{prefix!r}): it belongs to a model with another backbone. Use a checkpoint of this config."
            )
        try:
            check_checkpoint(trunk, part, strict=True)  # only checks: detectron2's loader then loads the detector
        except ValueError as e:
            raise ValueError(self._relabel(e, filename, prefix)) from None

    @staticmethod
    def _relabel(error: ValueError, filename: str, prefix: str) -> str:
        msg = str(error).replace("Checkpoint <dict>", f"Checkpoint {filename!r}", 1)
        where = prefix.rstrip(".") or "model"
        return f"Cannot load {filename}: it does not fit the MViTv2 backbone ({where}) of this model.\n{msg}"

    # -- loading ------------------------------------------------------------------------------------------
    def _load_model(self, checkpoint: dict):
        incompatible = super()._load_model(checkpoint)
        if self.require_all and incompatible is not None:
            if incompatible.missing_keys or incompatible.incorrect_shapes:
                raise ValueError(self._incomplete_message(incompatible))
        return incompatible

    def _incomplete_message(self, incompatible) -> str:
        missing = sorted(incompatible.missing_keys)
        shapes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        lines = [
            f"Checkpoint {self._path} does not provide every weight of this model, so some layers would keep their "
            "random initialisation and the outputs would be meaningless. Inference and evaluation need a "
            "checkpoint of this exact model."
        ]
        if self._imagenet_format is not None:
            lines.append(
                f"Likely cause: it is an ImageNet classification checkpoint ({self._imagenet_format} format), which "
                "holds only the backbone. It can initialise training (train.init_checkpoint / MODEL.WEIGHTS), but "
                "for inference you need a trained detector checkpoint (e.g. output/model_final.pth)."
            )
        cls = [(k, a, b) for k, a, b in shapes if k.endswith("cls_score.weight")]
        if cls:
            _, a, b = cls[0]
            lines.append(
                f"Likely cause: the checkpoint predicts {a[0] - 1} classes but this model {b[0] - 1}. Set "
                f"model.roi_heads.num_classes={a[0] - 1} (LazyConfig) or MODEL.ROI_HEADS.NUM_CLASSES {a[0] - 1} "
                "(yacs) to use the checkpoint as it is, or use the checkpoint trained with this config."
            )
        if missing:
            lines.append(f"Not in the checkpoint ({len(missing)}): {_cap(missing)}")
        if shapes:
            shown = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes]
            lines.append(f"Shape mismatch ({len(shown)}): {_cap(shown)}")
        return "\n".join(lines)


class AtomicCheckpointer(MViTv2Checkpointer):
    """``MViTv2Checkpointer`` whose files are always complete: write to ``<file>.tmp<pid>.<random>``, then
    ``os.replace`` (:mod:`mvit_det.utils.atomic`). The trainer saves with it; loading, resuming included, goes
    through ``MViTv2Checkpointer``.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _atomic_write(path, lambda f: torch.save(data, f), binary=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)


def _atomic_write(path: str, write, binary: bool) -> None:
    with atomic_open(path, "wb" if binary else "w") as f:
        write(f)
