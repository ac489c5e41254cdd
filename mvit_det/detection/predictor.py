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

Both take one BGR ``uint8`` array of shape (H, W, 3), as returned by ``cv2.imread``, and return
``{"instances": Instances}`` in the coordinates of that image; or a list of such arrays, and return a list of such
dicts. A list goes through the model ``batch_size`` images at a time. Only images whose padded network input has the
same size share a batch (all of them for the ViTDet recipe's 1024 square padding; frames of one video always): the
MViTv2 backbone attends over the whole padded input, so padding an image to a larger neighbour's size would change
its detections. Batched results therefore equal one-by-one results.

Options of both (keyword arguments of the constructors and of :func:`build_predictor`):

* ``precision``: ``"fp32"`` (default), ``"bf16"`` (autocast on the model's device; CPU or a CUDA GPU that supports
  it) or ``"fp16"`` (autocast, CUDA only). The weights stay float32.
* ``tta``: test-time augmentation through detectron2's ``GeneralizedRCNNWithTTA``: every image at several
  shorter-side sizes, each also flipped horizontally, the boxes merged by NMS and the masks averaged. ``True`` uses
  detectron2's defaults (``TEST.AUG``: sizes 400-1200 in steps of 100, longer side <= 4000, flip) or, for a yacs
  config, the config's ``TEST.AUG``; a dict such as ``{"min_sizes": [800], "max_size": 1333, "flip": False}``
  overrides any of them.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.structures import Boxes
from omegaconf import DictConfig

from ..models.fastpath import log_bf16_fallback, native_bf16
from .checkpoint import MViTv2Checkpointer
from .run_config import apply_overrides, is_lazy, load_config

__all__ = ["PRECISIONS", "CheckedDefaultPredictor", "LazyPredictor", "build_predictor", "dataset_metadata"]

#: ``precision`` values and the autocast dtype of each (``None``: no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dataset_metadata(names: Union[str, Sequence[str]]) -> Metadata:
    """Metadata (class names, colours) of the first dataset in ``names`` that is known.

    A registered dataset gives its ``MetadataCatalog`` entry (class names read from its COCO json if it was not
    loaded yet; the built-in toy sets carry theirs from registration). Otherwise an empty ``Metadata``: the
    Visualizer then labels detections by class index.
    """
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
            "detectron2's detectors do not support that. Keep the model in float32 and, for reduced precision, build the "
            "predictor with precision='bf16' (CPU or GPU) or 'fp16' (CUDA), or wrap the call in "
            "torch.autocast('cpu', dtype=torch.bfloat16) (or torch.autocast('cuda'))."
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


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``device`` as a torch.device (default: CUDA if available, else CPU); ValueError with the fix for a CUDA device
    this machine does not have, rather than torch's driver error from deep inside the first ``.to()``."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"Unknown device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for a CUDA GPU, but torch sees none on this machine "
                             "(torch.cuda.is_available() is False); use device 'cpu'.")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return dev


def _autocast_context(device: torch.device, precision: str):
    """A context that runs the model at ``precision`` on ``device``; raises ValueError with the fix when that
    combination cannot work."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs a CUDA device (float16 autocast is not supported for detection on {device.type}); "
            "on the CPU use precision 'bf16' (or 'fp32')."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU does not support bfloat16; use precision 'fp16' or 'fp32'.")
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        # Emulated bf16 convolutions and GEMMs run 6-20x slower than fp32 on such a CPU.
        log_bf16_fallback("the detector runs in float32")
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _float32_instances(instances):
    """Reduced-precision runs can leave float16/bfloat16 fields; hand back float32 like an fp32 run."""
    for name, value in list(instances.get_fields().items()):
        if isinstance(value, Boxes) and value.tensor.dtype != torch.float32:
            instances.set(name, Boxes(value.tensor.float()))
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            instances.set(name, value.float())
    return instances


#: detectron2's ``TEST.AUG`` defaults (``detectron2.config.defaults``), used by ``tta=True`` for LazyConfig models.
def _default_tta() -> dict:
    aug = get_cfg().TEST.AUG
    return {"min_sizes": list(aug.MIN_SIZES), "max_size": int(aug.MAX_SIZE), "flip": bool(aug.FLIP)}


def _tta_settings(tta: Union[bool, Mapping, None], defaults: dict) -> Optional[dict]:
    if not tta:
        return None
    settings = dict(defaults)
    if isinstance(tta, Mapping):
        unknown = set(tta) - set(settings)
        if unknown:
            raise ValueError(f"Unknown tta setting(s) {sorted(unknown)}: use min_sizes, max_size and flip.")
        settings.update(tta)
    elif tta is not True:
        raise TypeError(f"tta must be True, False or a dict of min_sizes / max_size / flip, got {tta!r}.")
    settings["min_sizes"] = [int(x) for x in settings["min_sizes"]]
    if not settings["min_sizes"]:
        raise ValueError("tta min_sizes is empty; give at least one shorter-side size.")
    return settings


def _lazy_tta_cfg(model: torch.nn.Module, settings: dict):
    """The yacs keys ``GeneralizedRCNNWithTTA`` reads, filled from a LazyConfig-built model."""
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(f"Test-time augmentation needs a GeneralizedRCNN (Mask/Cascade R-CNN), got {type(model).__name__}.")
    roi_heads = model.roi_heads
    predictor = roi_heads.box_predictor
    if isinstance(predictor, torch.nn.ModuleList):  # cascade: the last stage's settings apply to the output
        predictor = predictor[-1]
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = bool(getattr(roi_heads, "mask_on", False))
    cfg.MODEL.KEYPOINT_ON = False
    cfg.MODEL.LOAD_PROPOSALS = False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(predictor.num_classes)
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = float(predictor.test_nms_thresh)
    cfg.TEST.DETECTIONS_PER_IMAGE = int(predictor.test_topk_per_image)
    cfg.TEST.AUG.MIN_SIZES = tuple(settings["min_sizes"])
    cfg.TEST.AUG.MAX_SIZE = settings["max_size"]
    cfg.TEST.AUG.FLIP = settings["flip"]
    return cfg


class _BatchedPredictor:
    """What both predictors share: input checks, one image or a list, batching by padded size, precision, TTA.

    Subclasses set ``model``, ``device``, ``input_format``, ``augs`` (the test-time resize, a list of
    augmentations) and call :meth:`_setup_options`.
    """

    model: torch.nn.Module
    device: torch.device
    input_format: str
    augs: list

    def _setup_options(self, batch_size: int, precision: str, tta, tta_cfg_fn) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self.precision = precision
        self._autocast = _autocast_context(self.device, precision)
        self.tta = None
        self.tta_settings = None
        settings = tta_cfg_fn(tta)
        if settings is not None:
            cfg, self.tta_settings = settings
            self.tta = GeneralizedRCNNWithTTA(cfg, self.model, batch_size=batch_size)

    # -- inputs ------------------------------------------------------------------------------------------
    def check(self, image: Any) -> np.ndarray:
        """Raise ``TypeError``/``ValueError`` (with the fix) if ``image`` cannot be run; return it otherwise. Batch
        tools call this to skip a bad image instead of failing the whole batch."""
        image = _check_image(image)
        height, width = image.shape[:2]
        _check_resizable(self.augs, height, width)
        if self.tta_settings is not None:
            s = self.tta_settings
            _check_resizable([T.ResizeShortestEdge(size, s["max_size"]) for size in s["min_sizes"]], height, width)
        return image

    def _model_input(self, image: np.ndarray) -> dict:
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        if self.tta is not None:  # GeneralizedRCNNWithTTA resizes the original image itself
            tensor = torch.as_tensor(np.ascontiguousarray(image).transpose(2, 0, 1))
            return {"image": tensor, "height": height, "width": width}
        aug_input = T.AugInput(np.ascontiguousarray(image))
        T.AugmentationList(self.augs)(aug_input)
        tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1)).to(self.device)
        return {"image": tensor, "height": height, "width": width}

    def _padded_shape(self, tensor: torch.Tensor) -> tuple[int, int]:
        """The (H, W) that detectron2's ``ImageList.from_tensors`` pads this image to when it is alone."""
        backbone = self.model.backbone
        stride = int(backbone.size_divisibility)
        constraints = getattr(backbone, "padding_constraints", {}) or {}
        stride = int(constraints.get("size_divisibility", stride))
        h, w = tensor.shape[-2:]
        square = int(constraints.get("square_size", 0))
        if square > 0:
            h = w = max(square, h, w)
        if stride > 1:
            h, w = -(-h // stride) * stride, -(-w // stride) * stride
        return int(h), int(w)

    # -- running -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
        """One (H, W, 3) BGR uint8 array -> ``{"instances": Instances}`` (boxes, scores, classes, masks; image
        coordinates). A list of arrays -> a list of such dicts, in the same order."""
        if isinstance(images, (list, tuple)):
            return self._predict(list(images))
        return self._predict([images])[0]

    def _predict(self, images: list) -> list:
        checked = [self.check(im) for im in images]
        _check_model_dtype(self.model)
        inputs = [self._model_input(im) for im in checked]
        outputs: list = [None] * len(inputs)
        with self._autocast():
            if self.tta is not None:
                for i, x in enumerate(inputs):  # TTA batches the augmented views of one image
                    outputs[i] = self.tta([x])[0]
            else:
                groups: dict = {}
                for i, x in enumerate(inputs):
                    groups.setdefault(self._padded_shape(x["image"]), []).append(i)
                for idx in groups.values():
                    for k in range(0, len(idx), self.batch_size):
                        chunk = idx[k : k + self.batch_size]
                        for i, out in zip(chunk, self.model([inputs[i] for i in chunk])):
                            outputs[i] = out
        for out in outputs:
            if "instances" in out:
                out["instances"] = _float32_instances(out["instances"])
        return outputs


class LazyPredictor(_BatchedPredictor):
    """``DefaultPredictor`` for LazyConfig models.

    Args:
        cfg: a LazyConfig (``omegaconf.DictConfig``) or the path of a ``.py`` config.
        weights: checkpoint to load (path or URL). ``None`` uses ``cfg.train.init_checkpoint``; ``""`` loads nothing
            (random weights, for tests).
        device: ``"cpu"``, ``"cuda"``, ... Default: CUDA if available, else CPU.
        batch_size: images per model call when the predictor is given a list.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only); see the module docstring.
        tta: test-time augmentation: ``False``, ``True`` (detectron2's ``TEST.AUG`` defaults) or a dict of
            ``min_sizes``, ``max_size``, ``flip``.

    Attributes:
        model: the detector, in eval mode.
        aug: the test-time ``AugmentationList`` from ``cfg.dataloader.test.mapper.augmentations``.
        input_format: channel order the model expects (``cfg.dataloader.test.mapper.image_format``).
        metadata: class names of ``cfg.dataloader.test.dataset.names`` (see :func:`dataset_metadata`).

    ``predictor(image)`` with ``image`` a BGR uint8 (H, W, 3) array returns ``{"instances": Instances}`` with boxes
    and masks in the coordinates of ``image``; ``predictor([img1, img2, ...])`` returns a list of those.
    """

    def __init__(
        self,
        cfg,
        weights: Optional[str] = None,
        device: Optional[str] = None,
        *,
        batch_size: int = 1,
        precision: str = "fp32",
        tta: Union[bool, Mapping] = False,
    ):
        if not isinstance(cfg, (str, os.PathLike, Mapping)):
            raise TypeError(
                f"LazyPredictor takes a LazyConfig (.py path or the loaded config), not a {type(cfg).__name__}. "
                "Build detectors from their config: LazyPredictor('configs/mvitv2_t_maskrcnn.py', weights=...)."
            )
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
        self.device = resolve_device(device)
        _autocast_context(self.device, precision)  # refuse fp16 on the CPU before building the model

        test = cfg.dataloader.test
        self.aug = T.AugmentationList(list(instantiate(test.mapper.augmentations)))
        self.augs = list(self.aug.augs)
        self.input_format = str(test.mapper.get("image_format", "BGR"))
        if self.input_format not in ("BGR", "RGB"):
            raise ValueError(f"LazyPredictor supports image_format 'BGR' or 'RGB', the config has {self.input_format!r}.")
        self.metadata = dataset_metadata(test.dataset.names)

        self.model = instantiate(cfg.model).to(self.device).eval()
        if weights is None:
            weights = cfg.get("train", {}).get("init_checkpoint", "")
        # Every weight must come from the checkpoint: an ImageNet checkpoint or one for another num_classes is an
        # error here, not a warning (``""`` keeps the random initialisation, with a warning).
        MViTv2Checkpointer(self.model, require_all=True).load(weights)

        def tta_cfg(tta):
            settings = _tta_settings(tta, _default_tta())
            return None if settings is None else (_lazy_tta_cfg(self.model, settings), settings)

        self._setup_options(batch_size, precision, tta, tta_cfg)


class CheckedDefaultPredictor(_BatchedPredictor, DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (yacs configs) with the weight loading and input checks of
    :class:`LazyPredictor`: every weight must come from ``cfg.MODEL.WEIGHTS``, and a bad image, a float16 model or
    an image too elongated for the test resize raise an error that says what to do. Like :class:`LazyPredictor` it
    takes one image or a list, and ``batch_size``, ``precision`` and ``tta`` (``True``: the config's ``TEST.AUG``)."""

    def __init__(self, cfg, *, batch_size: int = 1, precision: str = "fp32", tta: Union[bool, Mapping] = False):
        weights = cfg.MODEL.WEIGHTS
        _autocast_context(torch.device(cfg.MODEL.DEVICE), precision)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""  # loaded below, with MViTv2Checkpointer's checks
        cfg.freeze()
        DefaultPredictor.__init__(self, cfg)
        MViTv2Checkpointer(self.model, require_all=True).load(weights)
        self.device = self.model.device
        self.augs = [self.aug]

        def tta_cfg(tta):
            aug = cfg.TEST.AUG
            defaults = {"min_sizes": list(aug.MIN_SIZES), "max_size": int(aug.MAX_SIZE), "flip": bool(aug.FLIP)}
            settings = _tta_settings(tta, defaults)
            if settings is None:
                return None
            tcfg = cfg.clone()
            tcfg.defrost()
            tcfg.TEST.AUG.MIN_SIZES = tuple(settings["min_sizes"])
            tcfg.TEST.AUG.MAX_SIZE = settings["max_size"]
            tcfg.TEST.AUG.FLIP = settings["flip"]
            tcfg.freeze()
            return tcfg, settings

        self._setup_options(batch_size, precision, tta, tta_cfg)

    __call__ = _BatchedPredictor.__call__


def build_predictor(
    config_path: Union[str, os.PathLike, DictConfig, CfgNode],
    weights: Optional[str] = None,
    device: Optional[str] = None,
    opts: Sequence[str] = (),
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    tta: Union[bool, Mapping] = False,
):
    """A predictor for a ``.py`` (``LazyPredictor``) or ``.yaml`` (``CheckedDefaultPredictor``) config.

    Args:
        config_path: the config file, or a config already loaded (a LazyConfig ``DictConfig`` or a yacs
            ``CfgNode``; copied, then ``opts`` applied).
        weights: checkpoint; ``None`` keeps the config's (``train.init_checkpoint`` / ``MODEL.WEIGHTS``).
        device: default CUDA if available, else CPU.
        opts: config overrides (``key=value`` for ``.py``; ``KEY VALUE`` or ``KEY=VALUE`` for ``.yaml``).
        batch_size, precision, tta: see :class:`LazyPredictor`.

    The returned predictor has a ``metadata`` attribute with the test dataset's class names.
    """
    if isinstance(config_path, (DictConfig, CfgNode)):
        cfg = apply_overrides(copy.deepcopy(config_path), opts)  # the caller's config stays as it was
    else:
        if not isinstance(config_path, (str, os.PathLike)):
            raise TypeError(f"build_predictor takes a config file path or a loaded config, not a "
                            f"{type(config_path).__name__}.")  # fmt: skip
        try:
            cfg = load_config(os.fspath(config_path), opts)
        except FileNotFoundError as e:
            from .zoo import DETECTORS  # a zoo name given as a path; imported here: the zoo imports this module

            if os.fspath(config_path) in DETECTORS:
                raise FileNotFoundError(f"{e} {config_path!r} is a detector of the model zoo: use "
                                        f"mvit_det.detection.zoo.get_detector({config_path!r}).") from None  # fmt: skip
            raise
    device = str(resolve_device(device))
    options = dict(batch_size=batch_size, precision=precision, tta=tta)
    if is_lazy(cfg):
        return LazyPredictor(cfg, weights=weights, device=device, **options)
    cfg.defrost()
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    predictor = CheckedDefaultPredictor(cfg, **options)
    predictor.metadata = dataset_metadata(cfg.DATASETS.TEST)
    return predictor
