"""The main job (``make demo``) chains the two tasks as the COCO recipe chains ImageNet and COCO: a digits classifier
trained by ``mvit_det.classification.train`` initialises the detector's trunk through ``train.init_checkpoint``.

The full job takes minutes; here one pre-training epoch and one detector iteration show the chain works: the
detector reads the classifier's checkpoint as an ImageNet MViTv2 checkpoint, and a rerun reuses the finished
pre-training instead of training again.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("detectron2")

from tools import main_job  # noqa: E402


def test_pretrained_trunk_initialises_the_detector(tmp_path, monkeypatch):
    monkeypatch.setenv("MVIT_DET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "run"
    # One iteration cannot raise AP, so the job may report failure (exit 1); what is checked is the chain.
    rc = main_job.main(["--output-dir", str(out), "--pretrain-epochs", "1", "--iters", "1", "--num-vis", "1"])
    assert rc in (0, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"].startswith("MViTv2-T trunk from 1 epochs of digits classification")
    assert summary["pretrain_s"] > 0
    weights = out / "pretrain" / "train" / "model_final.pth"
    assert weights.is_file()
    log = (out / "log.txt").read_text()
    assert f"Read {weights} as an ImageNet MViTv2 checkpoint (mvit-det format)" in log
    assert len(summary["files"]["visualisations"]) == 1

    # A rerun finds the finished pre-training: same result, no epoch trained again.
    first = json.loads((out / "pretrain" / "train" / "metrics.json").read_text())
    again = main_job.pretrain_trunk(str(out / "pretrain"), epochs=1)
    assert again["epoch"] == 1 and again["val_top1"] == first[-1]["val_top1"]
    assert json.loads((out / "pretrain" / "train" / "metrics.json").read_text()) == first


def test_overrides_name_the_pretrained_trunk_and_the_user_wins():
    args = main_job.parse_args(["--output-dir", "out", "--iters", "7", "train.init_checkpoint=mine.pth"])
    opts = main_job.config_overrides(args, "out/pretrain")
    assert opts[:3] == ["train.output_dir=out", "train.init_checkpoint=out/pretrain/train/model_final.pth",
                        "model.backbone.bottom_up.pretrain_img_size=32"]
    assert opts[-2:] == ["train.max_iter=7", "train.init_checkpoint=mine.pth"]  # applied in order: the user's last

    scratch = main_job.config_overrides(main_job.parse_args(["--pretrain-epochs", "0"]), "p")
    assert not any(o.startswith(("train.init_checkpoint", "model.backbone")) for o in scratch)
    with pytest.raises(SystemExit):
        main_job.parse_args(["--pretrain-epochs", "-1"])


def test_drawing_keeps_the_best_class_per_object():
    """The detector's NMS is per class; the drawing keeps the best-scoring box where classes overlap."""
    import torch
    from detectron2.structures import Boxes, Instances

    inst = Instances((100, 100))
    inst.pred_boxes = Boxes(torch.tensor([[10.0, 10, 50, 50], [11, 11, 50, 51], [60, 60, 90, 90], [12, 10, 49, 50]]))
    inst.scores = torch.tensor([0.6, 0.8, 0.5, 0.2])
    inst.pred_classes = torch.tensor([0, 1, 2, 2])
    shown = main_job.shown_detections(inst, 0.3)
    assert shown.pred_classes.tolist() == [1, 2] and shown.scores.tolist() == pytest.approx([0.8, 0.5])
    assert len(main_job.shown_detections(inst, 0.3, all_classes=True)) == 3
    assert len(main_job.shown_detections(inst, 0.9)) == 0


def test_both_drawing_tools_default_to_the_runner_threshold():
    from mvit_det.detection.runner import DRAW_THRESHOLD
    from tools import demo  # writes the value out so that its --help imports no detectron2

    assert main_job.parse_args([]).confidence_threshold == DRAW_THRESHOLD == 0.5
    demo_args = demo.parse_args(["--model", "mask_rcnn_mvitv2_t_3x", "--input", "a.jpg", "--output", "out"])
    assert demo_args.confidence_threshold == DRAW_THRESHOLD
