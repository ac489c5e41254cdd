"""A user's own COCO-format dataset with 3 classes: registration, num_classes in every head, a short training run."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
import detectron2.data.transforms as T  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402

from mvit_det.detection.builders import build_model, head_num_classes  # noqa: E402
from mvit_det.detection.engine import do_train  # noqa: E402
from mvit_det.detection.run_config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red_box", "green_box", "blue_disc"]


def _write_coco(root: Path, split: str, n: int, seed: int) -> tuple[str, str]:
    """n images of 128x160 with 1-3 objects of the three classes; COCO json with polygons (category ids 5, 7, 9,
    deliberately not 1..3, as in many real exports)."""
    rng = np.random.default_rng(seed)
    img_dir = root / split
    img_dir.mkdir(parents=True)
    cat_ids = [5, 7, 9]
    colors = [(0, 0, 255), (0, 200, 0), (255, 0, 0)]  # BGR
    images, anns = [], []
    for i in range(n):
        img = np.full((128, 160, 3), 90, np.uint8)
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(0, 3))
            x0, y0 = int(rng.integers(5, 100)), int(rng.integers(5, 70))
            s = int(rng.integers(20, 50))
            if c < 2:
                pts = np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]], np.int32)
            else:
                t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                pts = np.stack([x0 + s / 2 + s / 2 * np.cos(t), y0 + s / 2 + s / 2 * np.sin(t)], 1).astype(np.int32)
            cv2.fillPoly(img, [pts], colors[c])
            x, y = pts.min(0)
            w, h = pts.max(0) - pts.min(0) + 1
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_ids[c], "iscrowd": 0,
                         "bbox": [int(x), int(y), int(w), int(h)], "area": int(w * h),
                         "segmentation": [pts.reshape(-1).astype(float).tolist()]})  # fmt: skip
        cv2.imwrite(str(img_dir / f"{i}.jpg"), img)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 128, "width": 160})
    cats = [{"id": k, "name": name} for k, name in zip(cat_ids, CLASSES)]
    path = root / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path), str(img_dir)


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    names = ("custom3_train", "custom3_val")
    for name, split, n, seed in ((names[0], "train", 4, 0), (names[1], "val", 2, 1)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, *_write_coco(root, split, n, seed))
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _lazy_cfg(config: str, out: Path, num_classes: int | None = 3):
    opts = [
        "dataloader.train.dataset.names=custom3_train",
        "dataloader.test.dataset.names=custom3_val",
        "train.init_checkpoint=",  # no download in tests
        "train.amp.enabled=False",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "train.max_iter=2",
        "train.eval_period=0",
        "train.log_period=1",
        f"train.output_dir={out}",
    ]
    if num_classes is not None:
        opts.append(f"model.roi_heads.num_classes={num_classes}")
    cfg = load_config(str(REPO / "configs" / config), opts)
    cfg.dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=160)]
    return cfg


@pytest.mark.slow
def test_mask_rcnn_lazy_custom_dataset_trains(custom, tmp_path):
    cfg = _lazy_cfg("mvitv2_t_maskrcnn.py", tmp_path)
    model = build_model(cfg)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 12  # class-specific boxes
    assert model.roi_heads.mask_head.predictor.out_channels == 3
    results = do_train(cfg, model=model)
    res = results["custom3_val"]
    assert set(res) == {"bbox", "segm"}
    assert {f"AP-{c}" for c in CLASSES} <= set(res["bbox"])  # the evaluator uses the dataset's own classes
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 1


def test_cascade_lazy_num_classes_reaches_every_stage(custom, tmp_path):
    model = build_model(_lazy_cfg("mvitv2_t_cascade.py", tmp_path))
    predictors = model.roi_heads.box_predictor
    assert len(predictors) == 3
    for p in predictors:
        assert p.cls_score.out_features == 4
        assert p.bbox_pred.out_features == 4  # cascade boxes are class-agnostic
    assert model.roi_heads.mask_head.predictor.out_channels == 3
    assert set(head_num_classes(model).values()) == {3} and len(head_num_classes(model)) == 4


@pytest.mark.parametrize("config, stages", [("mvitv2_t_maskrcnn.yaml", 1), ("mvitv2_t_cascade.yaml", 3)])
def test_yacs_num_classes_reaches_every_head(custom, config, stages):
    cfg = load_config(
        str(REPO / "configs" / "yacs" / config),
        ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('custom3_train',)"],
    )
    model = build_model(cfg)
    heads = head_num_classes(model)
    assert len(heads) == stages + 1 and set(heads.values()) == {3}, heads
    predictors = model.roi_heads.box_predictor if stages > 1 else [model.roi_heads.box_predictor]
    assert [p.cls_score.out_features for p in predictors] == [4] * stages
    assert model.roi_heads.mask_head.predictor.out_channels == 3


def test_forgotten_num_classes_fails_with_the_fix(custom, tmp_path):
    cfg = _lazy_cfg("mvitv2_t_maskrcnn.py", tmp_path, num_classes=None)  # COCO's 80 classes left in place
    with pytest.raises(ValueError, match=r"'custom3_train' has 3 classes \(red_box, green_box, blue_disc\).*"
                                         r"model\.roi_heads\.num_classes=3"):  # fmt: skip
        do_train(cfg)
    assert not (tmp_path / "model_final.pth").exists()


def test_predictor_metadata_has_class_names_before_the_data_is_loaded(tmp_path):
    from mvit_det.detection.predictor import dataset_metadata

    register_coco_instances("custom3_meta", {}, *_write_coco(tmp_path, "meta", 1, 3))
    try:
        assert MetadataCatalog.get("custom3_meta").get("thing_classes") is None  # not loaded yet
        assert dataset_metadata(["custom3_meta"]).thing_classes == CLASSES
        assert dataset_metadata(["unknown_set"]).get("thing_classes") is None  # -> class indices
    finally:
        DatasetCatalog.remove("custom3_meta")
        MetadataCatalog.remove("custom3_meta")
