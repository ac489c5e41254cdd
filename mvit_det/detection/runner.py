"""Running a detector over many images, a video or a webcam, and writing COCO results (the library behind
``tools/demo.py``).

* :func:`expand_inputs`: files, glob patterns and folders -> a list of image paths.
* :func:`run_images`: read, check and batch images through a predictor; unreadable files (missing, corrupt,
  decompression bombs) and images the predictor cannot run (too elongated for its test resize) are reported
  through a callback and skipped, never abort the batch.
* :class:`CocoResultsWriter`: one COCO file (``images``, ``categories``, ``annotations`` with ``score``, ``bbox`` in
  xywh and RLE ``segmentation``) that ``pycocotools.coco.COCO(path)`` loads; written atomically.
* :func:`run_video`: a video in, the same video (frame count, frame rate, size) with the detections drawn out, and
  optionally the per-frame detections as COCO JSON; frames go through the model in batches.
* :func:`run_webcam`: a live OpenCV window, closed with ``q``.

Every failure a user can cause raises :class:`RunError` with the problem and the fix.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from ..data.images import IMAGE_EXTENSIONS, ImageReadError, load_image

__all__ = [
    "CocoResultsWriter",
    "DRAW_THRESHOLD",
    "RunError",
    "check_output_dir",
    "check_output_file",
    "draw_detections",
    "expand_inputs",
    "read_image_bgr",
    "run_images",
    "run_video",
    "run_webcam",
]

#: Score from which detections are drawn by default: detectron2's demo default (``demo/demo.py``).
DRAW_THRESHOLD = 0.5

#: OpenCV FourCC code per output container; other extensions are refused before the model loads.
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class RunError(RuntimeError):
    """A problem with the inputs, outputs or devices of a run; the message says what to do."""


# ------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ------------------------------------------------------------------------------------------------------------
def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files as given, folders as their image files (sorted), glob patterns expanded (sorted). Paths that do not
    exist are kept, so that they are reported as failures."""
    out: list[str] = []
    for item in items:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif any(c in path for c in "*?[") and not os.path.exists(path):
            out += sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)) or [path]
        else:
            out.append(path)
    return out


def check_output_dir(path: str) -> None:
    """``path`` must be a folder or creatable as one (checked before any model is built)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--output {path} is a file, but images are written into a folder. Give a folder path.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path) and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)


def drawn_output_paths(inputs: Sequence[str], out_dir: str) -> dict[str, str]:
    """Where each input's drawing goes: ``out_dir/<stem>.png``, numbered when two inputs share a stem.

    Raises RunError, before any model is built, when a drawing would replace one of the inputs (``--output`` is the
    input folder and holds ``x.png`` beside ``x.jpg``, or ``x.png`` itself).
    """
    sources = {os.path.realpath(p) for p in inputs if os.path.isfile(p)}
    used: set[str] = set()
    out: dict[str, str] = {}
    for path in inputs:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, k = f"{stem}.png", 1
        while name in used:  # two inputs with the same file name
            name, k = f"{stem}_{k}.png", k + 1
        used.add(name)
        target = os.path.join(out_dir, name)
        if os.path.realpath(target) in sources:
            raise RunError(
                f"--output {out_dir}: the drawing of {path} would replace the input {target}. "
                "Write the drawings to another folder."
            )
        out[path] = target
    return out


def check_not_the_input(output: str, source: str, what: str = "--output") -> None:
    """Refuse an output file that is the input itself (the input would be replaced by its own drawing)."""
    if os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source):
        raise RunError(f"{what} {output} is the input file; give another file name, so that the input is kept.")


def check_output_file(path: str, what: str, exts: Optional[Sequence[str]] = None) -> None:
    """``path`` must be a file path whose folder exists or can be made, with one of ``exts``."""
    if os.path.isdir(path):
        raise RunError(f"{what} {path} is a folder; give a file name (e.g. {os.path.join(path, 'out' + (exts or ['.json'])[0])}).")
    if exts is not None and os.path.splitext(path)[1].lower() not in exts:
        raise RunError(f"{what} {path}: unsupported extension; use one of {', '.join(exts)}.")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise RunError(f"{what} {path}: cannot create its folder {parent} ({e.strerror}).") from None


def _umask_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (mkstemp's temporary files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    os.chmod(tmp, _umask_mode())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_image_bgr(path: str) -> np.ndarray:
    """An image file as an upright BGR uint8 array (``mvit_det.data.images.load_image``: any mode, EXIF rotation).
    Raises ``ImageReadError`` naming the file for missing, corrupt, non-image files and decompression bombs."""

    try:
        rgb = np.asarray(load_image(path))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # raised by Image.open for > 2x MAX_IMAGE_PIXELS
        raise ImageReadError(
            f"Cannot read image {path}: {e} Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file."
        ) from None
    except (OSError, MemoryError) as e:
        raise ImageReadError(f"Cannot read image {path}: {e}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


# ------------------------------------------------------------------------------------------------------------
# COCO results
# ------------------------------------------------------------------------------------------------------------
class CocoResultsWriter:
    """Collects detections and writes one COCO-format file.

    Categories: the predictor's class names, with the dataset's own category ids when the metadata has them
    (``thing_dataset_id_to_contiguous_id``: COCO's 1..90), else ``index + 1``. Each detection becomes an annotation
    with ``id``, ``image_id``, ``category_id``, ``bbox`` ([x, y, w, h], pixels), ``score``, ``area`` (mask pixels, or
    box area without masks), ``iscrowd`` 0 and ``segmentation`` (COCO RLE, ``pycocotools.mask.encode``) when the
    model predicts masks.
    """

    def __init__(self, metadata: Any = None, num_classes: Optional[int] = None, info: Optional[dict] = None):
        names = list(getattr(metadata, "thing_classes", None) or []) if metadata is not None else []
        if not names:
            names = [str(i) for i in range(num_classes or 0)]
        to_contiguous = (metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata is not None else None) or {}
        from_contiguous = {int(v): int(k) for k, v in to_contiguous.items()}
        self.category_ids = [from_contiguous.get(i, i + 1) for i in range(len(names))]
        self.categories = [{"id": cid, "name": n} for cid, n in zip(self.category_ids, names)]
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.info = dict(info or {})

    def _category_id(self, cls: int) -> int:
        while cls >= len(self.category_ids):  # a model with more classes than the metadata names
            self.category_ids.append(len(self.category_ids) + 1)
            self.categories.append({"id": self.category_ids[-1], "name": str(len(self.category_ids) - 1)})
        return self.category_ids[cls]

    def add(self, file_name: str, height: int, width: int, instances, **extra) -> int:
        """Add one image and its ``Instances`` (image coordinates); returns the image id (1, 2, ...)."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width), **extra})
        instances = instances.to("cpu")  # a copy
        if instances.has("pred_masks") and isinstance(instances.pred_masks, torch.Tensor):
            instances.pred_masks = instances.pred_masks.numpy()  # pycocotools wants numpy arrays
        for ann in instances_to_coco_json(instances, image_id):
            x, y, w, h = ann["bbox"]
            if "segmentation" in ann:
                area = float(mask_util.area(ann["segmentation"]))
            else:
                area = float(w * h)
            ann.update(
                id=len(self.annotations) + 1,
                category_id=self._category_id(int(ann["category_id"])),
                bbox=[float(v) for v in ann["bbox"]],
                score=float(ann["score"]),
                area=area,
                iscrowd=0,
            )
            self.annotations.append(ann)
        return image_id

    def to_dict(self) -> dict:
        out = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        if self.info:
            out["info"] = self.info
        return out

    def write(self, path: str) -> None:
        """Write the file atomically (a temporary file in the same folder, then ``os.replace``)."""
        _atomic_write_text(path, json.dumps(self.to_dict()))


# ------------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------------
def draw_detections(rgb: np.ndarray, instances, metadata, threshold: float) -> np.ndarray:
    """The detections with score >= ``threshold`` drawn on ``rgb`` by detectron2's ``Visualizer``; returns RGB."""
    instances = instances.to("cpu")
    shown = instances[instances.scores >= threshold]
    vis = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(shown)
    return vis.get_image()


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------
def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_images(
    predictor,
    paths: Sequence[str],
    *,
    batch_size: int = 1,
    on_result: Callable[[str, np.ndarray, Any], None],
    on_skip: Callable[[str, str], None],
    progress: bool = True,
) -> list[str]:
    """Run ``predictor`` over ``paths`` in batches of ``batch_size`` readable images.

    ``on_result(path, bgr, instances)`` is called for each image in input order; ``on_skip(path, reason)`` for each
    unreadable image or one the predictor refuses (its reason names the fix). Returns the skipped paths. At most
    ``batch_size`` images are held in memory at a time.
    """

    skipped: list[str] = []

    def readable() -> Iterator[tuple[str, np.ndarray]]:
        for path in paths:
            try:
                bgr = predictor.check(read_image_bgr(path))
            except (ImageReadError, ValueError, TypeError) as e:
                skipped.append(path)
                on_skip(path, str(e))
            else:
                yield path, bgr
            bar.update(1)

    with tqdm(total=len(paths), unit="img", desc="detect", disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(readable(), batch_size):
            outputs = predictor([bgr for _, bgr in batch])
            for (path, bgr), out in zip(batch, outputs):
                on_result(path, bgr, out["instances"].to("cpu"))
    return skipped


# ------------------------------------------------------------------------------------------------------------
# Video and webcam
# ------------------------------------------------------------------------------------------------------------
def open_video(path: str):
    """``cv2.VideoCapture`` of ``path`` and its (frame count, fps, width, height); RunError if unreadable."""
    if not os.path.isfile(path):
        raise RunError(f"Video {path} does not exist.")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise RunError(f"Cannot open video {path}: OpenCV cannot read this file (corrupt, or a codec it lacks).")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    return cap, count, fps, width, height


def _frames(cap) -> Iterator[np.ndarray]:
    while True:
        ok, frame = cap.read()
        if not ok:
            return
        yield frame


def run_video(
    predictor,
    src: str,
    dst: Optional[str],
    *,
    batch_size: int = 1,
    threshold: float = DRAW_THRESHOLD,
    json_path: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Detect on every frame of ``src``; write ``dst`` (same frame count, fps and size, detections with score >=
    ``threshold`` drawn) and/or ``json_path`` (COCO results, one image per frame with ``frame`` = its index).

    Both outputs are written to temporary files next to them and renamed when complete. Returns
    ``{"frames", "fps", "width", "height"}`` of what was written.
    """
    if dst is None and json_path is None:
        raise RunError("run_video needs an output video path and/or a JSON path.")
    cap, count, fps, width, height = open_video(src)
    writer = tmp_video = None
    coco = CocoResultsWriter(predictor.metadata, info={"video": os.path.abspath(src), "fps": fps}) if json_path else None
    written = 0
    try:
        if dst is not None:
            ext = os.path.splitext(dst)[1].lower()
            fd, tmp_video = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=ext,
                                             dir=os.path.dirname(os.path.abspath(dst)))  # fmt: skip
            os.close(fd)
            os.chmod(tmp_video, _umask_mode())
            writer = cv2.VideoWriter(tmp_video, cv2.VideoWriter_fourcc(*VIDEO_CODECS[ext]), fps, (width, height))
            if not writer.isOpened():
                raise RunError(f"OpenCV cannot write {ext} video here; try --output with .avi (MJPG).")
        stem = os.path.basename(src)
        with tqdm(total=count or None, unit="frame", desc="video", disable=not progress, dynamic_ncols=True) as bar:
            for batch in _batches(_frames(cap), batch_size):
                outputs = predictor(batch)
                for frame, out in zip(batch, outputs):
                    instances = out["instances"].to("cpu")
                    if writer is not None:
                        rgb = np.ascontiguousarray(frame[:, :, ::-1])
                        drawn = draw_detections(rgb, instances, predictor.metadata, threshold)
                        writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
                    if coco is not None:
                        coco.add(f"{stem}#frame={written}", frame.shape[0], frame.shape[1], instances, frame=written)
                    written += 1
                    bar.update(1)
        if written == 0:
            raise RunError(f"Video {src} has no readable frame.")
        if writer is not None:
            writer.release()
            writer = None
            os.replace(tmp_video, dst)
            tmp_video = None
        if coco is not None:
            coco.write(json_path)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if tmp_video is not None and os.path.exists(tmp_video):
            os.unlink(tmp_video)
    return {"frames": written, "fps": fps, "width": width, "height": height}


def open_camera(index: int):
    """``cv2.VideoCapture(index)``, or RunError when there is no such camera."""
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        cap.release()
        raise RunError(
            f"No camera at index {index}: OpenCV could not open it (no webcam attached, or no permission to use it). "
            "Check the device (ls /dev/video*), try another --webcam index, or run on a file with --video-input."
        )
    return cap


def check_gui() -> None:
    """RunError if this OpenCV build cannot open windows (opencv-python-headless)."""
    info = cv2.getBuildInformation()
    gui = info.split("GUI:", 1)[1].splitlines()[0].strip() if "GUI:" in info else ""
    if gui.upper() in ("", "NONE"):
        raise RunError(
            "This OpenCV has no window support (it is opencv-python-headless), so --webcam cannot show a window. "
            "Install opencv-python instead (pip uninstall opencv-python-headless && pip install opencv-python), or "
            "record a video and use --video-input."
        )


def run_webcam(predictor, cap, *, threshold: float = DRAW_THRESHOLD, window: str = "mvit-det (q to quit)") -> int:
    """Show detections on the live camera ``cap`` until ``q`` (or Esc) is pressed; returns the frame count."""
    shown = 0
    try:
        for frame in _frames(cap):
            instances = predictor(frame)["instances"].to("cpu")
            drawn = draw_detections(np.ascontiguousarray(frame[:, :, ::-1]), instances, predictor.metadata, threshold)
            cv2.imshow(window, np.ascontiguousarray(drawn[:, :, ::-1]))
            shown += 1
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                break
    finally:
        cap.release()
        cv2.destroyAllWindows()
    return shown
