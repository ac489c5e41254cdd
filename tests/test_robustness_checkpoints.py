"""Robustness: checkpoints of the wrong kind, size or class count, loaded into detectors and classifiers.

Detector side: ``mvit_det.detection.MViTv2Checkpointer`` (what tools/train_net.py, --eval-only and the
predictors use) against detectron2's own ``DetectionCheckpointer`` on the same files, with the toy Mask R-CNN
(MViTv2-T). Classifier side: ``load_checkpoint`` / ``get_model`` / ``tools/classify.py``. Cases already covered
elsewhere (truncated files, HTML pages, wrong size into a classifier, ...) are listed in docs/robustness.md.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402

from mvit_det import get_model  # noqa: E402
from mvit_det.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from mvit_det.detection import MViTv2Checkpointer  # noqa: E402
from mvit_det.models import MViTv2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
TRUNK = "backbone.bottom_up."


@pytest.fixture
def fvcore_log(capture_log):
    """What detectron2's checkpointer logs (fvcore.common.checkpoint), captured directly."""
    with capture_log("fvcore.common.checkpoint", logging.INFO) as messages:
        yield messages


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(str(TOY)).model).eval()


@pytest.fixture(scope="module")
def classifier(ckpt_fill_random) -> MViTv2:
    return ckpt_fill_random(MViTv2("tiny"), 5).eval()


@pytest.fixture(scope="module")
def pyth(classifier, tmp_path_factory) -> Path:
    """The classifier in the official facebookresearch/mvit layout (``model_state``, ``head.projection``)."""
    sd = {k.replace("head.fc.", "head.projection."): v for k, v in classifier.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "MViTv2_T_in1k.pyth"
    torch.save({"model_state": sd, "epoch": 300}, path)
    return path


@pytest.fixture(scope="module")
def mmpretrain_ckpt(classifier, tmp_path_factory) -> Path:
    """The classifier in mmpretrain's layout (``state_dict``, ``backbone.`` prefix, ``patch_embed.projection``,
    ``norm3``)."""

    def rename(k: str) -> str:
        if k.startswith("head."):
            return k
        k = k.replace("patch_embed.proj.", "patch_embed.projection.")
        return "backbone." + (k.replace("norm.", "norm3.", 1) if k.startswith("norm.") else k)

    path = tmp_path_factory.mktemp("ckpt") / "mvitv2-tiny_mmpretrain.pth"
    torch.save({"state_dict": {rename(k): v for k, v in classifier.state_dict().items()}, "meta": {}}, path)
    return path


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _missing_from_log(messages: list[str]) -> str:
    found = [m for m in messages if m.startswith("Some model parameters or buffers are not found in the checkpoint")]
    assert len(found) == 1, messages
    return found[0]


# -- ImageNet classifier -> detector -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["official .pyth", "mmpretrain"])
def test_imagenet_checkpoint_initialises_the_detector_backbone(fmt, detector, classifier, pyth, mmpretrain_ckpt, fvcore_log):
    path = pyth if fmt == "official .pyth" else mmpretrain_ckpt
    before = _snapshot(detector)
    MViTv2Checkpointer(detector).load(str(path))
    after = detector.state_dict()
    src = classifier.state_dict()
    loaded = [k for k in after if k.startswith(TRUNK) and not k.startswith(TRUNK + "scale")]
    assert len(loaded) == len(src) - 4  # every classifier weight but norm.* and head.fc.*
    assert all(torch.equal(after[k], src[k[len(TRUNK):]]) for k in loaded)
    # Everything the ImageNet checkpoint cannot provide keeps its initialisation...
    untouched = [k for k in after if not k.startswith(TRUNK) or k.startswith(TRUNK + "scale")]
    assert all(torch.equal(after[k], before[k]) for k in untouched)
    # ... and detectron2's standard warning lists exactly those layers, nothing of the trunk's blocks.
    missing = _missing_from_log(fvcore_log)
    for layer in ["backbone.bottom_up.scale2_norm.{bias, weight}", "backbone.fpn_lateral2.{bias, weight}",
                  "proposal_generator.rpn_head.conv.{bias, weight}", "roi_heads.box_predictor.cls_score.{bias, weight}",
                  "roi_heads.mask_head.predictor.{bias, weight}"]:  # fmt: skip
        assert layer in missing
    assert "backbone.bottom_up.blocks" not in missing and "patch_embed" not in missing
    assert not any("not used by the model" in m for m in fvcore_log)  # the classifier's head is dropped on purpose


def test_detectron2_alone_on_the_same_files(detector, classifier, pyth, mmpretrain_ckpt):
    """What MViTv2Checkpointer fixes: detectron2 reads the .pyth layout only, and the mmpretrain one not at all."""
    DetectionCheckpointer(detector).load(str(pyth))  # suffix heuristics: same trunk weights here
    assert torch.equal(detector.backbone.bottom_up.blocks[3].attn.qkv.weight, classifier.blocks[3].attn.qkv.weight)
    with pytest.raises(ValueError, match=r"Unsupported type found in checkpoint! state_dict: <class 'dict'>"):
        DetectionCheckpointer(detector).load(str(mmpretrain_ckpt))


def test_wrong_size_imagenet_checkpoint_is_refused(detector, tmp_path):
    """An MViTv2-S classifier into a -T detector: detectron2 half-loads it (the first blocks match by name);
    MViTv2Checkpointer refuses and names the size, and leaves the detector untouched."""
    small = MViTv2("small")
    torch.save({"model_state": small.state_dict()}, tmp_path / "MViTv2_S_in1k.pyth")
    before = _snapshot(detector)
    with pytest.raises(ValueError) as err:
        MViTv2Checkpointer(detector).load(str(tmp_path / "MViTv2_S_in1k.pyth"))
    msg = str(err.value)
    assert msg.startswith(f"Cannot load {tmp_path / 'MViTv2_S_in1k.pyth'}: it does not fit the MViTv2 backbone "
                          "(backbone.bottom_up) of this model.")  # fmt: skip
    assert ("Likely cause: wrong model size: the checkpoint looks like MViTv2-S (16 blocks, width 96), the model is "
            "MViTv2-T (10 blocks, width 96)") in msg  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in detector.state_dict().items())

    DetectionCheckpointer(detector).load(str(tmp_path / "MViTv2_S_in1k.pyth"))
    small_sd = small.state_dict()
    same = [k for k, v in detector.state_dict().items()
            if k[len(TRUNK):] in small_sd and torch.equal(v, small_sd[k[len(TRUNK):]])]  # fmt: skip
    assert len(same) > 100  # the silent partial load this guards against


def test_wrong_size_detector_checkpoint_is_refused(detector, tmp_path):
    sd = {k: v for k, v in detector.state_dict().items() if not k.startswith(TRUNK)}
    with torch.device("meta"):
        small = MViTv2("small", detection=True).state_dict()
    sd.update({TRUNK + k: torch.zeros(v.shape) for k, v in small.items()})
    torch.save({"model": sd}, tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit the MViTv2 backbone.*the checkpoint looks like MViTv2-S"):
        MViTv2Checkpointer(detector).load(str(tmp_path / "model_final.pth"))


def test_classifier_into_detector_via_load_checkpoint(detector, pyth):
    with pytest.raises(TypeError, match=r"load_checkpoint loads into an MViTv2, got a GeneralizedRCNN that contains one "
                                        r"at 'backbone.bottom_up'\. For a detectron2 detector use "
                                        r"mvit_det.detection.MViTv2Checkpointer\(model\).load\(path\)"):
        load_checkpoint(detector, pyth)
    report = load_checkpoint(detector.backbone.bottom_up, pyth)  # the documented partial load, reported
    assert report.complete and report.format == "official"
    assert sorted({k.split(".")[0] for k in report.initialized}) == ["scale2_norm", "scale3_norm", "scale4_norm", "scale5_norm"]
    assert report.unused == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]


# -- inference / evaluation need every weight ----------------------------------------------------------------
def test_imagenet_checkpoint_is_refused_for_inference(detector, pyth):
    with pytest.raises(ValueError) as err:
        MViTv2Checkpointer(detector, require_all=True).load(str(pyth))
    msg = str(err.value)
    assert f"Checkpoint {pyth} does not provide every weight of this model" in msg
    assert "Likely cause: it is an ImageNet classification checkpoint (official format), which holds only the backbone" in msg
    # Every detector weight outside the ImageNet trunk (the detection norms, FPN, RPN and RoI heads) is named.
    provided = {"backbone.bottom_up." + k for k in read_checkpoint(pyth)[0]}
    missing = [k for k in detector.state_dict() if k not in provided]
    assert (f"Not in the checkpoint ({len(missing)}): backbone.bottom_up.scale2_norm.bias, "
            "backbone.bottom_up.scale2_norm.weight,") in msg


def _with_classes(sd: dict, n: int) -> dict:
    """The toy detector's weights with the box and mask predictors resized to ``n`` classes (random values)."""
    out = dict(sd)
    g = torch.Generator().manual_seed(n)
    for key, rows in [("roi_heads.box_predictor.cls_score", n + 1), ("roi_heads.box_predictor.bbox_pred", 4 * n),
                      ("roi_heads.mask_head.predictor", n)]:  # fmt: skip
        w = sd[key + ".weight"]
        out[key + ".weight"] = torch.randn((rows,) + tuple(w.shape[1:]), generator=g)
        out[key + ".bias"] = torch.randn(rows, generator=g)
    return out


def test_num_classes_mismatch(detector, tmp_path, fvcore_log):
    coco = _with_classes(detector.state_dict(), 80)
    torch.save({"model": coco}, tmp_path / "coco_model_final.pth")

    # Inference / evaluation: an error that names the fix.
    with pytest.raises(ValueError) as err:
        MViTv2Checkpointer(detector, require_all=True).load(str(tmp_path / "coco_model_final.pth"))
    msg = str(err.value)
    assert ("Likely cause: the checkpoint predicts 80 classes but this model 3. Set model.roi_heads.num_classes=80 "
            "(LazyConfig) or MODEL.ROI_HEADS.NUM_CLASSES 80 (yacs)") in msg  # fmt: skip
    assert ("Shape mismatch (6): roi_heads.box_predictor.cls_score.weight checkpoint [81, 1024] vs model [4, 1024]"
            in msg)  # fmt: skip

    # Training initialisation (fine-tuning a COCO detector on 3 classes): detectron2's warnings, predictors fresh.
    fvcore_log.clear()
    before = _snapshot(detector)
    MViTv2Checkpointer(detector).load(str(tmp_path / "coco_model_final.pth"))
    skipped = [m for m in fvcore_log if m.startswith("Skip loading parameter")]
    assert len(skipped) == 6 and "'roi_heads.box_predictor.cls_score.weight'" in skipped[0]
    assert "(81, 1024) in the checkpoint but (4, 1024) in the model" in skipped[0]
    assert torch.equal(detector.roi_heads.box_predictor.cls_score.weight, before["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(detector.roi_heads.box_head.fc1.weight, coco["roi_heads.box_head.fc1.weight"])


def test_complete_detector_checkpoint_loads_for_inference(detector, tmp_path, fvcore_log):
    torch.manual_seed(1)
    other = instantiate(LazyConfig.load(str(TOY)).model)
    torch.save({"model": other.state_dict(), "iteration": 9}, tmp_path / "model_final.pth")
    extra = MViTv2Checkpointer(detector, require_all=True).load(str(tmp_path / "model_final.pth"))
    assert extra == {"iteration": 9}
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in detector.state_dict().items())
    assert not any(m.startswith(("Some model parameters", "Skip loading")) for m in fvcore_log)


# -- unreadable files ---------------------------------------------------------------------------------------
def test_unreadable_files(detector, pyth, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"Checkpoint {tmp_path}/nope.pth not found\. Check the path"):
        MViTv2Checkpointer(detector).load(str(tmp_path / "nope.pth"))
    data = pyth.read_bytes()
    (tmp_path / "cut.pyth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut.pyth' is truncated or corrupt \(\d+ bytes\)"):
        MViTv2Checkpointer(detector).load(str(tmp_path / "cut.pyth"))
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"page.pth' is not a checkpoint"):
        MViTv2Checkpointer(detector).load(str(tmp_path / "page.pth"))


# -- detector -> classifier, through the user-facing entry points ---------------------------------------------
@pytest.fixture(scope="module")
def detector_ckpt(detector, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "model_final.pth"
    torch.save({"model": detector.state_dict()}, path)
    return path


def test_detector_checkpoint_into_classifier_entry_points(detector_ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"is from a detector \(detectron2 format\): its MViTv2 trunk has no classifier "
                                         r"norm and head, so it cannot fill a classification model"):
        get_model("mvitv2-tiny_3rdparty_in1k", pretrained=detector_ckpt)

    from tools import classify
    with pytest.raises(SystemExit) as info:
        classify.main([str(REPO / "demo" / "cat.jpg"), "--weights", str(detector_ckpt), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: cannot load --weights {detector_ckpt} into mvitv2-tiny_3rdparty_in1k: ValueError:" in err
    assert "is from a detector" in err and "RANDOM" not in err


def test_no_alarming_norm_warnings_with_cascade_heads(pyth, capture_log):
    """d2#4641/#4566: detectron2's suffix heuristics pair the classifier's final ``norm`` with the LayerNorms of the
    Cascade box heads and warn "Shape of norm.weight in checkpoint ... will not be loaded" for each of them.
    MViTv2Checkpointer matches exact names, so the ImageNet checkpoint loads into the Cascade detector quietly."""
    cfg = LazyConfig.load(str(REPO / "configs" / "mvitv2_t_cascade.py"))
    cascade = instantiate(cfg.model)
    with capture_log("detectron2.checkpoint.c2_model_loading") as messages:
        DetectionCheckpointer(cascade).load(str(pyth))
        alarming = [m for m in messages if m.startswith("Shape of norm.")]
        assert len(alarming) >= 12 and "roi_heads.box_head.0.conv1.norm.weight" in " ".join(alarming)
        messages.clear()
        MViTv2Checkpointer(cascade).load(str(pyth))
        assert messages == []
