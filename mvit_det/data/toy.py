"""A small, built-in instance-segmentation dataset of rendered shapes ("mvit_toy").

It exists so that training, evaluation and the demo can run end to end on a CPU machine without downloading COCO.
Each image (H x W = 256 x 320 by default) has a random background (flat or a gradient, plus noise) and 1-3 filled
shapes of three classes (circle, square, triangle) with random colours, sizes, rotations and positions. Each shape's
circumradius is 12-30% of the image's short side and its colour differs clearly from the pixels it covers (RGB
distance >= 140), so that a detector trained for minutes on a CPU can find and name every shape (generator version 2;
version 1 drew up to 4 shapes down to 8% of the short side, against the mean colour of the whole image). Shapes may
overlap; later shapes occlude earlier ones, and every annotation describes the *visible* part (box, polygons, area),
so an occluded object can have a mask of several polygons. Each object keeps at least 60% of its area visible.

``import mvit_det.detection`` (and so loading any config of this repository) registers ``mvit_toy_train`` and
``mvit_toy_val`` the way detectron2 registers its builtin datasets: names and metadata at import, data on first use.
The first ``DatasetCatalog.get`` generates the set deterministically from a seed (same bytes every time on the same
OpenCV build) into ``<root>/mvit_toy``, where later runs find it. ``<root>`` is ``$MVIT_DET_DATASETS`` if set (read
at import), else ``datasets/`` in the source checkout (or in the current directory when the package is installed
elsewhere). Generation writes into a temporary directory and renames it into place, so an interrupted run never
leaves a half-written dataset behind.

Layout::

    mvit_toy/
      DONE                            # generator parameters; written last
      annotations/instances_{train,val}.json
      train/000000.jpg ...
      val/000000.jpg ...

Registered names: ``mvit_toy_train`` (200 images) and ``mvit_toy_val`` (50 images), COCO evaluator.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco import load_coco_instances

__all__ = [
    "TOY_CLASSES",
    "TOY_DATASET_NAMES",
    "ToySpec",
    "default_datasets_root",
    "generate_toy_dataset",
    "register_toy_dataset",
]

TOY_CLASSES = ("circle", "square", "triangle")
TOY_COLORS = ((220, 20, 60), (0, 130, 255), (255, 170, 0))  # RGB, for the Visualizer
TOY_DATASET_NAMES = ("mvit_toy_train", "mvit_toy_val")
_DIRNAME = "mvit_toy"
_GENERATOR_VERSION = 2
_MIN_VISIBLE = 0.6  # an object must keep this fraction of its area after later shapes are drawn over it


@dataclass(frozen=True)
class ToySpec:
    """Parameters of one generated toy set. The defaults give the registered ``mvit_toy_*`` datasets."""

    num_train: int = 200
    num_val: int = 50
    height: int = 256
    width: int = 320
    max_objects: int = 3
    min_radius: float = 0.12  # circumradius range, as a fraction of the short side
    max_radius: float = 0.3
    min_contrast: float = 140.0  # RGB distance (0-255 scale) of a shape's colour from the pixels it covers
    seed: int = 0
    version: int = _GENERATOR_VERSION

    def __post_init__(self):
        if self.height < 64 or self.width < 64:
            raise ValueError(f"Toy images must be at least 64x64, got {self.height}x{self.width}.")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {self.num_train} and {self.num_val}.")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}.")
        if not 0 < self.min_radius <= self.max_radius <= 0.45:
            raise ValueError(f"Need 0 < min_radius <= max_radius <= 0.45, got {self.min_radius} and {self.max_radius}.")


def default_datasets_root() -> Path:
    """``$MVIT_DET_DATASETS``, else ``<checkout>/datasets`` for a source checkout, else ``./datasets``."""
    env = os.environ.get("MVIT_DET_DATASETS")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs").is_dir() and (checkout / "mvit_det").is_dir():
        return checkout / "datasets"
    return Path.cwd() / "datasets"


# -- rendering -------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB: a flat colour or a linear gradient between two colours, plus Gaussian noise."""
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    if rng.random() < 0.5:
        img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    else:
        c1 = rng.integers(0, 256, size=3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(angle) / w + yy * np.sin(angle) / h
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 + t[..., None] * (c1 - c0)
    img = img + rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, cls: int, spec: ToySpec) -> np.ndarray:
    """Vertices (N, 2) int32 in (x, y) pixel coordinates of one shape lying fully inside the image."""
    h, w = spec.height, spec.width
    size = rng.uniform(spec.min_radius, spec.max_radius) * min(h, w)  # circumradius
    cx = rng.uniform(size + 2, w - size - 2)
    cy = rng.uniform(size + 2, h - size - 2)
    if cls == 0:  # circle, as a fine polygon so that mask and outline agree
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    elif cls == 1:  # square, randomly rotated
        angles = rng.uniform(0, np.pi / 2) + np.arange(4) * np.pi / 2
    else:  # triangle: equilateral up to +-15 degree jitter per vertex
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.26, 0.26, size=3)
    pts = np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32)


def _contrasting_color(rng: np.random.Generator, regions: list[np.ndarray], min_contrast: float) -> np.ndarray:
    """An RGB colour at least ``min_contrast`` (L2, 0-255 scale) from the mean colour of each region in ``regions``
    (the background and each earlier shape under the new one); the best of 200 draws if none is that far."""
    means = [r.reshape(-1, 3).astype(np.float64).mean(axis=0) for r in regions if r.size]
    best, best_d = None, -1.0
    for _ in range(200):
        color = rng.integers(0, 256, size=3)
        d = min((float(np.linalg.norm(color - m)) for m in means), default=float("inf"))
        if d >= min_contrast:
            return color
        if d > best_d:
            best, best_d = color, d
    return best


def _mask_to_polygons(mask: np.ndarray) -> list[list[int]]:
    """Outer contours of a binary mask as COCO polygons [x0, y0, x1, y1, ...] (at least 3 points each)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3 and cv2.contourArea(c) >= 4:
            polys.append([int(v) for v in c.reshape(-1)])
    return polys


def render_toy_image(rng: np.random.Generator, spec: ToySpec) -> tuple[np.ndarray, list[dict]]:
    """One image (H, W, 3) uint8 RGB and its annotations (``category_id`` 1..3, ``bbox`` XYWH, ``segmentation``)."""
    h, w = spec.height, spec.width
    img = _background(rng, h, w)
    labels = np.zeros((h, w), dtype=np.int32)  # 0 = background, k = k-th accepted object
    objects: list[tuple[int, int]] = []  # (class index, full area)
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(0, len(TOY_CLASSES)))
            pts = _shape_polygon(rng, cls, spec)
            canvas = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(canvas, [pts], 1)
            new = canvas.astype(bool)
            # Accept only if every earlier object keeps enough of itself visible.
            ok = all(
                ((labels == k + 1) & ~new).sum() >= _MIN_VISIBLE * area for k, (_, area) in enumerate(objects)
            )
            if ok:
                break
        else:
            continue
        covered = [img[new & (labels == k)] for k in range(len(objects) + 1)]  # background, then each shape
        img[new] = _contrasting_color(rng, covered, spec.min_contrast)
        labels[new] = len(objects) + 1
        objects.append((cls, int(new.sum())))

    annos = []
    for k, (cls, _) in enumerate(objects):
        visible = labels == k + 1
        ys, xs = np.nonzero(visible)
        polys = _mask_to_polygons(visible)
        if not polys:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        annos.append(
            {
                "category_id": cls + 1,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(visible.sum()),
                "segmentation": polys,
                "iscrowd": 0,
            }
        )
    return img, annos


def _write_split(out: Path, split: str, num: int, spec: ToySpec) -> None:
    (out / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(num):
        # One generator per image, keyed by (seed, split, index): an image does not depend on the set size.
        rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, i])
        img, annos = render_toy_image(rng, spec)
        file_name = f"{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode toy image {split}/{file_name}.")
        (out / split / file_name).write_bytes(buf.tobytes())
        images.append({"id": i + 1, "file_name": file_name, "height": spec.height, "width": spec.width})
        for a in annos:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    coco = {
        "info": {"description": f"mvit_toy {split}: rendered shapes", "version": str(spec.version)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(TOY_CLASSES)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, sort_keys=True))


def _spec_text(spec: ToySpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def generate_toy_dataset(out_dir: str | os.PathLike, spec: ToySpec = ToySpec()) -> Path:
    """Create the toy set at ``out_dir`` unless an identical one is already there; return ``out_dir``.

    The set is written to a temporary sibling directory and renamed into place at the end, so a killed run leaves
    no partial dataset. A directory generated with other parameters (or an older generator) is replaced.

    Raises:
        FileExistsError: ``out_dir`` exists but was not made by this generator.
    """
    out = Path(out_dir)
    done = out / "DONE"
    if done.is_file() and done.read_text() == _spec_text(spec):
        return out
    if out.exists() and not done.is_file():
        raise FileExistsError(
            f"{out} exists but is not a complete mvit_toy dataset (no DONE file). Delete it, or point "
            "$MVIT_DET_DATASETS at another directory, and run again."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_split(tmp, "train", spec.num_train, spec)
        _write_split(tmp, "val", spec.num_val, spec)
        (tmp / "DONE").write_text(_spec_text(spec))
        if out.exists():  # an outdated set made by this generator: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale-", dir=out.parent))
            os.replace(out, stale / out.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process (e.g. a second training rank) finished first; keep its copy if it matches.
            if not (done.is_file() and done.read_text() == _spec_text(spec)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_split(base: Path, split: str, name: str) -> list[dict]:
    """The ``DatasetCatalog`` loader of one toy split: generate the set on first use, then read it checked."""
    generate_toy_dataset(base)  # returns at once when an identical set is already on disk
    return load_coco_instances(
        str(base / "annotations" / f"instances_{split}.json"), str(base / split), dataset_name=name
    )


def register_toy_dataset(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Register ``mvit_toy_train`` and ``mvit_toy_val`` the way detectron2 registers its builtin datasets.

    Nothing is generated here: the images are rendered on the first ``DatasetCatalog.get(name)`` (and kept on disk
    for later runs). The metadata is complete at once (``thing_classes``, ``thing_colors``, ``json_file``,
    ``image_root``, ``evaluator_type="coco"``), so a predictor or visualiser can label detections without the data.
    ``import mvit_det.detection`` calls this with the default root; calling it again with the same root is a no-op.

    Args:
        root: the datasets root; the set lives in ``<root>/mvit_toy``. Default: ``default_datasets_root()``.

    Returns:
        ``{dataset name: annotation json path}`` (the files exist once the dataset has been loaded).

    Raises:
        ValueError: the names are already registered for a different location.
    """
    base = ((Path(root).expanduser() if root is not None else default_datasets_root()) / _DIRNAME).resolve()
    out = {}
    for name, split in zip(TOY_DATASET_NAMES, ("train", "val")):
        json_file = str(base / "annotations" / f"instances_{split}.json")
        out[name] = json_file
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file", None)
            if registered != json_file:
                raise ValueError(
                    f"Dataset {name!r} is already registered with json_file={registered!r}, not {json_file!r}. "
                    "import mvit_det.detection registers the toy set under $MVIT_DET_DATASETS (else datasets/); "
                    "set that variable before the import instead of registering a second root."
                )
            continue
        DatasetCatalog.register(name, functools.partial(_load_split, base, split, name))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=str(base / split),
            evaluator_type="coco",
            thing_classes=list(TOY_CLASSES),
            thing_colors=[list(c) for c in TOY_COLORS],
        )
    return out
