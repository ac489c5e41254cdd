"""Parity per recipe family of the detector zoo: a detectron2 model-zoo ``.pkl`` written from detectron2's own
model (built here from detectron2's modeling classes exactly as its project configs build it, random non-trivial
weights) gives the same detections through ``get_detector(name, pretrained=pkl)`` as through detectron2.

Families: MViTv2 Mask R-CNN, MViTv2 Cascade Mask R-CNN (projects/MViTv2), ViTDet Cascade Mask R-CNN on COCO and on
LVIS v1 (projects/ViTDet, MViTv2 backbone). To stay within a CPU budget every family runs with the MViTv2-T trunk
(the zoo entry's ``model.backbone.bottom_up.size`` set to tiny; detectron2's ``MViT`` with T's depth and widths) on a
240x320 photo, the ViTDet ones with a 320 square pad instead of 1024, and with 100 proposals per image (LVIS: 25) instead
of 1000 (the cascade's 4-conv box heads on 1000 RoIs x 3 stages dominate the CPU time), and LVIS with 100 detections
instead of 300 (the mask head's cost); the heads, FPN, normalisation, the other LVIS predictor settings (sigmoid
cross-entropy, federated-loss weights) and the checkpoint path are the entry's own. For the B entries the full-size
models are also compared key by key and shape by shape (no inference).
"""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data.detection_utils import get_fed_loss_cls_weights
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import NaiveSyncBatchNorm
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers
from skimage import data as skdata
from test_model_zoo_parity import randomise  # informative random weights, as in the Mask R-CNN T parity test
from torch import nn

from benchmarks.references import detectron2_mask_rcnn_config
from mvit_det.detection.run_config import load_config
from mvit_det.detection.zoo import get_detector, get_detector_card

# detectron2's MViT drop-path rate per size (projects/MViTv2 and projects/ViTDet configs)
D2_DROP_PATH = {"tiny": 0.2, "base": 0.4}
SQUARE = 320
#: proposals per test image; LVIS: fewer, as every proposal scores all 1203 classes and the per-class NMS over
#: proposals x classes candidates dominates its time (25 x 1203 still fill the 100 detections)
PROPOSALS = {"mask_rcnn": 100, "cascade": 100, "vitdet_coco": 100, "vitdet_lvis": 25}


def d2_model(family: str, size: str = "tiny"):
    """detectron2's own model of the family, from its modeling classes, as its project configs write it."""
    model = detectron2_mask_rcnn_config(size, drop_path_rate=D2_DROP_PATH[size])
    model.proposal_generator.pre_nms_topk = (2000, PROPOSALS[family] * 5)
    model.proposal_generator.post_nms_topk = (1000, PROPOSALS[family])
    if family == "mask_rcnn":
        model.roi_heads.box_predictor.test_score_thresh = 0.0
        return model
    vitdet = family.startswith("vitdet")
    if vitdet:  # projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py
        model.backbone.square_pad = SQUARE
        model.backbone.norm = "LN"
        norm = "LN"
    else:  # projects/MViTv2/configs/cascade_mask_rcnn_mvitv2_t_3x.py
        norm = lambda c: NaiveSyncBatchNorm(c, stats_mode="N")  # noqa: E731
    model.proposal_generator.head.conv_dims = [-1, -1]
    [model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]
    model.roi_heads.update(
        _target_=CascadeROIHeads,
        box_heads=[
            L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=256, height=7, width=7), conv_dims=[256] * 4,
                                  fc_dims=[1024], conv_norm=norm)  # fmt: skip
            for _ in range(3)
        ],
        box_predictors=[
            L(FastRCNNOutputLayers)(input_shape=ShapeSpec(channels=1024), test_score_thresh=0.0,
                                    box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
                                    cls_agnostic_bbox_reg=True, num_classes="${...num_classes}")  # fmt: skip
            for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
        ],
        proposal_matchers=[
            L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
        ],
    )
    model.roi_heads.mask_head.conv_norm = norm
    if family == "vitdet_lvis":  # projects/ViTDet/configs/LVIS/cascade_mask_rcnn_mvitv2_b_in21k_100ep.py
        model.roi_heads.num_classes = 1203
        for p in model.roi_heads.box_predictors:
            p.test_topk_per_image = 100  # the recipe's 300 (checked in test_detector_zoo.py), cut for CPU time
            p.use_sigmoid_ce = True
            p.use_fed_loss = True
            p.get_fed_loss_cls_weights = lambda: get_fed_loss_cls_weights("lvis_v1_train", 0.5)
    return model


FAMILIES = {
    "mask_rcnn": "mask_rcnn_mvitv2_t_3x",
    "cascade": "cascade_mask_rcnn_mvitv2_t_3x",
    "vitdet_coco": "vitdet_coco_cascade_mask_rcnn_mvitv2_b_in21k_100ep",
    "vitdet_lvis": "vitdet_lvis_cascade_mask_rcnn_mvitv2_b_in21k_100ep",
}


def zoo_opts(family: str) -> list[str]:
    opts = ["model.backbone.bottom_up.size=tiny", f"model.proposal_generator.pre_nms_topk=[2000,{PROPOSALS[family] * 5}]",
            f"model.proposal_generator.post_nms_topk=[1000,{PROPOSALS[family]}]"]
    if family == "mask_rcnn":
        opts.append("model.roi_heads.box_predictor.test_score_thresh=0.0")
    else:
        opts += [f"model.roi_heads.box_predictors.{i}.test_score_thresh=0.0" for i in range(3)]
    if family == "vitdet_lvis":  # the mask head on 300 detections dominated the time; compare 100
        opts += [f"model.roi_heads.box_predictors.{i}.test_topk_per_image=100" for i in range(3)]
    if family.startswith("vitdet"):  # the ViTDet test resize (longer side = square size), at 320 instead of 1024
        opts += [f"model.backbone.square_pad={SQUARE}", f"dataloader.test.mapper.augmentations.0.short_edge_length={SQUARE}",
                 f"dataloader.test.mapper.augmentations.0.max_size={SQUARE}"]  # fmt: skip
    else:
        opts += ["dataloader.test.mapper.augmentations.0.short_edge_length=240",
                 "dataloader.test.mapper.augmentations.0.max_size=320"]  # fmt: skip
    return opts


def write_pkl(model: nn.Module, path) -> str:
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, f)
    return str(path)


def assert_same_detections(got, expected, tie: float = 1e-5) -> None:
    """Same detections, in the same order except among scores tied within ``tie`` (with 1203 sigmoid classes the
    two implementations' rounding can swap them): each detection is matched to one of the other side with the same
    class and score and the same box (1e-3 px) and mask (< 0.1 % of pixels); only the lowest-scoring ones, which
    can fall on either side of the top-k cut, may be unmatched."""
    assert len(got) == len(expected)
    gb, eb = got.pred_boxes.tensor, expected.pred_boxes.tensor
    unmatched = []
    used = torch.zeros(len(got), dtype=torch.bool)
    for i in range(len(expected)):
        cand = (~used) & (got.pred_classes == expected.pred_classes[i]) & ((got.scores - expected.scores[i]).abs() <= tie)
        cand &= (gb - eb[i]).abs().max(dim=1).values <= 1e-3
        idx = cand.nonzero().flatten()
        if len(idx) == 0:
            unmatched.append(i)
            continue
        j = idx[0]
        used[j] = True
        assert (got.pred_masks[j] != expected.pred_masks[i]).float().mean() < 1e-3
    cut = float(expected.scores.min()) + tie
    assert all(float(expected.scores[i]) <= cut for i in unmatched), [float(expected.scores[i]) for i in unmatched]
    assert len(unmatched) <= 2
    torch.testing.assert_close(got.scores, expected.scores, atol=tie, rtol=0)  # sorted scores agree everywhere


@pytest.fixture(scope="module")
def photo_bgr() -> np.ndarray:
    rgb = cv2.resize(skdata.astronaut(), (320, 240), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb[:, :, ::-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zoo_entry_matches_detectron2(family, tmp_path, photo_bgr):
    torch.manual_seed(0)
    ref = instantiate(d2_model(family)).eval()
    randomise(ref)
    pkl = write_pkl(ref, tmp_path / "model_final.pkl")

    ours = get_detector(FAMILIES[family], pretrained=pkl, device="cpu", opts=zoo_opts(family))
    assert set(ours.model.state_dict()) == set(ref.state_dict())
    inputs = ours._model_input(photo_bgr)
    assert inputs["image"].shape[1:] == ((SQUARE * 3 // 4, SQUARE) if family.startswith("vitdet") else (240, 320))
    with torch.no_grad():
        expected = ref([inputs])[0]["instances"]
    got = ours(photo_bgr)["instances"]

    assert len(expected) == 100  # score threshold 0: a full set
    assert got.image_size == expected.image_size == (240, 320)
    assert_same_detections(got, expected)
    # the comparison is between informative outputs
    assert expected.scores.std() > 1e-3 and len(expected.pred_classes.unique()) > 2
    assert ours.metadata.thing_classes == get_detector_card(FAMILIES[family]).classes


@pytest.mark.parametrize("family", ["cascade", "vitdet_coco", "vitdet_lvis"])
def test_base_entries_have_detectron2s_keys_and_shapes(family):
    """The B entries (no size override) have exactly the parameters of detectron2's B model of the family."""
    name = {"cascade": "cascade_mask_rcnn_mvitv2_b_3x"}.get(family, FAMILIES[family])
    ours = instantiate(load_config(str(get_detector_card(name).config_path)).model)
    ref = instantiate(d2_model(family, "base"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
