"""Parity with detectron2's own MViTv2 detector and checkpoint formats.

* A model-zoo ``.pkl`` written from detectron2's ``MViT`` Mask R-CNN (built exactly as
  projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py, random non-trivial weights) loads into our
  ``configs/mvitv2_t_maskrcnn.py`` model with no missing or unexpected keys, and both detectors give the
  same boxes, scores, classes and masks on a real-size image.
* An official ImageNet ``.pyth`` (``{"model_state": ...}`` with ``head.projection``) initialises every
  trunk weight of our detector through ``DetectionCheckpointer``; the rest stays as initialised.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from skimage import data as skdata

from benchmarks.references import detectron2_mask_rcnn_config
from mvit_det.models import MViTv2

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def detectron2_mask_rcnn_mvitv2_t():
    """The model of detectron2's projects/MViTv2/configs/mask_rcnn_mvitv2_t_3x.py, with every score kept."""
    model = detectron2_mask_rcnn_config("tiny", drop_path_rate=0.2)
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    return model


@pytest.fixture(scope="module")
def _our_mask_rcnn_t() -> nn.Module:
    cfg = LazyConfig.load(str(CONFIGS / "mvitv2_t_maskrcnn.py"))
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    return instantiate(cfg.model)


@pytest.fixture
def our_mask_rcnn_t(_our_mask_rcnn_t) -> nn.Module:
    """A fresh copy of configs/mvitv2_t_maskrcnn.py's model (building it once saves time)."""
    return copy.deepcopy(_our_mask_rcnn_t)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> None:
    """Make every parameter informative: random rel-pos tables (detectron2 zero-inits them), non-unit
    norms, and box/class predictors strong enough to move boxes and spread the scores."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("rel_pos_h", "rel_pos_w")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "norm" in name and name.endswith(".weight") and p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif "cls_score" in name or "bbox_pred" in name or "mask_head.predictor" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def real_image() -> torch.Tensor:
    """skimage's astronaut (RGB), resized to 600x800: (3, 600, 800) float, RGB as both configs expect."""
    img = cv2.resize(skdata.astronaut(), (800, 600), interpolation=cv2.INTER_LINEAR)
    return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def capture_load(checkpointer: DetectionCheckpointer, path: str):
    """``checkpointer.load(path)``, returning the incompatible-keys report of ``_load_model``."""
    reports = []
    load_model = checkpointer._load_model
    checkpointer._load_model = lambda ckpt: reports.append(load_model(ckpt)) or reports[-1]
    checkpointer.load(path)
    assert len(reports) == 1
    return reports[0]


def test_model_zoo_pkl_loads_and_matches_detectron2(tmp_path, our_mask_rcnn_t):
    torch.manual_seed(0)
    d2_model = instantiate(detectron2_mask_rcnn_mvitv2_t()).eval()
    randomise(d2_model)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_model.state_dict().items()}, "__author__": "test"}, f)

    ours = our_mask_rcnn_t.eval()
    report = capture_load(DetectionCheckpointer(ours), str(path))
    assert report.missing_keys == []
    assert report.unexpected_keys == []
    assert report.incorrect_shapes == []
    assert set(ours.state_dict()) == set(d2_model.state_dict())

    image = real_image()
    inputs = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    with torch.no_grad():
        ref = d2_model.inference(inputs, do_postprocess=False)[0]
        out = ours.inference(inputs, do_postprocess=False)[0]

    assert len(ref) == 100  # test_score_thresh 0: a full set of detections to compare
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(out.pred_classes, ref.pred_classes)
    torch.testing.assert_close(out.pred_masks, ref.pred_masks, atol=1e-4, rtol=1e-4)
    # The randomised predictors really spread things out (the comparison is not between constants).
    assert ref.scores.std() > 1e-3 and ref.pred_masks.std() > 1e-2
    assert len(ref.pred_classes.unique()) > 5


@pytest.mark.parametrize("cls_token", [False, True], ids=["in1k", "in21k-style-cls-token"])
def test_imagenet_pyth_initialises_trunk(tmp_path, cls_token, our_mask_rcnn_t):
    torch.manual_seed(1)
    classifier = MViTv2("tiny", cls_token=cls_token)
    randomise(classifier, seed=1)
    # Official layout: the classifier is head.projection.
    state = {k.replace("head.fc.", "head.projection."): v for k, v in classifier.state_dict().items()}
    path = tmp_path / "MViTv2_T_in1k.pyth"
    torch.save({"model_state": state}, path)

    detector = our_mask_rcnn_t
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    report = capture_load(DetectionCheckpointer(detector), str(path))
    after = detector.state_dict()

    trunk = [k for k in state if k.startswith(("patch_embed.", "blocks."))]
    trunk_keys = {f"backbone.bottom_up.{k}" for k in trunk}
    # Every trunk tensor of the detector is in the checkpoint (only the scale norms are detection-only).
    assert trunk_keys == {k for k in after if k.startswith("backbone.bottom_up.") and "_norm." not in k}
    for k in trunk:
        torch.testing.assert_close(after[f"backbone.bottom_up.{k}"], state[k], rtol=0, atol=0)
    for k, v in after.items():  # scale norms, FPN, RPN and ROI heads keep their initialisation
        if k not in trunk_keys:
            assert torch.equal(v, before[k]), k
    assert set(report.unexpected_keys) == {"norm.weight", "norm.bias", "head.projection.weight",
                                           "head.projection.bias"} | ({"cls_token"} if cls_token else set())
