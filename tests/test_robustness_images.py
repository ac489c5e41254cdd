"""Robustness: odd image files through the classification predictor, the detection predictor and the batch tools.

Each readable file has an expected RGB array computed here without ``load_image`` (numpy compositing, scaling,
rotation), and both predictors are checked on it: classification against an independent implementation of
the evaluation preprocessing, detection for a valid result in the coordinates of the upright image. Unreadable
files must raise ``ImageReadError`` naming the file, and the batch tools must skip and report them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvit_det import inference_model
from mvit_det.checkpoint import save_checkpoint
from mvit_det.data import ImageReadError, load_image
from mvit_det.models import MViTv2

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random RGB (noise upsampled), so that JPEG keeps it close and the model output varies with it."""
    small = np.random.default_rng(seed).integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _exif_rotated_jpeg(path: Path, rgb: np.ndarray) -> np.ndarray:
    """Store ``rgb`` with EXIF orientation 6 ("rotate 90 degrees clockwise to display"); return the upright image
    computed from the stored pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))  # the raw decode, without the EXIF rotation
    return np.ascontiguousarray(np.rot90(stored, k=-1))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict:
    """{name: (path, expected upright 8-bit RGB array or None if approximate)}, plus the unreadable files."""
    root = tmp_path_factory.mktemp("odd")
    files: dict[str, tuple[Path, np.ndarray]] = {}

    grey = _noise(90, 120, 1)[:, :, 0]
    Image.fromarray(grey, "L").save(root / "grey.png")
    files["grey"] = (root / "grey.png", np.repeat(grey[:, :, None], 3, axis=2))

    rgb, alpha = _noise(96, 80, 2), np.zeros((96, 80), np.uint8)
    alpha[20:70, 10:60] = 255  # binary alpha: the white compositing is exact
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(root / "rgba.png")
    files["rgba"] = (root / "rgba.png", np.where(alpha[:, :, None] == 255, rgb, 255).astype(np.uint8))

    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    index = np.random.default_rng(4).integers(0, 256, (70, 110), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.reshape(-1).tolist())
    pal.save(root / "palette.png")
    files["palette"] = (root / "palette.png", palette[index])

    sixteen = (np.random.default_rng(5).integers(0, 65536, (64, 64))).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "depth16.png")  # mode I;16
    assert Image.open(root / "depth16.png").mode in ("I;16", "I")
    grey16 = np.clip(np.rint(sixteen / 257.0), 0, 255).astype(np.uint8)
    files["16-bit"] = (root / "depth16.png", np.repeat(grey16[:, :, None], 3, axis=2))

    cmyk_src = _noise(80, 100, 6)
    Image.fromarray(cmyk_src).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    assert Image.open(root / "cmyk.jpg").mode == "CMYK"
    files["cmyk"] = (root / "cmyk.jpg", cmyk_src)  # lossy: compared with a tolerance

    files["exif"] = (root / "exif.jpg", _exif_rotated_jpeg(root / "exif.jpg", _noise(60, 100, 7)))
    assert Image.open(root / "exif.jpg").size == (100, 60)  # stored landscape, displayed portrait (60 x 100)

    for name, (h, w) in {"1x1": (1, 1), "16x16": (16, 16), "strip-10000x200": (200, 10000),
                         "strip-200x10000": (10000, 200)}.items():  # fmt: skip
        arr = _noise(h, w, h + w)
        Image.fromarray(arr).save(root / f"{name}.png")
        files[name] = (root / f"{name}.png", arr)

    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("these are notes, not a JPEG\n")
    return {"root": root, "files": files, "empty": root / "empty.jpg", "text": root / "notes.jpg"}


EXACT = ["grey", "rgba", "palette", "16-bit", "exif", "1x1", "16x16", "strip-10000x200", "strip-200x10000"]
READABLE = EXACT + ["cmyk"]


def test_readable_files_decode_to_the_expected_pixels(odd_images):
    for name in READABLE:
        path, expected = odd_images["files"][name]
        got = np.asarray(load_image(path))
        assert got.shape == expected.shape, name
        if name == "cmyk":  # JPEG in CMYK: close to the source, not equal
            assert np.abs(got.astype(int) - expected).mean() < 4, name
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)


def test_unreadable_files_raise_image_read_error(odd_images):
    with pytest.raises(ImageReadError, match=rf"^Cannot read image {odd_images['empty']}: the file is empty \(0 bytes\)\.$"):
        load_image(odd_images["empty"])
    with pytest.raises(ImageReadError, match=rf"^Cannot read image {odd_images['text']}: not a recognised image format"):
        load_image(odd_images["text"])


# -- classification ----------------------------------------------------------------------------------------
def reference_preprocess(rgb: np.ndarray) -> torch.Tensor:
    """The published evaluation pipeline written out independently: short side 256 (long side truncated),
    Pillow bicubic, centre crop 224 with offsets rounded half-to-even, (x - mean) / std."""
    im = Image.fromarray(rgb)
    w, h = im.size
    nw, nh = (256, int(256 * h / w)) if w < h else (int(256 * w / h), 256)
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = round((nw - 224) / 2), round((nh - 224) / 2)
    x = (np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) - MEAN) / STD
    return torch.from_numpy(x).permute(2, 0, 1)


@pytest.fixture(scope="module")
def classifier(ckpt_fill_random) -> MViTv2:
    return ckpt_fill_random(MViTv2("tiny"), 3).eval()


def test_classification_predictor(odd_images, classifier):
    names = READABLE
    results = {n: inference_model(classifier, odd_images["files"][n][0]) for n in names}
    with torch.no_grad():
        ref = classifier(torch.stack([reference_preprocess(odd_images["files"][n][1]) for n in names])).softmax(-1)
    for i, n in enumerate(names):
        scores = torch.from_numpy(results[n]["pred_scores"])
        if n == "cmyk":  # the source pixels, not the decoded JPEG, are the reference here
            assert (scores - ref[i]).abs().max() < 0.05, n
        else:
            torch.testing.assert_close(scores, ref[i], rtol=1e-4, atol=1e-6, msg=n)
            assert results[n]["pred_label"] == int(ref[i].argmax()), n
    # The orientation matters: the stored (unrotated) pixels give another result.
    with Image.open(odd_images["files"]["exif"][0]) as im:
        stored = np.asarray(im.convert("RGB"))
    assert not np.allclose(inference_model(classifier, stored)["pred_scores"], results["exif"]["pred_scores"])

    for bad, reason in [(odd_images["empty"], "the file is empty"), (odd_images["text"], "not a recognised image")]:
        with pytest.raises(ImageReadError, match=rf"Cannot read image {bad}: {reason}"):
            inference_model(classifier, bad)


def test_classify_tool_skips_and_reports(odd_images, classifier, tmp_path, capsys):
    weights = save_checkpoint(classifier, tmp_path / "t.pth")
    from tools import classify as tool
    files = odd_images["files"]
    inputs = [files["grey"][0], odd_images["empty"], files["exif"][0], odd_images["text"], files["1x1"][0]]
    code = tool.main([*map(str, inputs), "--weights", str(weights), "--topk", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"error: Cannot read image {odd_images['empty']}: the file is empty (0 bytes)." in err
    assert f"error: Cannot read image {odd_images['text']}: not a recognised image format" in err
    assert "2 of 5 images could not be read." in err
    for name in ["grey", "exif", "1x1"]:
        line = next(i for i, s in enumerate(out.splitlines()) if s.startswith(str(files[name][0])))
        top = int(out.splitlines()[line + 2].split()[1])
        assert top == inference_model(classifier, files[name][0])["pred_label"], name


def test_decompression_bomb_and_extreme_strip_in_a_batch(classifier, tmp_path, capsys):
    """A 48 KB-class PNG of 20000x20000 is reported and skipped; a 1x100000 strip is classified with bounded work."""
    Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png", optimize=True)
    Image.fromarray(np.full((1, 100_000, 3), 200, np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageReadError, match=r"bomb\.png: Image size \(400000000 pixels\) exceeds limit .*MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "bomb.png")
    # The eval transform resizes only the band its centre crop keeps: at most 8 x 256 pixels long, not 25.6 M.
    from mvit_det.classification.transforms import EvalTransform

    t = EvalTransform()
    assert max(t.resize(load_image(tmp_path / "strip.png")).size) <= t.MAX_ASPECT * t.resize_size
    weights = save_checkpoint(classifier, tmp_path / "t.pth")
    from tools import classify as tool

    files = [tmp_path / "bomb.png", tmp_path / "strip.png", tmp_path / "ok.png"]
    code = tool.main([*map(str, files), "--weights", str(weights), "--topk", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and "could be decompression bomb" in err and "1 of 3 images could not be read." in err
    assert str(tmp_path / "strip.png") in out and str(tmp_path / "ok.png") in out


def test_cls_eval_skips_and_lists_unreadable_files(odd_images, classifier, tmp_path, capsys):
    root = tmp_path / "val"
    for i, name in enumerate(["grey", "rgba", "palette", "16-bit", "cmyk", "exif", "1x1", "strip-10000x200"]):
        src = odd_images["files"][name][0]
        dst = root / ("n0000000" + str(i % 2)) / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    for bad in (odd_images["empty"], odd_images["text"]):
        (root / "n00000001" / bad.name).write_bytes(bad.read_bytes())
    weights = save_checkpoint(classifier, tmp_path / "t.pth")
    from tools import cls_eval as tool
    out_json = tmp_path / "r.json"
    code = tool.main(["mvitv2-tiny_3rdparty_in1k", str(weights), "--data", str(root), "--workers", "0",
                      "--no-progress", "--out", str(out_json)])  # fmt: skip
    capsys.readouterr()
    assert code == 0
    r = json.loads(out_json.read_text())
    assert (r["images"], r["evaluated"], r["skipped"]) == (10, 8, 2)
    reasons = {Path(s["path"]).name: s["reason"] for s in r["skipped_files"]}
    assert set(reasons) == {"empty.jpg", "notes.jpg"}
    assert "the file is empty (0 bytes)" in reasons["empty.jpg"]
    assert "not a recognised image format" in reasons["notes.jpg"]


# -- detection ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detection_weights(tmp_path_factory) -> str:
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(TOY)).model)
    path = tmp_path_factory.mktemp("det") / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def predictor(detection_weights):
    pytest.importorskip("detectron2")
    from detectron2.config import LazyConfig

    from mvit_det.detection.predictor import LazyPredictor

    cfg = LazyConfig.load(str(TOY))
    cfg.model.roi_heads.box_predictor.test_topk_per_image = 5  # masks are pasted at full size: keep them few
    return LazyPredictor(cfg, weights=detection_weights, device="cpu")


def _check_detections(inst, h: int, w: int) -> None:
    assert inst.image_size == (h, w)
    assert 0 < len(inst) <= 5
    boxes = inst.pred_boxes.tensor
    assert torch.isfinite(boxes).all() and torch.isfinite(inst.scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert inst.pred_masks.shape == (len(inst), h, w)


@pytest.mark.parametrize("name", READABLE)
def test_detection_predictor(name, odd_images, predictor):
    path, expected = odd_images["files"][name]
    rgb = np.asarray(load_image(path))  # the file -> upright RGB step of tools/demo.py
    inst = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"]
    _check_detections(inst, *expected.shape[:2])


def test_detection_predictor_extreme_aspect_ratio(predictor, detection_weights):
    """1 x 10000 pixels cannot be resized to the test scale (its short side would become 0 pixels): both the
    LazyConfig predictor and the yacs one (build_predictor's checked DefaultPredictor) say so."""
    from mvit_det.detection.predictor import build_predictor

    yacs = build_predictor(str(REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml"), weights=detection_weights,
                           device="cpu")  # fmt: skip
    from detectron2.config import LazyConfig

    (resize,) = LazyConfig.load(str(REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py")).dataloader.test.mapper.augmentations
    short, long = resize.short_edge_length, resize.max_size  # the toy recipe's test resize (yacs twin: the same)
    for p in (predictor, yacs):
        with pytest.raises(ValueError, match=r"^Cannot run the detector on an image of 1x10000 pixels: with the test "
                                             rf"resize \(short side {short}, long side at most {long}\) its shorter side would be "
                                             r"resized to 0 pixels\. Crop it, or cut it into tiles, to an aspect ratio of "
                                             r"at most 640:1\.$"):  # fmt: skip
            p(np.zeros((1, 10000, 3), np.uint8))


def test_demo_skips_and_reports(odd_images, detection_weights, tmp_path):
    files = odd_images["files"]
    names = ["grey", "rgba", "palette", "16-bit", "cmyk", "exif", "1x1", "16x16", "strip-10000x200"]
    inputs = [str(files[n][0]) for n in names] + [str(odd_images["empty"]), str(odd_images["text"])]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--config", str(TOY), "--weights", detection_weights,
         "--input", *inputs, "--output", str(out), "--device", "cpu",
         "--opts", "model.roi_heads.box_predictor.test_topk_per_image=5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"skipped {odd_images['empty']}: Cannot read image {odd_images['empty']}: the file is empty (0 bytes)." in proc.stderr
    assert f"skipped {odd_images['text']}: Cannot read image {odd_images['text']}: not a recognised image format" in proc.stderr
    assert f"2 of {len(inputs)} inputs failed" in proc.stderr
    for n in names:
        drawn = np.asarray(Image.open(out / (files[n][0].stem + ".png")))
        assert drawn.shape == files[n][1].shape, n  # drawn on the upright image
