"""Robustness: tensors with NaN/Inf, and reduced precision on the CPU (the documented behaviour of each).

Wrong rank, channel count, size and dtype raise from ``MViTv2._check_input`` (tests/test_model.py::
test_bad_input_errors); the detection predictors refuse anything but (H, W, 3) uint8 arrays
(tests/test_predictor.py::test_lazy_predictor_input_errors).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mvit_det import inference_model
from mvit_det.models import MViTv2

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"


@pytest.fixture(scope="module")
def classifier(ckpt_fill_random) -> MViTv2:
    return ckpt_fill_random(MViTv2("tiny"), 7).eval()


@pytest.fixture(scope="module")
def trunk() -> MViTv2:
    return MViTv2("tiny", detection=True).eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(REPO / "demo" / "cat.jpg").convert("RGB"))


# -- NaN / Inf ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("detection", [False, True])
def test_non_finite_input_poisons_only_its_own_sample(value, detection, classifier, trunk):
    """Documented behaviour: no check in the forward pass (it would cost a pass over the input and, on a GPU, a
    synchronisation per call). One bad pixel makes every output of *its* sample NaN (attention mixes all tokens),
    and leaves the other samples of the batch exactly as they are alone."""
    model = trunk if detection else classifier
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[0, 1, 10, 20] = value
    with torch.no_grad():
        out, alone = model(bad), model(x[1:])
    outs = out.values() if detection else [out]
    alones = alone.values() if detection else [alone]
    for o, a in zip(outs, alones):
        assert torch.isnan(o[0]).all()
        torch.testing.assert_close(o[1:], a, rtol=1e-5, atol=1e-5)


def test_inference_model_refuses_nan_scores(classifier, photo):
    broken = MViTv2("tiny").eval()
    broken.load_state_dict(classifier.state_dict())
    with torch.no_grad():
        broken.blocks[4].mlp.fc1.weight[0, 0] = float("nan")  # as after a diverged training step
    with pytest.raises(FloatingPointError, match=r"^The model returned NaN/Inf scores for this image: 1 weight tensors "
                                                 r"contain NaN/Inf \(first: blocks\.4\.mlp\.fc1\.weight\); load a "
                                                 r"checkpoint saved before training diverged\.$"):
        inference_model(broken, photo)


# -- reduced precision on the CPU ----------------------------------------------------------------------------
def test_float16_model_on_cpu(classifier):
    """model.half() works on the CPU (slowly: most CPUs have no fp16 arithmetic) when the input is float16 too."""
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    half = MViTv2("tiny").eval()
    half.load_state_dict(classifier.state_dict())
    half.half()
    with torch.no_grad():
        ref, out = classifier(x), half(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())
    # A float32 input into the float16 model: an error that names both dtypes and the fix.
    with pytest.raises(TypeError, match=r"got a torch\.float32 input but its weights are torch\.float16\. Convert"):
        with torch.no_grad():
            half(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_input_dtype_other_than_the_weights_is_a_clear_error(classifier, dtype):
    with pytest.raises(TypeError, match=rf"got a {dtype} input but its weights are torch\.float32\. Convert the input"):
        classifier(torch.zeros(1, 3, 64, 64, dtype=dtype))


def test_empty_batch_is_a_clear_error(classifier):
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 64, 64\)\); pass at least one image"):
        classifier(torch.zeros(0, 3, 64, 64))


def test_inference_model_casts_the_image_to_the_model_dtype(classifier, photo):
    reduced_model = MViTv2("tiny").eval()
    reduced_model.load_state_dict(classifier.state_dict())
    reduced_model.to(torch.bfloat16)  # the same code path as .half(), at a usable speed on a CPU
    full, reduced = inference_model(classifier, photo), inference_model(reduced_model, photo)
    assert reduced["pred_label"] == full["pred_label"]
    assert abs(reduced["pred_score"] - full["pred_score"]) < 0.05


def test_bfloat16_autocast_is_the_supported_fast_path(classifier):
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = classifier(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = classifier(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float().argmax(1), ref.argmax(1))
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    pytest.importorskip("detectron2")
    from detectron2.config import LazyConfig, instantiate

    from mvit_det.detection.predictor import LazyPredictor

    torch.manual_seed(0)
    cfg = LazyConfig.load(str(TOY))
    cfg.model.roi_heads.box_predictor.test_topk_per_image = 5
    path = tmp_path_factory.mktemp("det") / "model_final.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return LazyPredictor(cfg, weights=str(path), device="cpu")


def test_detection_predictor_precision(predictor):
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    ref = predictor(image)["instances"]
    # bfloat16 autocast around the call works; boxes stay float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = predictor(image)["instances"]
    assert out.image_size == (120, 160) and 0 < len(out) <= 5
    assert out.pred_boxes.tensor.dtype == torch.float32 and torch.isfinite(out.pred_boxes.tensor).all()
    assert (out.scores.float() - ref.scores[: len(out)]).abs().max() < 0.05
    # model.half() is not supported by detectron2's detectors (d2#504): a clear error instead of a dtype clash.
    predictor.model.half()
    try:
        with pytest.raises(TypeError, match=r"^The predictor runs the detector in float32, but its weights are "
                                            r"torch\.float16 .* torch\.autocast\('cpu', dtype=torch\.bfloat16\)"):
            predictor(image)
    finally:
        predictor.model.float()
