"""COCO-format instance datasets for detectron2, checked on load.

``register_coco_instances`` is a drop-in replacement for detectron2's function of the same name. detectron2's
loader trusts the annotation file: a missing image only fails when a data-loader worker tries to read it, hours
into training, and zero-area or out-of-image boxes are dropped or clipped later without a word. Here the file is
checked when the dataset is loaded (``DatasetCatalog.get(name)``, i.e. when the loader is built):

=======================================  ===============================================================
problem                                  outcome
=======================================  ===============================================================
annotation file or image folder missing  ``FileNotFoundError`` at registration, naming the path
annotation file empty or not JSON        ``ValueError`` naming the file (and the line of a JSON error)
no ``images`` in the file                ``ValueError``
category id not in ``categories``        ``ValueError`` with the count, the unknown ids and the known ones
image listed but not on disk             skipped; one warning with the count and the first names
                                         (``ValueError`` if none of the images exists)
box with zero or negative width/height   dropped; one warning with the count
box partly outside the image             clipped to the image; one warning with the count
box entirely outside the image           dropped; one warning with the count
=======================================  ===============================================================

Images left without annotations are then removed by detectron2's own ``filter_empty_annotations`` (which logs
the count), exactly as for images that had none to begin with.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Iterable, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.structures import BoxMode

__all__ = ["check_datasets_registered", "load_coco_instances", "register_coco_instances"]

logger = logging.getLogger(__name__)

_SHOW = 5  # how many offending names a message lists


def _check_paths(json_file: str, image_root: str, name: str) -> None:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: annotation file {json_file} does not exist.")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Dataset {name!r}: image directory {image_root} does not exist.")


def _unknown_categories(json_file: str) -> str:
    """Describe the annotations whose category is not in ``categories`` (only called on that error)."""
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    known_ids = {c["id"] for c in data.get("categories", [])}
    known = sorted(known_ids)
    bad = Counter(a.get("category_id") for a in data.get("annotations", []) if a.get("category_id") not in known_ids)
    ids = ", ".join(f"{cid} ({n}x)" for cid, n in sorted(bad.items(), key=lambda kv: str(kv[0])))
    return (
        f"{sum(bad.values())} annotations use category ids that are not in the file's 'categories': {ids}. "
        f"Known category ids: {known}. Add the missing categories to 'categories' or fix the annotations' "
        "category_id."
    )


def load_coco_instances(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> list[dict]:
    """detectron2's ``load_coco_json`` with the checks of the module docstring.

    Returns detectron2 dataset dicts (boxes in ``BoxMode.XYWH_ABS``), and, like ``load_coco_json``, fills the
    dataset's ``thing_classes`` metadata when ``dataset_name`` is given.
    """
    name = dataset_name or json_file
    _check_paths(json_file, image_root, name)
    if os.path.getsize(json_file) == 0:
        raise ValueError(f"Dataset {name!r}: annotation file {json_file} is empty (0 bytes).")
    try:
        dicts = load_coco_json(json_file, image_root, dataset_name)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"Dataset {name!r}: annotation file {json_file} is not valid JSON ({e.msg} at line {e.lineno}, "
            f"column {e.colno})."
        ) from None
    except KeyError as e:
        if "does not exist in 'categories'" not in str(e):
            raise
        raise ValueError(f"Dataset {name!r}: {json_file}: {_unknown_categories(json_file)}") from None
    if not dicts:
        raise ValueError(
            f"Dataset {name!r}: annotation file {json_file} lists no images. A COCO instances file needs "
            "'images', 'annotations' and 'categories'."
        )
    dicts = _drop_missing_images(dicts, json_file, image_root, name)
    return _check_boxes(dicts, name)


def _drop_missing_images(dicts: list[dict], json_file: str, image_root: str, name: str) -> list[dict]:
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if not missing:
        return dicts
    shown = ", ".join(os.path.relpath(p, image_root) for p in missing[:_SHOW])
    more = f", ... and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
    if len(missing) == len(dicts):
        raise ValueError(
            f"Dataset {name!r}: none of the {len(dicts)} images listed in {json_file} exists under {image_root} "
            f"(e.g. {shown}{more}). Check the image directory."
        )
    logger.warning(
        "Dataset %r: %d of %d images listed in %s are missing under %s and were skipped: %s%s",
        name, len(missing), len(dicts), json_file, image_root, shown, more,
    )  # fmt: skip
    absent = set(missing)
    return [d for d in dicts if d["file_name"] not in absent]


def _check_boxes(dicts: list[dict], name: str) -> list[dict]:
    """Drop zero-area boxes and boxes outside the image, clip boxes that cross its border (XYWH_ABS)."""
    empty = outside = clipped = 0
    for d in dicts:
        h, w = d.get("height"), d.get("width")
        kept = []
        for obj in d.get("annotations", []):
            box = obj.get("bbox")
            if box is None or obj.get("bbox_mode", BoxMode.XYWH_ABS) != BoxMode.XYWH_ABS:
                kept.append(obj)
                continue
            x, y, bw, bh = (float(v) for v in box)
            if not (bw > 0 and bh > 0):
                empty += 1
                continue
            if h and w:
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
                if x1 <= x0 or y1 <= y0:
                    outside += 1
                    continue
                if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                    clipped += 1
                    obj = {**obj, "bbox": [x0, y0, x1 - x0, y1 - y0]}
            kept.append(obj)
        d["annotations"] = kept
    if empty:
        logger.warning("Dataset %r: dropped %d boxes with zero or negative width or height.", name, empty)
    if outside:
        logger.warning("Dataset %r: dropped %d boxes that lie entirely outside their image.", name, outside)
    if clipped:
        logger.warning(
            "Dataset %r: clipped %d boxes that extend beyond their image to the image border.", name, clipped
        )
    return dicts


def register_coco_instances(name: str, metadata: dict[str, Any], json_file: str, image_root: str) -> None:
    """Register a COCO-format instance dataset, like ``detectron2.data.datasets.register_coco_instances``, but
    loaded through :func:`load_coco_instances`, so bad annotation files fail early and clearly.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist (checked now, not at first use).
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    _check_paths(json_file, image_root, name)
    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)


def check_datasets_registered(names: Iterable[str]) -> None:
    """Raise ``KeyError`` naming every dataset in ``names`` that ``DatasetCatalog`` does not know, with the fix.

    Called before a loader is built, so that a typo fails with the list of registered names instead of deep inside
    detectron2. Builtin datasets (detectron2's, and this package's toy set) are registered on import.
    """
    names = [names] if isinstance(names, str) else list(names)
    registered = DatasetCatalog.list()
    missing = [n for n in names if n not in registered]
    if missing:
        raise KeyError(
            f"Dataset(s) {missing} are not registered. Register a COCO-format set before building the loader, e.g. "
            "mvit_det.data.register_coco_instances(name, {}, 'path/to/instances.json', 'path/to/images') (or "
            "tools/train_net.py --register-coco NAME JSON IMAGES), or use the built-in toy set ('mvit_toy_train', "
            f"'mvit_toy_val', registered by import mvit_det.detection). Registered: {sorted(registered)[:20]}..."
        )
