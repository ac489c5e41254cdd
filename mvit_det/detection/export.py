"""Whole detectors (Mask R-CNN, Cascade Mask R-CNN) to ONNX or TorchScript, and a predictor that runs the file.

The graph is traced with detectron2's :class:`~detectron2.export.TracingAdapter` around :func:`graph_inference`:

* **Inputs.** ``image``: float32 ``(3, H, W)``, 0..255, in the model's channel order (``input_format``, RGB for the
  MViTv2 configs), at the fixed size the graph was exported at; ``image_size``: int64 ``(2,)``, the ``(h, w)`` of
  the real image inside it. The MViTv2 trunk is specialised to its input size (the rel-pos terms are sized for it)
  and so is the graph.
* **Resize and pad** (:func:`prepare_image`, outside the graph): the image is scaled by
  ``min(H / height, W / width)`` (aspect ratio kept, ``h = round(height * scale)``), resized with detectron2's
  ``ResizeTransform`` (PIL bilinear, as ``ResizeShortestEdge``), and placed in the top-left corner; the rest is
  padding. Inside the graph the image is normalised with the model's pixel mean and std and the padding set to 0,
  which is what detectron2's ``ImageList.from_tensors`` pads with; proposals and boxes are clipped to ``(h, w)``.
  ``--img-size 800x1344`` gives a 4:3 landscape photo the 800-pixel short side of the configs' test resize.
* **Outputs**, in detectron2's ``do_postprocess=False`` form (boxes in the coordinates of the resized image, 28x28
  mask probabilities per detection): ``pred_boxes``, ``pred_classes``, ``pred_masks``, ``scores`` and the image
  size (the flattened ``Instances`` of TracingAdapter's schema). The number of detections is dynamic.

:class:`ExportedPredictor` undoes the resize with detectron2's ``detector_postprocess`` (boxes scaled to the
original image, masks pasted with ``paste_masks_in_image`` at threshold 0.5): the ``LazyPredictor`` contract, BGR
uint8 image in, ``{"instances": Instances}`` in image coordinates out. What it needs (input size, channel order,
class names, output names) is in ``<file>.json`` beside the exported file.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import detectron2
import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.data.transforms import ResizeTransform
from detectron2.export import TracingAdapter
from detectron2.export.flatten import flatten_to_tuple
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from ..utils.atomic import temp_name
from .builders import build_model
from .checkpoint import MViTv2Checkpointer
from .predictor import _check_image, dataset_metadata
from .run_config import _set, is_lazy, load_config

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportCheckError",
    "ExportedPredictor",
    "PyTorchFixedSizePredictor",
    "compare_instances",
    "export_detector",
    "graph_inference",
    "load_detector",
    "prepare_image",
]

#: format -> file name inside the output folder
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
#: largest allowed differences between the exported file and PyTorch: box corners (pixels of the original image),
#: scores, and the fraction of the image's pixels on which one pasted mask differs.
TOLERANCE = {"box_px": 1e-2, "score": 1e-4, "mask_frac": 1e-3}
_META_VERSION = 1
#: the last output: Instances.image_size of the flattened schema (the input's (h, w)); unused by the predictor
_SIZE_OUTPUT = "out_image_size"


class ExportCheckError(RuntimeError):
    """The exported file does not reproduce PyTorch within :data:`TOLERANCE` (or there was nothing to compare)."""


# -- the model -------------------------------------------------------------------------------------------------
def load_detector(config: str, weights: str, opts: Sequence[str] = ()) -> tuple[nn.Module, list[str] | None]:
    """Build the detector of a LazyConfig ``.py`` or yacs ``.yaml`` config on the CPU, load ``weights`` (every
    weight must come from the checkpoint) and return it in eval mode with the test dataset's class names."""
    cfg = load_config(config, opts)
    if not weights:
        raise ValueError("No --weights given: export a trained detector checkpoint (model_final.pth or a zoo file).")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"Checkpoint {weights} not found (relative paths are relative to {os.getcwd()}).")
    _set(cfg, "train.device", "MODEL.DEVICE", "cpu")
    model = build_model(cfg).eval()
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f"{config} builds a {type(model).__name__}; export_model exports GeneralizedRCNN detectors (Mask R-CNN, "
            "Cascade Mask R-CNN)."
        )
    MViTv2Checkpointer(model, require_all=True).load(weights)
    names = cfg.dataloader.test.dataset.names if is_lazy(cfg) else cfg.DATASETS.TEST
    classes = dataset_metadata(names).get("thing_classes", None)
    return model, (list(classes) if classes is not None else None)


def graph_inference(model: GeneralizedRCNN, image: torch.Tensor, image_size: torch.Tensor) -> Instances:
    """What the exported graph computes: ``model.inference(..., do_postprocess=False)`` on a fixed-size image whose
    top-left ``image_size`` = (h, w) pixels are the real image (see the module docstring)."""
    height, width = image.shape[-2:]
    x = (image - model.pixel_mean) / model.pixel_std
    valid = (torch.arange(height) < image_size[0])[:, None] & (torch.arange(width) < image_size[1])[None, :]
    images = ImageList((x * valid)[None], [image_size])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    return results[0]


def prepare_image(image: np.ndarray, hw: Sequence[int], channel_order: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """BGR uint8 (H, W, 3) -> the graph's ``image`` (3, *hw) float32 tensor and the (h, w) of the resized image."""
    image = _check_image(image)
    height, width = image.shape[:2]
    scale = min(hw[0] / height, hw[1] / width)
    h = min(hw[0], max(1, int(height * scale + 0.5)))
    w = min(hw[1], max(1, int(width * scale + 0.5)))
    if channel_order == "RGB":
        image = image[:, :, ::-1]
    resized = ResizeTransform(height, width, h, w).apply_image(np.ascontiguousarray(image))
    padded = np.zeros((hw[0], hw[1], 3), np.float32)
    padded[:h, :w] = resized
    return torch.from_numpy(padded.transpose(2, 0, 1).copy()), (h, w)


# -- predictors ------------------------------------------------------------------------------------------------
class _FixedSizePredictor:
    """prepare_image -> ``_run`` (the graph) -> detector_postprocess; subclasses provide ``_run``."""

    hw: tuple[int, int]
    channel_order: str
    output_names: list[str]
    metadata: Metadata

    def _run(self, image: torch.Tensor, size: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def check(self, image: Any) -> np.ndarray:
        """Raise ``TypeError``/``ValueError`` (with the fix) if ``image`` cannot be run; return it otherwise."""
        return _check_image(image)

    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
        """One (H, W, 3) BGR uint8 array -> ``{"instances": Instances}`` (boxes, scores, classes, masks; image
        coordinates). A list of arrays -> a list of such dicts, in the same order (one graph call each)."""
        if isinstance(images, (list, tuple)):
            return [self(im) for im in images]
        image, (h, w) = prepare_image(self.check(images), self.hw, self.channel_order)
        outputs = self._run(image, torch.tensor([h, w]))
        return {"instances": _to_instances(self.output_names, outputs, (h, w), images.shape[:2])}


def _to_instances(names: Sequence[str], outputs: Sequence[Any], resized_hw: tuple[int, int],
                  original_hw: tuple[int, int]) -> Instances:  # fmt: skip
    """The graph's outputs -> Instances in the coordinates of the original image (detector_postprocess)."""
    fields = {}
    for name, value in zip(names, outputs):
        value = torch.as_tensor(value)
        fields[name] = Boxes(value) if name == "pred_boxes" else value
    fields.pop(_SIZE_OUTPUT, None)
    return detector_postprocess(Instances(resized_hw, **fields), *original_hw)


class PyTorchFixedSizePredictor(_FixedSizePredictor):
    """The PyTorch model run exactly as the exported graph runs it (same resize, padding and outputs): the
    reference the export is checked against."""

    def __init__(self, model: GeneralizedRCNN, hw: Sequence[int], class_names: Optional[list[str]] = None):
        self.model, self.hw = model.eval(), (int(hw[0]), int(hw[1]))
        self.channel_order = str(model.input_format)
        self.metadata = Metadata(name="exported", thing_classes=class_names) if class_names else Metadata()

    def _run(self, image, size):
        outputs, schema = flatten_to_tuple(graph_inference(self.model, image, size))
        self.output_names = list(schema.keys) + [_SIZE_OUTPUT]
        return list(outputs)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class ExportedPredictor(_FixedSizePredictor):
    """Runs a file written by :func:`export_detector` with the contract of ``LazyPredictor``.

    Args:
        path: the exported ``model.onnx`` / ``model.ts``, or the folder holding exactly one of them. Its
            ``<file>.json`` (written beside it) gives the input size, channel order, output names and class names.

    ``predictor(image)`` with ``image`` a BGR uint8 (H, W, 3) array returns ``{"instances": Instances}`` with boxes
    and masks in the coordinates of ``image``. ONNX files run with onnxruntime (CPU), TorchScript files with
    ``torch.jit.load`` (CPU).
    """

    def __init__(self, path: Union[str, os.PathLike], *, _meta_file: Optional[Path] = None):
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / f for f in FORMATS.values() if (path / f).is_file()]
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{path} holds {'both' if found else 'neither'} of {', '.join(FORMATS.values())}; pass the "
                    "exported file itself."
                )
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"Exported model {path} does not exist (write one with tools/export_model.py).")
        meta_file = _meta_file or _meta_path(path)
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{meta_file} is missing: ExportedPredictor needs the .json that tools/export_model.py writes beside "
                f"{path.name}. Copy it together with the model, or export again."
            )
        try:
            meta = json.loads(meta_file.read_text())
            self.format = meta["format"]
            self.hw = tuple(int(s) for s in meta["input"]["size_hw"])
            self.channel_order = meta["input"]["channel_order"]
            self.output_names = list(meta["outputs"])
            size = int(meta["file_bytes"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_file} is not an export description written by export_model ({e!r}).") from None
        if size != path.stat().st_size:
            raise ValueError(
                f"{meta_file} describes a file of {size} bytes but {path.name} has {path.stat().st_size}: they come "
                "from different exports. Export again (tools/export_model.py writes both)."
            )
        self.meta, self.path = meta, path
        classes = meta.get("class_names")
        self.metadata = Metadata(name="exported", thing_classes=classes) if classes else Metadata(name="exported")
        if self.format == "onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        elif self.format == "torchscript":
            import torchvision  # noqa: F401  (registers torchvision::nms / roi_align used by the graph)

            self._module = torch.jit.load(str(path), map_location="cpu").eval()
        else:
            raise ValueError(f"{meta_file}: unknown format {self.format!r}; expected one of {sorted(FORMATS)}.")

    def _run(self, image, size):
        if self.format == "onnx":
            outs = self._session.run(None, {"image": image.numpy(), "image_size": size.numpy()})
            return [torch.from_numpy(o) for o in outs]
        return list(self._module(image, size))


# -- checking ----------------------------------------------------------------------------------------------------
def compare_instances(got: Instances, ref: Instances) -> dict[str, Any]:
    """Largest differences between two predictions of the same image, detection by detection (both are sorted by
    score): box corners in pixels, scores, and the fraction of the image's pixels on which a pasted mask differs."""
    n_got, n_ref = len(got), len(ref)
    out: dict[str, Any] = {"detections": n_ref, "detections_exported": n_got}
    n = min(n_got, n_ref)
    if n == 0:
        return out | {"box_px": 0.0, "score": 0.0, "mask_frac": 0.0, "class_mismatches": 0}
    out["box_px"] = (got.pred_boxes.tensor[:n] - ref.pred_boxes.tensor[:n]).abs().max().item()
    out["score"] = (got.scores[:n] - ref.scores[:n]).abs().max().item()
    out["class_mismatches"] = int((got.pred_classes[:n] != ref.pred_classes[:n]).sum())
    out["mask_frac"] = 0.0
    if got.has("pred_masks") and ref.has("pred_masks"):
        h, w = ref.image_size
        xor = (got.pred_masks[:n] != ref.pred_masks[:n]).flatten(1).sum(1)
        out["mask_frac"] = xor.max().item() / (h * w)
    return out


def check_differences(diffs: dict[str, Any], tolerance: dict[str, float] = TOLERANCE) -> None:
    """Raise :class:`ExportCheckError` naming what is beyond ``tolerance``."""
    if diffs["detections"] == 0 and diffs["detections_exported"] == 0:
        raise ExportCheckError(
            "Neither PyTorch nor the exported file found any detection on the sample image, so the check compared "
            "nothing. Pass a --sample-image with objects in it, or (random or barely trained weights) lower the "
            "score threshold with --opts model.roi_heads.box_predictor.test_score_thresh=0.0 (.py configs; "
            "box_predictors.2 for Cascade) or MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 (.yaml)."
        )
    problems = []
    if diffs["detections"] != diffs["detections_exported"]:
        problems.append(f"{diffs['detections_exported']} detections instead of PyTorch's {diffs['detections']}")
    if diffs["class_mismatches"]:
        problems.append(f"{diffs['class_mismatches']} detections with another class")
    for key, label in (("box_px", "box corners differ by {:.2e} px"), ("score", "scores differ by {:.2e}"),
                       ("mask_frac", "a mask differs on {:.2e} of the pixels")):  # fmt: skip
        if diffs[key] > tolerance[key]:
            problems.append(label.format(diffs[key]) + f" (tolerance {tolerance[key]:g})")
    if problems:
        raise ExportCheckError("The exported file does not reproduce PyTorch: " + "; ".join(problems) + ".")


# -- exporting -----------------------------------------------------------------------------------------------------
def _write_graph(model: GeneralizedRCNN, fmt: str, image: torch.Tensor, size: torch.Tensor, dest: Path,
                 opset: int) -> tuple[list[str], tuple[torch.Tensor, ...]]:  # fmt: skip
    """Trace ``model`` (through TracingAdapter) on one input and write it to ``dest``; return the output names and
    the eager PyTorch outputs on that input (the reference of the check)."""
    adapter = TracingAdapter(model, (image, size), inference_func=graph_inference).eval()  # export restores it
    with torch.no_grad(), warnings.catch_warnings():
        # Python-side shapes and branches are frozen at the traced size on purpose: the input size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based ONNX exporter, on purpose
        warnings.simplefilter("ignore", UserWarning)
        reference = adapter(image, size)  # eager PyTorch; also fills adapter.outputs_schema
        names = list(adapter.outputs_schema.keys) + [_SIZE_OUTPUT]
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, (image, size), check_trace=False)
            traced.save(str(dest))
        else:
            torch.onnx.export(
                adapter, (image, size), str(dest), input_names=["image", "image_size"], output_names=names,
                dynamic_axes={n: {0: "detections"} for n in names if n != _SIZE_OUTPUT}, opset_version=opset,
                dynamo=False,
            )  # fmt: skip
    return names, reference


def check_graph_size(model: GeneralizedRCNN, hw: Sequence[int]) -> None:
    """The graph's fixed input must be a multiple of the backbone's ``size_divisibility`` (the FPN levels must
    line up); raises ValueError naming the nearest sizes that work."""
    div = int(getattr(model.backbone, "size_divisibility", 0) or 0)
    if div > 1 and (hw[0] % div or hw[1] % div):
        near = "x".join(str(max(div, round(s / div) * div)) for s in hw)
        raise ValueError(
            f"--img-size {hw[0]}x{hw[1]}: each side must be a multiple of {div} (the backbone's size_divisibility), "
            f"e.g. --img-size {near}."
        )


def export_detector(model: GeneralizedRCNN, fmt: str, output_dir: Union[str, os.PathLike], sample: np.ndarray,
                    hw: Sequence[int], class_names: Optional[list[str]] = None, opset: int = 18,
                    info: Optional[dict] = None, tolerance: Optional[dict] = None,
                    ) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Export ``model`` to ``output_dir/model.onnx`` or ``model.ts`` (+ ``.json``), check it on ``sample`` (BGR
    uint8) against PyTorch (the eager run of the trace) and return (path, differences). The files appear only when
    the check passes (``tolerance``: default :data:`TOLERANCE`); on any failure nothing is left behind. Raises
    :class:`ExportCheckError` when the check fails."""
    if fmt not in FORMATS:
        raise ValueError(f"Unsupported export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    hw = (int(hw[0]), int(hw[1]))
    check_graph_size(model, hw)
    out_dir = Path(output_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--output {out_dir} is a file; give a folder (it is created if needed).")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    channel_order = str(model.input_format)
    image, (h, w) = prepare_image(sample, hw, channel_order)

    dest = out_dir / FORMATS[fmt]
    tmp_model, tmp_meta = temp_name(dest), temp_name(_meta_path(dest))
    try:
        t0 = time.perf_counter()
        names, ref_outputs = _write_graph(model, fmt, image, torch.tensor([h, w]), tmp_model, opset)
        seconds = time.perf_counter() - t0
        meta = {
            "version": _META_VERSION, "format": fmt, "file": dest.name, "file_bytes": tmp_model.stat().st_size,
            "input": {
                "names": ["image", "image_size"], "size_hw": list(hw), "channel_order": channel_order,
                "layout": "image: float32 (3, H, W), 0..255; image_size: int64 (2,) = (h, w) of the real image",
                "resize": "scale min(H/height, W/width), PIL bilinear (detectron2 ResizeTransform), top-left, zero "
                          "padding bottom/right; normalisation inside the graph",
                "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
            },
            "outputs": names, "mask_threshold": 0.5, "class_names": class_names, "export_seconds": round(seconds, 1),
            "versions": _versions(), **(info or {}),
        }  # fmt: skip
        tmp_meta.write_text(json.dumps(meta, indent=1))
        exported = ExportedPredictor(tmp_model, _meta_file=tmp_meta)
        reference = _to_instances(names, ref_outputs, (h, w), sample.shape[:2])
        diffs = compare_instances(exported(sample)["instances"], reference)
        diffs["export_seconds"] = seconds
        check_differences(diffs, tolerance or TOLERANCE)
        os.replace(tmp_model, dest)
        os.replace(tmp_meta, _meta_path(dest))
    finally:
        for tmp in (tmp_model, tmp_meta):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return dest, diffs


def _versions() -> dict[str, str]:
    v = {"torch": torch.__version__, "detectron2": detectron2.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    return v
