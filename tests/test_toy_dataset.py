"""The built-in toy shapes dataset: deterministic, valid COCO, consistent masks/boxes, atomic, registered."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    register_datasets_for,
    register_toy_dataset,
)

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


@pytest.fixture
def clean_catalog():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    def clear():
        for name in TOY_DATASET_NAMES:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    clear()
    yield
    clear()


def test_register_is_idempotent_and_checks_root(tmp_path, clean_catalog):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    paths = register_toy_dataset(tmp_path)
    assert set(paths) == set(TOY_DATASET_NAMES)
    assert register_toy_dataset(tmp_path) == paths  # second call: no error, no regeneration
    for name in TOY_DATASET_NAMES:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(TOY_CLASSES)
        assert meta.evaluator_type == "coco"
    assert len(DatasetCatalog.get("mvit_toy_train")) == 200
    val = DatasetCatalog.get("mvit_toy_val")
    assert len(val) == 50 and val[0]["height"] == 256 and val[0]["width"] == 320
    with pytest.raises(ValueError, match="already registered"):
        register_toy_dataset(tmp_path / "elsewhere")


def test_register_datasets_for(tmp_path, monkeypatch, clean_catalog):
    monkeypatch.setenv("MVIT_DET_DATASETS", str(tmp_path))
    register_datasets_for(["mvit_toy_val"])
    assert (tmp_path / "mvit_toy" / "DONE").is_file()
    with pytest.raises(KeyError, match="register_coco_instances"):
        register_datasets_for(["no_such_dataset"])
