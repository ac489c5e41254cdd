"""tools/demo.py on folders, globs and video: COCO JSON read back with pycocotools, a video written by OpenCV read
back frame by frame, bad files skipped, output and camera problems reported before the model is built.

The demo runs in this process (``demo.main(argv)``) to avoid re-importing torch and detectron2 per run; the toy
Mask R-CNN (MViTv2-T, short side 112 at test) with seeded random weights keeps it fast.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from mvit_det.data.toy import TOY_CLASSES
from mvit_det.detection.predictor import build_predictor
from mvit_det.detection.runner import RunError, drawn_output_paths, expand_inputs, open_camera

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py")
TOPK = "model.roi_heads.box_predictor.test_topk_per_image=8"


demo = importlib.import_module("tools.demo")


@pytest.fixture(scope="module")
def predictor(toy_detector_weights):
    return build_predictor(TOY, weights=toy_detector_weights, device="cpu", opts=[TOPK])


def _same_detections(anns: list[dict], instances) -> None:
    """The JSON annotations of one image are exactly ``instances`` (xyxy -> xywh, RLE masks)."""
    assert len(anns) == len(instances) > 0
    anns = sorted(anns, key=lambda a: -a["score"])
    boxes = instances.pred_boxes.tensor.numpy()
    for a, box, score, cls, mask in zip(anns, boxes, instances.scores.tolist(), instances.pred_classes.tolist(),
                                        instances.pred_masks.numpy()):  # fmt: skip
        x0, y0, x1, y1 = box
        np.testing.assert_allclose(a["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
        assert a["score"] == pytest.approx(score, abs=1e-6)
        assert a["category_id"] == cls + 1  # toy metadata has no dataset ids: index + 1
        decoded = mask_util.decode(a["segmentation"])
        assert np.array_equal(decoded.astype(bool), mask)
        assert a["area"] == int(mask.sum()) and a["iscrowd"] == 0


def test_folder_glob_json_pngs_and_bad_files(tmp_path, toy_detector_weights, predictor, capsys, toy_bgr):
    folder, other = tmp_path / "photos", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    images = {folder / "a.png": toy_bgr(1, 120, 160), folder / "b.jpg": toy_bgr(2, 96, 150),
              other / "c.png": toy_bgr(3, 120, 160)}  # fmt: skip
    for path, bgr in images.items():
        assert cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert cv2.imwrite(str(folder / "strip.png"), np.zeros((1, 1000, 3), np.uint8))  # too elongated for the test resize
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # a few KB on disk, 400 Mpx: PIL's decompression-bomb limit
    missing = tmp_path / "missing.jpg"
    out_json, out_dir = tmp_path / "res" / "out.json", tmp_path / "drawn"

    rc = demo.main(["--config", TOY, "--weights", toy_detector_weights, "--input", str(folder), str(other / "*.png"), str(bomb),
                    str(missing), "--json", str(out_json), "--output", str(out_dir), "--batch-size", "2",
                    "--device", "cpu", "--confidence-threshold", "0", "--no-progress", "--opts", TOPK])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert f"skipped {folder / 'corrupt.jpg'}: Cannot read image" in err
    assert f"skipped {folder / 'strip.png'}: Cannot run the detector on an image of 1x1000 pixels" in err
    assert f"skipped {bomb}: Cannot read image {bomb}:" in err and "decompression bomb" in err
    assert f"skipped {missing}:" in err
    assert "4 of 7 inputs failed" in err

    coco = COCO(str(out_json))  # a valid COCO file for pycocotools
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
    order = [folder / "a.png", folder / "b.jpg", other / "c.png"]
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == [str(p) for p in order]
    for image_id, path in zip(sorted(coco.imgs), order):
        bgr = cv2.imread(str(path))
        info = coco.imgs[image_id]
        assert (info["height"], info["width"]) == bgr.shape[:2]
        # The file holds exactly what the predictor returns for that image (batching changes nothing).
        _same_detections(coco.imgToAnns[image_id], predictor(bgr)["instances"])
        drawn = cv2.imread(str(out_dir / (path.stem + ".png")))
        assert drawn.shape == bgr.shape and not np.array_equal(drawn, bgr)
    assert sorted(os.listdir(out_dir)) == ["a.png", "b.png", "c.png"]
    assert sorted(os.listdir(out_json.parent)) == ["out.json"]  # no temporary file left


def test_output_problems_fail_before_the_model_is_built(tmp_path, monkeypatch, capsys, toy_bgr):
    def no_model(args):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(demo, "build", no_model)
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), toy_bgr(0, 64, 64))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert demo.main(["--config", TOY, "--input", str(image), "--output", str(a_file)]) == 2
    assert f"--output {a_file} is a file, but images are written into a folder" in capsys.readouterr().err
    assert demo.main(["--config", TOY, "--input", str(image), "--json", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert demo.main(["--config", TOY, "--video-input", str(tmp_path / "none.mp4"), "--output", str(tmp_path / "o.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert demo.main(["--config", TOY, "--video-input", str(image), "--output", str(tmp_path / "o.gif")]) == 2
    assert "unsupported extension; use one of .mp4" in capsys.readouterr().err
    assert demo.main(["--config", TOY, "--input", str(tmp_path / "typo.jpg"), "--json", str(tmp_path / "o.json")]) == 2
    assert f"no input images found: {tmp_path / 'typo.jpg'} does not exist." in capsys.readouterr().err
    # drawings that would replace an input (the folder is its own --output)
    before = image.read_bytes()
    assert demo.main(["--config", TOY, "--input", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert f"the drawing of {image} would replace the input {image}" in capsys.readouterr().err
    jpg = tmp_path / "x.jpg"
    cv2.imwrite(str(jpg), toy_bgr(1, 64, 64))
    assert demo.main(["--config", TOY, "--input", str(jpg), str(image), "--output", str(tmp_path)]) == 2
    assert f"the drawing of {jpg} would replace the input {image}" in capsys.readouterr().err
    video = tmp_path / "v.mp4"
    video.write_bytes(b"a video")
    assert demo.main(["--config", TOY, "--video-input", str(video), "--output", str(tmp_path / "." / "v.mp4")]) == 2
    assert "is the input file; give another file name" in capsys.readouterr().err
    assert image.read_bytes() == before and video.read_bytes() == b"a video"
    with pytest.raises(SystemExit) as e:
        demo.main(["--model", "mask_rcnn_mvitv2_t", "--input", str(image), "--json", str(tmp_path / "o.json")])
    assert e.value.code == 2
    assert "Did you mean 'mask_rcnn_mvitv2_t_3x'" in capsys.readouterr().err


def test_video_round_trip(tmp_path, toy_detector_weights, predictor, capsys):
    src, dst, frames_json = tmp_path / "in.avi", tmp_path / "out" / "drawn.avi", tmp_path / "frames.json"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (128, 96))
    assert writer.isOpened()
    for i in range(7):
        frame = np.full((96, 128, 3), 40, np.uint8)
        cv2.circle(frame, (30 + 10 * i, 48), 18, (0, 200, 0), -1)
        writer.write(frame)
    writer.release()

    rc = demo.main(["--config", TOY, "--weights", toy_detector_weights, "--video-input", str(src), "--output", str(dst),
                    "--json", str(frames_json), "--batch-size", "3", "--device", "cpu", "--no-progress",
                    "--confidence-threshold", "0", "--opts", TOPK])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cap = cv2.VideoCapture(str(dst))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    read = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        read.append(frame)
    cap.release()
    assert len(read) == 7 and all(f.shape == (96, 128, 3) for f in read)

    coco = COCO(str(frames_json))
    assert [coco.imgs[i]["frame"] for i in sorted(coco.imgs)] == list(range(7))
    # Frame 4 as decoded by OpenCV here gives the detections stored for it.
    cap = cv2.VideoCapture(str(src))
    for _ in range(5):
        ok, frame = cap.read()
    cap.release()
    _same_detections(coco.imgToAnns[sorted(coco.imgs)[4]], predictor(frame)["instances"])
    assert not np.array_equal(read[4], frame)  # the detections were drawn


def test_webcam_errors_are_clear(monkeypatch, capsys):
    with pytest.raises(RunError, match=r"^No camera at index 57: OpenCV could not open it"):
        open_camera(57)
    monkeypatch.setattr(demo, "build", lambda args: pytest.fail("the model must not be built"))
    assert demo.main(["--config", TOY, "--webcam", "57"]) == 2
    err = capsys.readouterr().err
    # headless OpenCV (as installed here) has no window; with a GUI build the missing camera is reported
    assert "has no window support" in err or "No camera at index 57" in err


@pytest.mark.parametrize("extra, named", [
    (["--weights", "w.pth"], "--weights"), (["--tta"], "--tta"), (["--precision", "bf16"], "--precision"),
    (["--device", "cuda"], "--device"), (["--opts", "a.b=1"], "--opts"),
])  # fmt: skip
def test_exported_graph_options_are_refused(extra, named, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--exported", "model.onnx", "--input", "x.jpg", "--json", "o.json", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{named} cannot change an --exported graph" in err


def test_drawn_output_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for p in (a / "x.jpg", b / "x.jpg", a / "y.png"):
        p.write_bytes(b"")
    inputs = [str(a / "x.jpg"), str(b / "x.jpg"), str(a / "y.png")]
    out = drawn_output_paths(inputs, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in out.values()] == ["x.png", "x_1.png", "y.png"]
    assert drawn_output_paths(inputs[:2], str(a))[inputs[1]] == str(a / "x_1.png")  # beside the inputs: allowed
    with pytest.raises(RunError, match="would replace the input"):
        drawn_output_paths(inputs, str(a))


def test_expand_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    (tmp_path / "e1.png").write_bytes(b"")
    (tmp_path / "e2.png").write_bytes(b"")
    got = expand_inputs([str(tmp_path / "d"), str(tmp_path / "e*.png"), str(tmp_path / "gone.png")])
    assert got == [str(tmp_path / "d" / "a.JPG"), str(tmp_path / "d" / "b.png"), str(tmp_path / "e1.png"),
                   str(tmp_path / "e2.png"), str(tmp_path / "gone.png")]  # fmt: skip
    assert json.loads(json.dumps(got)) == got


def test_webcam_loop_draws_and_quits_on_q(monkeypatch, predictor, toy_bgr):
    """run_webcam with a stand-in camera and window: every frame is detected and shown until 'q' is pressed, then
    the camera is released and the window closed."""
    from mvit_det.detection import runner

    class Camera:
        released = False

        def __init__(self, frames):
            self.frames = list(frames)

        def read(self):
            return (True, self.frames.pop(0)) if self.frames else (False, None)

        def release(self):
            self.released = True

    shown, keys = [], iter([-1, ord("q"), -1])
    monkeypatch.setattr(cv2, "imshow", lambda name, img: shown.append(img))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: next(keys))
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: shown.append("closed"))
    frames = [toy_bgr(s, 96, 128) for s in (7, 8, 9)]
    camera = Camera(frames)
    assert runner.run_webcam(predictor, camera, threshold=0.0) == 2  # 'q' after the second frame
    assert camera.released and shown[-1] == "closed"
    assert [img.shape for img in shown[:2]] == [(96, 128, 3)] * 2
    assert not np.array_equal(shown[0], frames[0])  # detections drawn
