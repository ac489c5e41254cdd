"""The built-in toy shapes dataset: deterministic, valid COCO, consistent masks/boxes, atomic, registered on import."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("detectron2")
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from mvit_det.data import toy  # noqa: E402
from mvit_det.data.toy import (  # noqa: E402
    TOY_CLASSES,
    TOY_DATASET_NAMES,
    ToySpec,
    generate_toy_dataset,
    register_toy_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = ToySpec(num_train=12, num_val=4, height=96, width=128)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_generation_is_deterministic(tmp_path):
    a = generate_toy_dataset(tmp_path / "a" / "mvit_toy", SMALL)
    b = generate_toy_dataset(tmp_path / "b" / "mvit_toy", SMALL)
    da, db = _digest(a), _digest(b)
    assert len(da) == 12 + 4 + 2 + 1  # images, two json files, DONE
    assert da == db
    # A different seed gives different images.
    c = generate_toy_dataset(tmp_path / "c" / "mvit_toy", ToySpec(num_train=12, num_val=4, height=96, width=128, seed=1))
    assert _digest(c)["train/000000.jpg"] != da["train/000000.jpg"]


def test_valid_coco_with_masks_inside_boxes(tmp_path):
    root = generate_toy_dataset(tmp_path / "mvit_toy", SMALL)
    for split, n in (("train", 12), ("val", 4)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= n  # at least one object per image
        for ann in anns:
            img = coco.loadImgs(ann["image_id"])[0]
            assert (img["height"], img["width"]) == (96, 128)
            assert (root / split / img["file_name"]).is_file()
            assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 96
            # Every polygon vertex lies in the box, and so does the rasterised mask.
            for poly in ann["segmentation"]:
                xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
                assert len(poly) >= 6
                assert xs.min() >= x and xs.max() <= x + w - 1 and ys.min() >= y and ys.max() <= y + h - 1
            m = coco.annToMask(ann)
            rows, cols = np.nonzero(m)
            assert rows.size > 0
            assert cols.min() >= x - 1 and cols.max() <= x + w and rows.min() >= y - 1 and rows.max() <= y + h
            # The stored area is the visible pixel count; the polygon rasterisation agrees to a few percent.
            assert abs(int(m.sum()) - ann["area"]) <= 0.15 * ann["area"] + 10
            # pycocotools' own polygon area helper accepts the polygons.
            rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 96, 128))
            assert mask_util.area(rle) > 0


def test_annotations_describe_visible_parts():
    """Later shapes occlude earlier ones: the visible masks of two objects share at most boundary pixels."""
    spec = ToySpec(num_train=1, num_val=1, height=128, width=160, max_objects=4)
    pairs = 0
    for i in range(30):
        img, annos = toy.render_toy_image(np.random.default_rng([7, 0, i]), spec)
        assert img.shape == (128, 160, 3) and img.dtype == np.uint8
        assert 1 <= len(annos) <= 4
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 128, 160))) for a in annos]
        for j in range(len(masks)):
            for k in range(j + 1, len(masks)):
                pairs += 1
                inter = int((masks[j] & masks[k]).sum())
                assert inter <= 0.1 * min(masks[j].sum(), masks[k].sum()), (i, j, k, inter)
    assert pairs > 20  # the check above actually ran on many pairs


def test_default_shapes_are_few_large_and_contrasting():
    """Version 2 of the generator (the main job's data): 1-3 shapes per image, none small, each clearly coloured."""
    spec = ToySpec()
    assert (spec.version, spec.max_objects, spec.min_radius, spec.min_contrast) == (2, 3, 0.12, 140.0)
    counts = []
    for i in range(30):
        img, annos = toy.render_toy_image(np.random.default_rng([0, 0, i]), spec)
        counts.append(len(annos))
        for a in annos:
            # Even a partly hidden shape keeps a side of at least the smallest circumradius (31 px at 256x320).
            assert max(a["bbox"][2], a["bbox"][3]) >= spec.min_radius * 256, a["bbox"]
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 256, 320))).astype(bool)
            inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~cv2.dilate(
                mask.astype(np.uint8), np.ones((3, 3), np.uint8)
            ).astype(bool)
            # The shape's flat colour (noise-free inside) stands out from what is drawn right around it.
            inside = img[inner].astype(float).mean(axis=0)
            around = img[ring].astype(float)
            assert np.linalg.norm(around - inside, axis=1).mean() > 60, (i, a["bbox"])
    assert set(counts) == {1, 2, 3}


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = toy._write_split

    def dies_on_val(out, split, num, spec):
        if split == "val":
            raise KeyboardInterrupt("killed")
        return real(out, split, num, spec)

    monkeypatch.setattr(toy, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        generate_toy_dataset(tmp_path / "mvit_toy", SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary directory is left
    monkeypatch.setattr(toy, "_write_split", real)
    root = generate_toy_dataset(tmp_path / "mvit_toy", SMALL)
    assert (root / "DONE").is_file() and [p.name for p in tmp_path.iterdir()] == ["mvit_toy"]


def test_refuses_foreign_directory_and_replaces_outdated_set(tmp_path):
    foreign = tmp_path / "mvit_toy"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a complete mvit_toy dataset"):
        generate_toy_dataset(foreign, SMALL)
    assert (foreign / "mine.txt").read_text() == "user data"

    root = generate_toy_dataset(tmp_path / "other" / "mvit_toy", SMALL)
    bigger = ToySpec(num_train=13, num_val=4, height=96, width=128)
    generate_toy_dataset(root, bigger)
    assert json.loads((root / "DONE").read_text())["num_train"] == 13
    assert len(list((root / "train").iterdir())) == 13
    assert sorted(p.name for p in root.parent.iterdir()) == ["mvit_toy"]


def test_spec_validation():
    with pytest.raises(ValueError, match="at least 64x64"):
        ToySpec(height=32)
    with pytest.raises(ValueError, match="num_train and num_val must be >= 1"):
        ToySpec(num_val=0)
    with pytest.raises(ValueError, match="min_radius <= max_radius"):
        ToySpec(min_radius=0.3, max_radius=0.2)


@pytest.fixture
def clean_catalog():
    """Unregister the toy names for the test, and register them again (as the import did) afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mvit_det.detection.builtin_datasets import register_all_builtin

    def clear():
        for name in TOY_DATASET_NAMES:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    clear()
    yield
    clear()
    register_all_builtin()


def test_register_is_lazy_idempotent_and_checks_root(tmp_path, clean_catalog):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    paths = register_toy_dataset(tmp_path)
    assert set(paths) == set(TOY_DATASET_NAMES)
    assert not (tmp_path / "mvit_toy").exists()  # registering generates nothing
    for name in TOY_DATASET_NAMES:  # the metadata is complete before the data exist
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(TOY_CLASSES)
        assert len(meta.thing_colors) == len(TOY_CLASSES)
        assert meta.evaluator_type == "coco" and meta.json_file == paths[name]
    assert len(DatasetCatalog.get("mvit_toy_train")) == 200  # the first get generates the set
    assert (tmp_path / "mvit_toy" / "DONE").is_file() and Path(paths["mvit_toy_train"]).is_file()
    assert register_toy_dataset(tmp_path) == paths  # second call: no error, no regeneration
    val = DatasetCatalog.get("mvit_toy_val")
    assert len(val) == 50 and val[0]["height"] == 256 and val[0]["width"] == 320
    assert MetadataCatalog.get("mvit_toy_val").thing_classes == list(TOY_CLASSES)  # loading kept it consistent
    with pytest.raises(ValueError, match="already registered"):
        register_toy_dataset(tmp_path / "elsewhere")


def test_check_datasets_registered_names_the_missing_ones():
    from mvit_det.data import check_datasets_registered

    check_datasets_registered(["mvit_toy_train", "mvit_toy_val"])  # registered by importing mvit_det.detection
    with pytest.raises(KeyError, match=r"\['no_such_dataset'\] are not registered.*register_coco_instances"):
        check_datasets_registered(["mvit_toy_val", "no_such_dataset"])


IMPORT_ONLY = """
import json, os, sys
from detectron2.data import DatasetCatalog, MetadataCatalog
before = [n for n in DatasetCatalog.list() if n.startswith("mvit_toy")]
import mvit_det.detection  # the only thing that registers the toy set in this process
root = os.path.join(os.environ["MVIT_DET_DATASETS"], "mvit_toy")
report = {"before": before, "after": [n for n in DatasetCatalog.list() if n.startswith("mvit_toy")],
          "exists_after_import": os.path.exists(root),
          "classes": MetadataCatalog.get("mvit_toy_val").thing_classes}
if sys.argv[1] == "get":
    report["val"] = len(DatasetCatalog.get("mvit_toy_val"))
    report["done"] = os.path.isfile(os.path.join(root, "DONE"))
    report["left"] = sorted(os.listdir(os.environ["MVIT_DET_DATASETS"]))
print("REPORT", json.dumps(report))
"""


def _import_only(root: Path, mode: str, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MVIT_DET_DATASETS=str(root), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", IMPORT_ONLY, mode], env=env, cwd=str(root.parent),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("REPORT "):])


@pytest.mark.slow
def test_import_registers_and_first_get_generates(tmp_path):
    """detectron2's pattern in a fresh process: import registers (nothing on disk), the first get generates."""
    root = tmp_path / "datasets"
    report = _import_only(root, "import")
    assert report["before"] == [] and report["after"] == list(TOY_DATASET_NAMES)
    assert report["exists_after_import"] is False and report["classes"] == list(TOY_CLASSES)
    assert not root.exists()
    report = _import_only(root, "get")
    assert report["val"] == 50 and report["done"] is True
    assert report["left"] == ["mvit_toy"]  # no temporary folder is left beside it
