"""Predictor options for both config kinds: a list of images batched through the model (equal to one by one),
test-time augmentation through detectron2's GeneralizedRCNNWithTTA, and reduced precision (bf16 autocast)."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import pairwise_iou

from mvit_det.detection.run_config import load_config
from mvit_det.detection.predictor import LazyPredictor, build_predictor

REPO = Path(__file__).resolve().parents[1]
LAZY = str(REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py")
YACS = str(REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml")


@pytest.fixture(scope="module")
def lazy(toy_detector_weights) -> LazyPredictor:
    return LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", batch_size=2)


def assert_same(a, b, box_atol=1e-3, score_atol=1e-5, mask_frac=1e-3) -> None:
    assert a.image_size == b.image_size
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=box_atol)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=score_atol)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert (a.pred_masks != b.pred_masks).float().mean() <= mask_frac


def count_model_calls(monkeypatch, model, method: str) -> list[int]:
    """Record the batch size of every call of ``model.<method>`` ("forward": the predictor's calls; "inference":
    GeneralizedRCNNWithTTA's)."""
    sizes: list[int] = []
    original = getattr(model, method)

    def spy(batched_inputs, *a, **k):
        sizes.append(len(batched_inputs))
        return original(batched_inputs, *a, **k)

    monkeypatch.setattr(model, method, spy)
    return sizes


def test_batched_equals_one_by_one(lazy, toy_detector_weights, monkeypatch, toy_bgr):
    # a and c resize to the same padded input; b (another aspect ratio) pads to another size and is batched alone.
    images = [toy_bgr(1, 120, 160), toy_bgr(2, 96, 150), toy_bgr(3, 120, 160)]
    shapes = [lazy._padded_shape(lazy._model_input(im)["image"]) for im in images]
    assert shapes[0] == shapes[2] != shapes[1]
    singles = [lazy(im)["instances"] for im in images]
    sizes = count_model_calls(monkeypatch, lazy.model, "forward")
    batched = lazy(images)
    assert sorted(sizes) == [1, 2]  # a and c went through the model together
    assert isinstance(batched, list) and len(batched) == 3
    for one, many, im in zip(singles, batched, images):
        assert many["instances"].image_size == im.shape[:2]
        assert_same(many["instances"], one)

    yacs = build_predictor(YACS, weights=toy_detector_weights, device="cpu", batch_size=2)
    pair = [images[0], images[2]]  # one batch of two
    for one, many in zip([yacs(im)["instances"] for im in pair], yacs(pair)):
        assert_same(many["instances"], one)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", batch_size=0)


def test_tta_single_scale_without_flip_equals_plain(lazy, toy_detector_weights, toy_bgr):
    image = toy_bgr(4, 120, 160)
    plain = lazy(image)["instances"]
    (resize,) = lazy.augs  # the config's test resize, as one TTA scale
    single = {"min_sizes": [resize.short_edge_length[0]], "max_size": resize.max_size, "flip": False}
    tta = LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", tta=single)
    # GeneralizedRCNNWithTTA maps boxes back with the inverse resize and re-runs the mask head on the merged
    # boxes: the same detections up to float rounding of the coordinates.
    assert_same(tta(image)["instances"], plain, box_atol=1e-2, score_atol=1e-5, mask_frac=1e-3)

    yacs_plain = build_predictor(YACS, weights=toy_detector_weights, device="cpu")(image)["instances"]
    yacs_tta = build_predictor(YACS, weights=toy_detector_weights, device="cpu", tta=single)(image)["instances"]
    assert_same(yacs_tta, yacs_plain, box_atol=1e-2, score_atol=1e-5, mask_frac=1e-3)


def test_tta_multi_scale_and_flip(lazy, toy_detector_weights, monkeypatch, toy_bgr):
    defaults = get_cfg().TEST.AUG
    p = LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", tta=True)
    assert p.tta_settings == {"min_sizes": list(defaults.MIN_SIZES), "max_size": defaults.MAX_SIZE, "flip": True}

    p = LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", batch_size=4, tta={"min_sizes": [96, 128]})
    sizes = count_model_calls(monkeypatch, p.model, "inference")
    image = toy_bgr(5, 120, 160)
    inst = p(image)["instances"]
    # 2 sizes x (plain, flipped) = 4 views, in one batch for the boxes and one for the masks
    assert sizes == [4, 4]
    assert inst.image_size == (120, 160) and len(inst) > 0
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    assert inst.pred_masks.shape == (len(inst), 120, 160)
    plain = lazy(image)["instances"]
    assert len(inst) != len(plain) or not torch.allclose(inst.scores, plain.scores)  # the views were merged
    with pytest.raises(ValueError, match="Unknown tta setting"):
        LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", tta={"sizes": [100]})


def test_precision_errors(toy_detector_weights):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device.*use precision 'bf16'"):
        LazyPredictor(LAZY, weights=toy_detector_weights, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="Unknown precision 'fp64': use one of fp32, bf16, fp16"):
        build_predictor(YACS, weights=toy_detector_weights, device="cpu", precision="fp64")


def test_bf16_agrees_with_fp32_on_a_real_photo():
    """demo/cat.jpg through the COCO Mask R-CNN T config (test resize 320/480 to keep it quick) with random
    weights made decisive: the RPN ranks anchors by a random objectness filter and the classifier spreads the class
    scores, so the top detections are not near-ties that any rounding would reorder.

    Tolerance: each of the 5 highest-scoring fp32 detections has a bf16 detection of the same class with IoU >= 0.98,
    every box coordinate within 1 pixel (image 451x300) and a score within 0.03 (bf16 keeps 8 bits of mantissa)."""
    cfg = load_config(str(REPO / "configs" / "mvitv2_t_maskrcnn.py"),
                      ["dataloader.test.mapper.augmentations.0.short_edge_length=320",
                       "dataloader.test.mapper.augmentations.0.max_size=480"])  # fmt: skip
    torch.manual_seed(0)
    fp32 = LazyPredictor(cfg, weights="", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in fp32.model.named_parameters():
            if "objectness_logits.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "cls_score.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    image = cv2.imread(str(REPO / "demo" / "cat.jpg"))
    a = fp32(image)["instances"]
    bf16 = LazyPredictor(cfg, weights="", device="cpu", precision="bf16")
    bf16.model.load_state_dict(fp32.model.state_dict())
    b = bf16(image)["instances"]
    assert b.pred_boxes.tensor.dtype == torch.float32 and b.scores.dtype == torch.float32
    assert len(a) == len(b) == 100
    assert a.scores[0] - a.scores[5] > 0.05  # distinct scores at the top
    for i in range(5):
        same = (b.pred_classes == a.pred_classes[i]).nonzero().flatten()
        assert len(same) > 0, f"no bf16 detection of class {int(a.pred_classes[i])}"
        iou = pairwise_iou(a.pred_boxes[i : i + 1], b.pred_boxes[same])[0]
        j = same[iou.argmax()]
        assert iou.max() >= 0.98, (i, float(iou.max()))
        assert (a.pred_boxes.tensor[i] - b.pred_boxes.tensor[j]).abs().max() <= 1.0
        assert abs(float(a.scores[i] - b.scores[j])) <= 0.03
