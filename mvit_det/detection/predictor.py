"""Single-image inference for both config systems.

* yacs (``.yaml``) users keep detectron2's ``DefaultPredictor(cfg)`` unchanged: build ``cfg`` with ``get_cfg()`` +
  ``add_mvitv2_config(cfg)`` + ``merge_from_file``, set ``MODEL.WEIGHTS`` (and ``MODEL.DEVICE = "cpu"`` without a GPU).
* LazyConfig (``.py``) users get :class:`LazyPredictor`, which does what ``DefaultPredictor`` does for yacs:
  instantiate ``cfg.model``, load weights, apply the config's test-time augmentation (``cfg.dataloader.test.mapper``)
  and input channel order, and return ``{"instances": Instances}`` in original image coordinates.
* :func:`build_predictor` picks the right one from a config path (for yacs, :class:`CheckedDefaultPredictor`:
  ``DefaultPredictor`` with the weight and input checks below).

Weights load through :class:`~mvit_det.detection.checkpoint.MViTv2Checkpointer` with ``require_all=True``: a
checkpoint that leaves any layer at its random initialisation (an ImageNet backbone, another ``num_classes``) is an
error, not a warning. A non-float32 model and images too elongated for the test resize are refused with the fix.

Both take one BGR ``uint8`` array of shape (H, W, 3), as returned by ``cv2.imread``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor

from .checkpoint import MViTv2Checkpointer

__all__ = ["CheckedDefaultPredictor", "LazyPredictor", "build_predictor", "dataset_metadata"]


def dataset_metadata(names: Union[str, Sequence[str]]) -> Metadata:
    """Metadata (class names, colours) of the first dataset in ``names`` that is known.

    A registered dataset gives its ``MetadataCatalog`` entry (class names read from its COCO json if it was not
    loaded yet). The built-in toy names give the toy classes without generating the data. Otherwise an empty ``Metadata``: the Visualizer then labels detections by class index.
    """
    from ..data.toy import TOY_CLASSES, TOY_COLORS, TOY_DATASET_NAMES

    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("thing_classes") is None and os.path.isfile(meta.get("json_file", "")):
                # register_coco_instances fills thing_classes only when the data is loaded; read the categories.
                with open(meta.json_file) as f:
                    cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
                return Metadata(name=name, thing_classes=[c["name"] for c in cats])
            return meta
        if name in TOY_DATASET_NAMES:
            return Metadata(name=name, thing_classes=list(TOY_CLASSES), thing_colors=[list(c) for c in TOY_COLORS])
    return Metadata(name="unregistered")


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"The predictor expects a numpy uint8 array of shape (H, W, 3) in BGR order (as from cv2.imread), got "
            f"{type(image).__name__}. For a PIL image use np.asarray(img.convert('RGB'))[:, :, ::-1]."
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"The predictor expects a (H, W, 3) BGR image, got shape {image.shape}. Convert grayscale or RGBA images "
            "to 3-channel BGR first (e.g. cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))."
        )
    if image.dtype != np.uint8:
        raise ValueError(f"The predictor expects a uint8 image (0..255), got dtype {image.dtype}.")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"The image is empty (shape {image.shape}).")
    return image


def _check_model_dtype(model: torch.nn.Module) -> None:
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise TypeError(
            f"The predictor runs the detector in float32, but its weights are {dtype} (model.half() or .to(dtype)); "
            "detectron2's detectors do not support that. Keep the model in float32 and, for reduced precision, wrap "
            "the call in torch.autocast('cpu', dtype=torch.bfloat16) (or torch.autocast('cuda'))."
        )


def _check_resizable(augs: Sequence[T.Augmentation], height: int, width: int) -> None:
    """Name the problem before PIL's "height and width must be > 0" when the test resize would shrink a very
    elongated image to nothing."""
    for aug in augs:
        if isinstance(aug, T.ResizeShortestEdge):
            for short in aug.short_edge_length:
                if min(T.ResizeShortestEdge.get_output_shape(height, width, short, aug.max_size)) < 1:
                    raise ValueError(
                        f"Cannot run the detector on an image of {height}x{width} pixels: with the test resize (short "
                        f"side {short}, long side at most {aug.max_size}) its shorter side would be resized to 0 "
                        f"pixels. Crop it, or cut it into tiles, to an aspect ratio of at most {2 * aug.max_size}:1."
                    )


class LazyPredictor:
    """``DefaultPredictor`` for LazyConfig models.

    Args:
        cfg: a LazyConfig (``omegaconf.DictConfig``) or the path of a ``.py`` config.
        weights: checkpoint to load (path or URL). ``None`` uses ``cfg.train.init_checkpoint``; ``""`` loads nothing
            (random weights, for tests).
        device: ``"cpu"``, ``"cuda"``, ... Default: CUDA if available, else CPU.

    Attributes:
        model: the detector, in eval mode.
        aug: the test-time ``AugmentationList`` from ``cfg.dataloader.test.mapper.augmentations``.
        input_format: channel order the model expects (``cfg.dataloader.test.mapper.image_format``).
        metadata: class names of ``cfg.dataloader.test.dataset.names`` (see :func:`dataset_metadata`).

    ``predictor(image)`` with ``image`` a BGR uint8 (H, W, 3) array returns ``{"instances": Instances}`` with boxes
    and masks in the coordinates of ``image``.
    """

    def __init__(self, cfg, weights: Optional[str] = None, device: Optional[str] = None):
        if isinstance(cfg, (str, os.PathLike)):
            path = os.fspath(cfg)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Config file {path} does not exist.")
            if not path.endswith(".py"):
                raise ValueError(
                    f"LazyPredictor needs a LazyConfig .py file, got {path}. For a yacs .yaml config use "
                    "detectron2.engine.DefaultPredictor or mvit_det.detection.build_predictor."
                )
            cfg = LazyConfig.load(path)
        for key in ("model", "dataloader"):
            if key not in cfg:
                raise ValueError(f"LazyPredictor: the config has no '{key}' entry; is this a detectron2 LazyConfig?")
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        self.model = instantiate(cfg.model).to(self.device).eval()
        if weights is None:
            weights = cfg.get("train", {}).get("init_checkpoint", "")
        # Every weight must come from the checkpoint: an ImageNet checkpoint or one for another num_classes is an
        # error here, not a warning (``""`` keeps the random initialisation, with a warning).
        MViTv2Checkpointer(self.model, require_all=True).load(weights)

        test = cfg.dataloader.test
        self.aug = T.AugmentationList(list(instantiate(test.mapper.augmentations)))
        self.input_format = str(test.mapper.get("image_format", "BGR"))
        if self.input_format not in ("BGR", "RGB"):
            raise ValueError(f"LazyPredictor supports image_format 'BGR' or 'RGB', the config has {self.input_format!r}.")
        self.metadata = dataset_metadata(test.dataset.names)

    @torch.no_grad()
    def __call__(self, original_image: np.ndarray) -> dict:
        """(H, W, 3) BGR uint8 -> ``{"instances": Instances}`` (boxes, scores, classes, masks; image coordinates)."""
        image = _check_image(original_image)
        _check_model_dtype(self.model)
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        _check_resizable(self.aug.augs, height, width)
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.aug(aug_input)
        tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1)).to(self.device)
        return self.model([{"image": tensor, "height": height, "width": width}])[0]


class CheckedDefaultPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (yacs configs) with the weight loading and input checks of
    :class:`LazyPredictor`: every weight must come from ``cfg.MODEL.WEIGHTS``, and a bad image, a float16 model or
    an image too elongated for the test resize raise an error that says what to do."""

    def __init__(self, cfg):
        weights = cfg.MODEL.WEIGHTS
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""  # loaded below, with MViTv2Checkpointer's checks
        cfg.freeze()
        super().__init__(cfg)
        MViTv2Checkpointer(self.model, require_all=True).load(weights)

    def __call__(self, original_image: np.ndarray) -> dict:
        image = _check_image(original_image)
        _check_model_dtype(self.model)
        _check_resizable([self.aug], *image.shape[:2])
        return super().__call__(image)


def build_predictor(config_path: str, weights: Optional[str] = None, device: Optional[str] = None, opts: Sequence[str] = ()):
    """A predictor for a ``.py`` (``LazyPredictor``) or ``.yaml`` (``CheckedDefaultPredictor``) config.

    Args:
        config_path: the config file.
        weights: checkpoint; ``None`` keeps the config's (``train.init_checkpoint`` / ``MODEL.WEIGHTS``).
        device: default CUDA if available, else CPU.
        opts: config overrides (``key=value`` for ``.py``; ``KEY VALUE`` or ``KEY=VALUE`` for ``.yaml``).

    The returned predictor has a ``metadata`` attribute with the test dataset's class names.
    """
    from .engine import is_lazy, load_config

    cfg = load_config(config_path, opts)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_lazy(cfg):
        return LazyPredictor(cfg, weights=weights, device=device)
    cfg.defrost()
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    predictor = CheckedDefaultPredictor(cfg)
    predictor.metadata = dataset_metadata(cfg.DATASETS.TEST)
    return predictor
