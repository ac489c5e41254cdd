"""tools/export_model.py and mvit_det.detection.export: whole T Mask R-CNN and T Cascade Mask R-CNN, from LazyConfig
and yacs configs, to ONNX and TorchScript, each matching PyTorch on real photographs with random weights.

Random weights are ``randomize_``d (spread-out scores), saved with ``save_checkpoint`` and loaded back through the
tool's ``--weights`` path. To keep the file fast on a small CPU the graphs are exported at 128x128 with 10 proposals
and 5 detections per image (score threshold 0, so that random weights give detections to compare); one PyTorch model
per config serves both formats. The export is traced on demo/cat.jpg and checked on demo/coffee.jpg as well, an image
of another size and aspect ratio that the trace never saw.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mvit_det.checkpoint import save_checkpoint
from mvit_det.detection.builders import build_model
from mvit_det.detection.run_config import load_config
from mvit_det.detection.predictor import dataset_metadata
from mvit_det.detection.export import (
    TOLERANCE,
    ExportCheckError,
    ExportedPredictor,
    PyTorchFixedSizePredictor,
    check_differences,
    compare_instances,
    export_detector,
    load_detector,
)
from benchmarks.references import randomize_

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import demo  # noqa: E402
import export_model  # noqa: E402

SIZE = 128
CONFIGS = {
    ("maskrcnn", "lazy"): "configs/mvitv2_t_maskrcnn.py",
    ("maskrcnn", "yacs"): "configs/yacs/mvitv2_t_maskrcnn.yaml",
    ("cascade", "lazy"): "configs/mvitv2_t_cascade.py",
    ("cascade", "yacs"): "configs/yacs/mvitv2_t_cascade.yaml",
}
LAZY_OPTS = {
    "maskrcnn": ["model.roi_heads.box_predictor.test_score_thresh=0.0",
                 "model.roi_heads.box_predictor.test_topk_per_image=5"],
    "cascade": ["model.roi_heads.box_predictors.2.test_score_thresh=0.0",
                "model.roi_heads.box_predictors.2.test_topk_per_image=5"],
}  # fmt: skip
OPTS = {
    (arch, "lazy"): ["model.proposal_generator.post_nms_topk=[1000,10]", *LAZY_OPTS[arch]] for arch in LAZY_OPTS
} | {
    (arch, "yacs"): ["MODEL.RPN.POST_NMS_TOPK_TEST", "10", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                     "TEST.DETECTIONS_PER_IMAGE", "5"] for arch in LAZY_OPTS
}  # fmt: skip


_REFERENCE: dict = {}  # (arch, kind) -> PyTorch's Instances on demo/coffee.jpg


def _bgr(name: str) -> np.ndarray:
    return cv2.imread(str(REPO / "demo" / name))


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """(arch, kind) -> (model, class names, weights file); each model built once. The LazyConfig model is the one
    whose random weights were saved; the yacs model loads that file through load_detector (as --weights does)."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("weights")

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            if kind == "lazy":
                torch.manual_seed(0)
                model = randomize_(build_model(load_config(str(REPO / CONFIGS[arch, kind]), OPTS[arch, kind])))
                weights = save_checkpoint(model, folder / f"{arch}.pth")
                cache[arch, kind] = (model.eval(), dataset_metadata("coco_2017_val").thing_classes, str(weights))
            else:
                weights = get(arch, "lazy")[2]
                model, classes = load_detector(str(REPO / CONFIGS[arch, kind]), weights, OPTS[arch, kind])
                cache[arch, kind] = (model, classes, weights)
        return cache[arch, kind]

    return get


def _assert_close(got, ref) -> dict:
    diffs = compare_instances(got, ref)
    assert diffs["detections"] > 0, "nothing to compare"
    assert diffs["detections_exported"] == diffs["detections"] and diffs["class_mismatches"] == 0, diffs
    for key, tol in TOLERANCE.items():
        assert diffs[key] <= tol, (key, diffs)
    return diffs


def _assert_contract(inst, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    assert inst.image_size == (h, w)
    boxes = inst.pred_boxes.tensor
    assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    assert inst.pred_masks.shape == (len(inst), h, w) and inst.pred_masks.dtype == torch.bool
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < 80)).all()
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["lazy", "yacs"])
@pytest.mark.parametrize("arch", ["maskrcnn", "cascade"])
def test_export_matches_pytorch(arch, kind, fmt, detectors, tmp_path):
    model, classes, _ = detectors(arch, kind)
    cat, coffee = _bgr("cat.jpg"), _bgr("coffee.jpg")
    path, diffs = export_detector(model, fmt, tmp_path, cat, (SIZE, SIZE), classes)
    # The export's own check, on the traced image.
    assert diffs["detections"] == diffs["detections_exported"] == 5
    assert all(diffs[k] <= tol for k, tol in TOLERANCE.items()), diffs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".json"])

    # ExportedPredictor needs only the folder (the .json beside the file), and generalises to another image size.
    exported = ExportedPredictor(tmp_path)
    assert exported.metadata.thing_classes == classes and len(classes) == 80
    if (arch, kind) not in _REFERENCE:  # one PyTorch run per model, shared by both formats
        _REFERENCE[arch, kind] = PyTorchFixedSizePredictor(model, (SIZE, SIZE), classes)(coffee)["instances"]
    got = exported(coffee)["instances"]
    _assert_contract(got, coffee)
    _assert_close(got, _REFERENCE[arch, kind])
    # Same result as on the traced image when the image comes as a one-element list (the demo's batched call).
    again = exported([cat])[0]["instances"]
    assert len(again) == 5 and again.image_size == cat.shape[:2]


def test_cli_export_then_demo(detectors, tmp_path, capsys):
    """The command line with a zoo name (its config, our random weights saved with save_checkpoint and read through
    --weights), then demo --exported on the result."""
    model, classes, weights = detectors("maskrcnn", "lazy")
    out = tmp_path / "exported"
    rc = export_model.main(["--model", "mask_rcnn_mvitv2_t_3x", "--weights", weights,
                            "--format", "torchscript", "--output", str(out), "--img-size", str(SIZE),
                            "--sample-image", str(REPO / "demo" / "coffee.jpg"),
                            "--opts", *OPTS["maskrcnn", "lazy"]])  # fmt: skip
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "largest differences to PyTorch" in stdout and "(5 detections)" in stdout
    meta = json.loads((out / "model.ts.json").read_text())
    assert meta["input"]["size_hw"] == [SIZE, SIZE] and meta["input"]["channel_order"] == "RGB"
    assert meta["outputs"][:4] == ["pred_boxes", "pred_classes", "pred_masks", "scores"]
    assert meta["weights"] == weights and meta["class_names"] == classes
    assert Path(meta["config"]).resolve() == (REPO / CONFIGS["maskrcnn", "lazy"]).resolve()

    cat = _bgr("cat.jpg")
    _assert_close(ExportedPredictor(out / "model.ts")(cat)["instances"],
                  PyTorchFixedSizePredictor(model, (SIZE, SIZE))(cat)["instances"])  # fmt: skip

    drawn = tmp_path / "drawn"
    rc = demo.main(["--exported", str(out / "model.ts"), "--input", str(REPO / "demo" / "cat.jpg"),
                    "--output", str(drawn), "--confidence-threshold", "0.0", "--no-progress"])  # fmt: skip
    assert rc == 0
    png = cv2.imread(str(drawn / "cat.png"))
    assert png is not None and png.shape == cat.shape
    assert (np.abs(png.astype(int) - cat.astype(int)).sum(2) > 30).mean() > 0.01  # detections were drawn


def test_check_refuses_an_empty_comparison_and_writes_nothing(detectors, tmp_path):
    model = detectors("maskrcnn", "lazy")[0]
    predictor = model.roi_heads.box_predictor
    old = predictor.test_score_thresh
    predictor.test_score_thresh = 1.0  # no detection on either side
    try:
        with pytest.raises(ExportCheckError, match="compared nothing.*test_score_thresh=0.0"):
            export_detector(model, "torchscript", tmp_path, _bgr("cat.jpg"), (SIZE, SIZE))
    finally:
        predictor.test_score_thresh = old
    assert list(tmp_path.iterdir()) == []


def test_check_reports_differences_beyond_tolerance(detectors):
    model = detectors("maskrcnn", "lazy")[0]
    cat = _bgr("cat.jpg")
    ref = PyTorchFixedSizePredictor(model, (SIZE, SIZE))(cat)["instances"]
    check_differences(compare_instances(ref, ref))  # identical: passes
    moved = ref[torch.arange(len(ref))]
    moved.pred_boxes.tensor[0, 0] += 0.05
    with pytest.raises(ExportCheckError, match=r"box corners differ by 5\.\d+e-02 px \(tolerance 0\.01\)"):
        check_differences(compare_instances(moved, ref))
    rescored = ref[torch.arange(len(ref))]
    rescored.scores = rescored.scores + 1e-3
    rescored.pred_masks = rescored.pred_masks.clone()
    rescored.pred_masks[0, :10, :] = ~rescored.pred_masks[0, :10, :]  # 10 rows of the image
    with pytest.raises(ExportCheckError, match=r"scores differ by 1\.00e-03.*a mask differs on 3\.3\de-02"):
        check_differences(compare_instances(rescored, ref))
    with pytest.raises(ExportCheckError, match="4 detections instead of PyTorch's 5"):
        check_differences(compare_instances(ref[:4], ref))


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    cfg = str(REPO / CONFIGS["maskrcnn", "lazy"])
    base = ["--format", "onnx", "--output", str(tmp_path / "out")]

    assert export_model.main(["--config", "configs/nope.py", "--weights", "w.pth", *base]) == 2
    assert "configs/nope.py does not exist" in capsys.readouterr().err
    assert export_model.main(["--config", cfg, "--weights", str(tmp_path / "missing.pth"), *base]) == 2
    assert "missing.pth not found" in capsys.readouterr().err
    assert export_model.main(["--config", cfg, *base]) == 2
    assert "No --weights given" in capsys.readouterr().err
    assert export_model.main(["--model", "mask_rcnn_mvitv2_q_9x", "--weights", "w.pth", *base]) == 2
    assert "mask_rcnn_mvitv2_q_9x" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert export_model.main(["--config", cfg, "--weights", "w.pth", "--format", "onnx", "--output", str(a_file)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert export_model.main(["--config", cfg, "--weights", "w.pth", *base, "--sample-image", str(a_file)]) == 2
    assert "cannot read --sample-image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_model.main(["--config", cfg, "--weights", "w.pth", "--format", "tensorrt", "--output", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_graph_size_must_fit_the_backbone(detectors, tmp_path, capsys):
    weights = detectors("maskrcnn", "lazy")[2]
    rc = export_model.main(["--config", str(REPO / CONFIGS["maskrcnn", "lazy"]), "--weights", weights,
                            "--format", "onnx", "--output", str(tmp_path / "out"), "--img-size", "100x130"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--img-size 100x130: each side must be a multiple of 32" in err, err
    assert "e.g. --img-size 96x128" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_exported_predictor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExportedPredictor(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="neither of model.onnx, model.ts"):
        ExportedPredictor(tmp_path)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"0123")
    with pytest.raises(FileNotFoundError, match=r"model.onnx.json is missing.*Copy it together with the model"):
        ExportedPredictor(onnx)
    meta = {"format": "onnx", "input": {"size_hw": [64, 64], "channel_order": "RGB"}, "outputs": [], "file_bytes": 9}
    (tmp_path / "model.onnx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="from different exports"):
        ExportedPredictor(tmp_path)
    (tmp_path / "model.onnx.json").write_text("{}")
    with pytest.raises(ValueError, match="not an export description"):
        ExportedPredictor(onnx)
