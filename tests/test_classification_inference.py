"""Classification preprocessing (parity with mmpretrain's pipeline), inference_model, and tools/classify.py."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from mvit_det import get_model, inference_model
from mvit_det.classification import (
    CROP_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    imagenet_classes,
    preprocess,
)
from mvit_det.data import ImageReadError

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "mvitv2-tiny_3rdparty_in1k"


def _gradient(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour ramps plus noise, so both the resampling and the crop position matter."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(-20, 21, (h, w))
    img = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1), (x + 2 * y) % 256], axis=-1)
    return np.clip(img + noise[..., None], 0, 255).astype(np.uint8)


def _resized(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))


# (name, array, suffix): squares, both orientations, truncation of the long side (451x300 -> 384.85),
# half-pixel crop offsets (long side 257 -> offset 16.5, 259 -> 17.5), extreme ratios, upsampling, grey,
# and one JPEG (decoded by OpenCV in the reference, by Pillow here).
def _cases():
    return [
        ("astronaut_512x512", skdata.astronaut(), ".png"),
        ("chelsea_451x300", skdata.chelsea(), ".png"),
        ("coffee_333x500", _resized(skdata.coffee(), 333, 500), ".png"),
        ("coffee_500x333", skdata.coffee()[30:363, 50:550], ".png"),
        ("astronaut_257x1000", _resized(skdata.astronaut(), 257, 1000), ".png"),
        ("gradient_1000x257", _gradient(1000, 257, 0), ".png"),
        ("gradient_257x256", _gradient(257, 256, 1), ".png"),
        ("gradient_256x259", _gradient(256, 259, 2), ".png"),
        ("gradient_150x101", _gradient(150, 101, 3), ".png"),
        ("camera_grey_300x200", skdata.camera()[100:300, 50:350], ".png"),
        ("rocket_640x427", skdata.rocket(), ".jpg"),
    ]


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("preprocess")
    paths = []
    for name, arr, suffix in _cases():
        path = folder / f"{name}{suffix}"
        Image.fromarray(arr).save(path, **({"quality": 90} if suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def _mmpretrain_reference(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The seed config's test_pipeline + data preprocessor: (uint8 BGR crop, normalised RGB (3, 224, 224))."""
    from mmpretrain.datasets.transforms import CenterCrop, LoadImageFromFile, PackInputs, ResizeEdge
    from mmpretrain.models.utils.data_preprocessor import ClsDataPreprocessor

    results = {"img_path": str(path)}
    for t in (
        LoadImageFromFile(),
        ResizeEdge(scale=256, edge="short", backend="pillow", interpolation="bicubic"),
        CenterCrop(crop_size=224),
    ):
        results = t(results)
    crop_bgr = results["img"].copy()
    packed = PackInputs()(results)
    dp = ClsDataPreprocessor(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), to_rgb=True)
    normalised = dp({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, False)["inputs"][0]
    return crop_bgr, normalised


def test_preprocess_matches_mmpretrain(case_files):
    transform = EvalTransform()
    one_level = 1.0 / min(IMAGENET_STD) + 1e-5  # one grey level after normalisation
    for path in case_files:
        ref_bgr, ref_norm = _mmpretrain_reference(path)
        ref_rgb = ref_bgr[..., ::-1]  # OpenCV loads BGR
        ours = transform.crop_uint8(path)
        assert ours.shape == ref_rgb.shape == (CROP_SIZE, CROP_SIZE, 3), path.name
        diff = np.abs(ours.astype(np.int64) - ref_rgb.astype(np.int64))
        assert diff.max() <= 1, f"{path.name}: max crop difference {diff.max()}"

        tensor = preprocess(path)
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, CROP_SIZE, CROP_SIZE)
        assert (tensor - ref_norm).abs().max().item() <= one_level, path.name
        # The normalisation alone, applied to the reference crop, is the reference's to float precision.
        torch.testing.assert_close(transform.normalize(ref_rgb), ref_norm, rtol=0, atol=1e-5)


def test_a_shifted_crop_would_be_caught(case_files):
    # Guard that the parity test can fail: moving the crop by one pixel breaks it on a textured image.
    transform = EvalTransform()
    path = next(p for p in case_files if p.name.startswith("astronaut_512"))
    ref_rgb = _mmpretrain_reference(path)[0][..., ::-1].astype(np.int64)
    resized = np.asarray(transform.resize(Image.open(path).convert("RGB"))).astype(np.int64)
    shifted = resized[16:240, 17:241]
    assert np.abs(shifted - ref_rgb).max() > 1


def test_resize_and_crop_geometry():
    transform = EvalTransform()
    # long side truncated: 256 * 451 / 300 = 384.85 -> 384
    assert transform.resize(Image.new("RGB", (451, 300))).size == (384, 256)
    assert transform.resize(Image.new("RGB", (300, 451))).size == (256, 384)
    # half-pixel offsets round half to even: (257 - 224) / 2 = 16.5 -> 16, (259 - 224) / 2 = 17.5 -> 18
    ramp = np.tile(np.arange(259, dtype=np.uint8), (224, 1))
    for width, first in ((257, 16), (259, 18)):
        crop = np.asarray(transform.center_crop(Image.fromarray(ramp[:, :width]).convert("RGB")))
        assert crop.shape == (224, 224, 3) and crop[0, 0, 0] == first


def test_eval_transform_in_a_dataloader(case_files, tmp_path):
    from torchvision.datasets import ImageFolder

    for cls, src in (("a", case_files[0]), ("b", case_files[2])):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / src.name).write_bytes(src.read_bytes())
    loader = torch.utils.data.DataLoader(ImageFolder(tmp_path, transform=EvalTransform()), batch_size=2)
    images, labels = next(iter(loader))
    assert tuple(images.shape) == (2, 3, CROP_SIZE, CROP_SIZE) and labels.tolist() == [0, 1]
    torch.testing.assert_close(images[1], preprocess(case_files[2]), rtol=0, atol=0)


# -- inference_model -----------------------------------------------------------------------------------
def _peaky(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights with a scaled-up head, so the softmax is far from uniform."""
    with torch.no_grad():
        model.head.fc.weight.mul_(40.0)
        model.head.fc.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def model_1k():
    torch.manual_seed(0)
    return _peaky(get_model(MODEL_NAME))


@pytest.fixture(scope="module")
def photo(case_files) -> Path:
    return next(p for p in case_files if p.suffix == ".jpg")


def test_path_pil_and_numpy_agree(model_1k, photo):
    by_path = inference_model(model_1k, photo)
    by_pil = inference_model(model_1k, Image.open(photo))
    by_array = inference_model(model_1k, np.asarray(Image.open(photo).convert("RGB")))
    for other in (by_pil, by_array):
        np.testing.assert_array_equal(other["pred_scores"], by_path["pred_scores"])
        assert other["topk"] == by_path["topk"]


def test_result_matches_the_model(model_1k, photo):
    result = inference_model(model_1k, photo)
    with torch.no_grad():
        logits = model_1k(preprocess(photo).unsqueeze(0))[0]
    probs = logits.softmax(-1).numpy()

    scores = result["pred_scores"]
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (1000,)
    assert abs(float(scores.sum()) - 1.0) < 1e-5
    np.testing.assert_allclose(scores, probs, rtol=0, atol=1e-6)
    label = int(logits.argmax())
    assert result["pred_label"] == label and isinstance(result["pred_label"], int)
    assert isinstance(result["pred_score"], float) and result["pred_score"] == pytest.approx(float(probs[label]))
    assert result["pred_score"] > 5 / 1000  # the scaled head makes this a real choice, not a tie
    # 1000 classes -> ImageNet names, in torchvision's order
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert result["pred_class"] == imagenet_classes()[label] == _IMAGENET_CATEGORIES[label]
    top = result["topk"]
    assert len(top) == 5 and top[0] == (label, result["pred_score"], result["pred_class"])
    assert [t[0] for t in top] == np.argsort(-probs)[:5].tolist()
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_custom_classes_and_topk(photo):
    torch.manual_seed(1)
    model = _peaky(get_model(MODEL_NAME, num_classes=10))
    model.train()
    names = [f"thing{i}" for i in range(10)]
    result = inference_model(model, photo, classes=names, topk=50)
    assert model.training  # the caller's mode is restored
    assert result["pred_scores"].shape == (10,)
    assert result["pred_class"] == names[result["pred_label"]]
    assert len(result["topk"]) == 10 and sorted(t[0] for t in result["topk"]) == list(range(10))
    assert [t[2] for t in result["topk"]] == [names[t[0]] for t in result["topk"]]

    plain = inference_model(model, photo, topk=1, device="cpu")
    assert plain["pred_class"] == str(plain["pred_label"]) and len(plain["topk"]) == 1
    np.testing.assert_array_equal(plain["pred_scores"], result["pred_scores"])  # eval mode both times


def test_inference_errors(model_1k, photo, tmp_path):
    with pytest.raises(ValueError, match=r"classes must list one name per model output \(1000\), got 3 names\."):
        inference_model(model_1k, photo, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"topk must be a positive integer, got 0\."):
        inference_model(model_1k, photo, topk=0)
    with pytest.raises(ValueError, match="This MViTv2 has no classifier"):
        inference_model(get_model(MODEL_NAME, num_classes=0), photo)
    with pytest.raises(TypeError, match=r"model must be a model name \(see list_models\(\)\) or an MViTv2"):
        inference_model(torch.nn.Linear(2, 2), photo)
    with pytest.raises(ValueError, match="Unknown model 'mvitv2-tiny'"):  # refused before any download
        inference_model("mvitv2-tiny", photo)
    with pytest.raises(ImageReadError, match="no such file"):
        inference_model(model_1k, tmp_path / "missing.jpg")


# -- tools/classify.py ---------------------------------------------------------------------------------
def _offline_env(tmp_path: Path) -> dict[str, str]:
    """No weight cache, and every download refused at once (a closed local port as proxy)."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), PYTHONPATH=str(REPO))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[var] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env


@pytest.mark.slow
def test_classify_cli_offline_falls_back_to_random_weights(photo, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "classify.py"), str(photo), "--topk", "3", "--device", "cpu"],
        env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Could not load the published weights of mvitv2-tiny_3rdparty_in1k:" in proc.stderr
    assert "WARNING: continuing with RANDOM weights for mvitv2-tiny_3rdparty_in1k." in proc.stdout
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(str(photo)))
    assert "[RANDOM weights: meaningless]" in lines[start]
    assert lines[start + 1].split() == ["rank", "label", "score", "class"]
    rows = [line.split(maxsplit=3) for line in lines[start + 2 : start + 5]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert all(r[3] in imagenet_classes() and 0 <= float(r[2]) <= 1 for r in rows)
    assert not [p for p in (tmp_path / "torch_home").rglob("*") if p.is_file()]  # nothing cached or half-written


@pytest.fixture
def classify_tool(tmp_path, monkeypatch):
    for var, value in _offline_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return importlib.reload(importlib.import_module("tools.classify"))  # fresh, after the environment above


def test_classify_cli_weights_file_and_a_bad_image(classify_tool, model_1k, photo, tmp_path, capsys):
    weights = tmp_path / "peaky.pth"
    torch.save(model_1k.state_dict(), weights)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert classify_tool.main([str(bad), str(photo), "--weights", str(weights), "--topk", "3", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert f"error: Cannot read image {bad}: not a recognised image format" in err
    assert "1 of 2 images could not be read." in err
    assert "RANDOM" not in out + err  # the given weights were used
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(str(photo)))  # the good image still runs
    printed = [int(line.split()[1]) for line in lines[start + 2 : start + 5]]
    assert printed == [label for label, _, _ in inference_model(model_1k, photo, topk=3)["topk"]]


def test_classify_cli_bad_weights_exits_2(classify_tool, photo, tmp_path, capsys):
    weights = tmp_path / "broken.pth"
    weights.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as info:
        classify_tool.main([str(photo), "--weights", str(weights), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: cannot load --weights {weights} into mvitv2-tiny_3rdparty_in1k:" in err
    assert "RANDOM" not in err


def test_classify_cli_without_images_or_demo(classify_tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(classify_tool, "DEMO_DIR", tmp_path / "no_demo")
    with pytest.raises(SystemExit) as info:
        classify_tool.main([])
    assert info.value.code == 2
    assert f"no images given and no demo images found in {tmp_path / 'no_demo'}; pass image paths." in (
        capsys.readouterr().err
    )
