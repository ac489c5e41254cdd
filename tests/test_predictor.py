"""LazyPredictor (.py configs), detectron2's DefaultPredictor with our yacs config, build_predictor and tools/demo.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402

from mvit_det.data.toy import TOY_CLASSES, ToySpec, render_toy_image  # noqa: E402
from mvit_det.detection import add_mvitv2_config  # noqa: E402
from mvit_det.detection.builders import build_model  # noqa: E402
from mvit_det.detection.run_config import load_config  # noqa: E402
from mvit_det.detection.predictor import LazyPredictor, build_predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAZY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
YACS = REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml"
H, W = 250, 333  # not multiples of 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random (seeded) weights of the toy Mask R-CNN, saved like a detectron2 checkpoint."""
    torch.manual_seed(0)
    model = build_model(load_config(str(LAZY)))
    path = tmp_path_factory.mktemp("w") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def image_bgr() -> np.ndarray:
    rgb, _ = render_toy_image(np.random.default_rng(3), ToySpec(1, 1, H, W))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _check_instances(inst) -> None:
    assert inst.image_size == (H, W)
    assert len(inst) > 0  # random heads score every class ~0.25, above the 0.05 test threshold
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert inst.pred_masks.shape == (len(inst), H, W)
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()


def test_lazy_predictor_matches_default_predictor(weights, image_bgr):
    # The one model setting the yacs twin cannot follow: detectron2's yacs RoI heads keep canonical_box_size 224.
    cfg = load_config(str(LAZY))
    cfg.model.roi_heads.box_pooler.canonical_box_size = cfg.model.roi_heads.mask_pooler.canonical_box_size = 224
    lazy = LazyPredictor(cfg, weights=weights, device="cpu")
    assert lazy.input_format == "RGB" and lazy.metadata.thing_classes == list(TOY_CLASSES)

    # yacs users: detectron2's DefaultPredictor, unchanged, on our YAML.
    cfg = get_cfg()
    add_mvitv2_config(cfg)
    cfg.merge_from_file(str(YACS))
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    default = DefaultPredictor(cfg)

    a = lazy(image_bgr)["instances"]
    b = default(image_bgr)["instances"]
    _check_instances(a)
    _check_instances(b)
    # Same weights, same test resize (short side 144) and RGB conversion: same detections.
    assert len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3

    # The channel order matters for these weights, so the RGB conversion is really applied.
    swapped = lazy(np.ascontiguousarray(image_bgr[:, :, ::-1]))["instances"]
    assert len(swapped) != len(a) or not torch.allclose(swapped.scores, a.scores)


def test_build_predictor_picks_the_right_class(weights, image_bgr):
    lazy = build_predictor(str(LAZY), weights=weights, device="cpu")
    yacs = build_predictor(str(YACS), weights=weights, device="cpu")
    assert isinstance(lazy, LazyPredictor)
    assert isinstance(yacs, DefaultPredictor)
    assert yacs.metadata.thing_classes == list(TOY_CLASSES)
    _check_instances(yacs(image_bgr)["instances"])


def test_lazy_predictor_input_errors(weights):
    p = LazyPredictor(str(LAZY), weights=weights, device="cpu")
    with pytest.raises(TypeError, match="numpy uint8 array of shape"):
        p(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"expects a \(H, W, 3\) BGR image, got shape \(64, 64\)"):
        p(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8 image.*float32"):
        p(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="needs a LazyConfig .py file"):
        LazyPredictor(str(YACS))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LazyPredictor(str(REPO / "configs" / "nope.py"))


def test_build_predictor_takes_a_loaded_config_and_leaves_it_alone(weights, image_bgr):
    for path, key, opts in [(LAZY, "model.roi_heads.box_predictor.test_score_thresh", ["{}=0.0"]),
                            (YACS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", ["{}", "0.0"])]:  # fmt: skip
        cfg = load_config(str(path))
        before = _get(cfg, key)
        p = build_predictor(cfg, weights=weights, device="cpu", opts=[o.format(key) for o in opts])
        assert _get(p.cfg, key) == 0.0 and _get(cfg, key) == before != 0.0
        _check_instances(p(image_bgr)["instances"])


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_api_misuse_gets_the_fix():
    with pytest.raises(FileNotFoundError, match=r"is a detector of the model zoo: use "
                                                r"mvit_det\.detection\.zoo\.get_detector\('mask_rcnn_mvitv2_t_3x'\)"):
        build_predictor("mask_rcnn_mvitv2_t_3x")
    with pytest.raises(TypeError, match="opts must be a list of strings, got 'train.max_iter=3'"):
        build_predictor(str(LAZY), weights="", opts="train.max_iter=3")
    with pytest.raises(TypeError, match="takes a LazyConfig .* not a MViTv2"):
        from mvit_det.models import MViTv2

        LazyPredictor(MViTv2("tiny"))
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        build_predictor(str(LAZY), weights="", device="tpu")
    if not torch.cuda.is_available():  # the same check with a GPU present: resolve_device's index test below
        with pytest.raises(ValueError, match="asks for a CUDA GPU, but torch sees none"):
            build_predictor(str(LAZY), weights="", device="cuda")


def test_resolve_device_counts_the_gpus(monkeypatch):
    from mvit_det.detection.predictor import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


def _demo(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_both_config_kinds_and_bad_inputs(weights, image_bgr, tmp_path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), image_bgr)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")

    out = tmp_path / "lazy"
    proc = _demo(["--config", str(LAZY), "--weights", weights, "--input", str(good), str(corrupt),
                  str(tmp_path / "missing.jpg"), "--output", str(out), "--confidence-threshold", "0.0"])  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"skipped {corrupt}" in proc.stderr and f"skipped {tmp_path / 'missing.jpg'}" in proc.stderr
    assert "2 of 3 inputs failed" in proc.stderr
    drawn = cv2.imread(str(out / "good.png"))
    assert drawn is not None and drawn.shape == (H, W, 3)
    assert not np.array_equal(drawn, image_bgr)  # detections were drawn (threshold 0)
    assert sorted(os.listdir(out)) == ["good.png"]

    out = tmp_path / "yacs"
    proc = _demo(["--config", str(YACS), "--weights", weights, "--input", str(good), "--output", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cv2.imread(str(out / "good.png")).shape == (H, W, 3)
