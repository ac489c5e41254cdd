"""tools/train_net.py and mvit_det.detection.engine: training, resume, eval-only, 2-process gloo, NaN guard, atomic saves.

The command-line runs use a tiny toy set (8 train / 2 val images of 128x160, registered with --register-coco) at
short side 128, so each run takes seconds of compute.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")
from detectron2.engine import hooks  # noqa: E402

from mvit_det.data.toy import ToySpec, generate_toy_dataset  # noqa: E402
from mvit_det.detection import builders, engine  # noqa: E402
from mvit_det.detection import checkpoint as detection_checkpoint  # noqa: E402
from mvit_det.detection.checkpoint import AtomicCheckpointer, MViTv2Checkpointer
from mvit_det.detection.engine import NonFiniteLossError, Trainer, weights_digest
from mvit_det.detection.resume import resume_hint
from mvit_det.detection.run_config import load_config, yacs_opts_to_list

REPO = Path(__file__).resolve().parents[1]
LAZY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
YACS = REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """--register-coco arguments for a tiny toy set: tiny_train (8 images) and tiny_val (2 images)."""
    root = generate_toy_dataset(tmp_path_factory.mktemp("data") / "mvit_toy", ToySpec(8, 2, 128, 160))
    return [
        "--register-coco", "tiny_train", str(root / "annotations/instances_train.json"), str(root / "train"),
        "--register-coco", "tiny_val", str(root / "annotations/instances_val.json"), str(root / "val"),
    ]  # fmt: skip


LAZY_TINY = [
    "dataloader.train.dataset.names=tiny_train",
    "dataloader.test.dataset.names=tiny_val",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
    "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.log_period=1",
]


def run_train_net(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc


def check_ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]


def assert_trained(records: list[dict], iterations: range) -> None:
    train = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in train] == list(iterations)
    for r in train:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss") or k == "total_loss"), r
    # From random weights the total loss is not monotone over a few steps (box regression grows as the RPN starts
    # finding objects), but the RPN objectness loss falls from ln 2 at once.
    first = sum(r["loss_rpn_cls"] for r in train[:3]) / 3
    last = sum(r["loss_rpn_cls"] for r in train[-3:]) / 3
    assert last < first - 0.01, (first, last)


def final_digests(out_dir: Path) -> dict[int, str]:
    digests = {}
    for log in out_dir.glob("log.txt*"):
        for m in re.finditer(r"Final weights sha256 on rank (\d+): ([0-9a-f]{64})", log.read_text()):
            digests[int(m.group(1))] = m.group(2)
    return digests


# -- command line: LazyConfig -----------------------------------------------------------------------------
@pytest.mark.slow
def test_lazy_train_resume_eval_only(tiny, tmp_path):
    out = tmp_path / "run"
    common = ["--config", str(LAZY), *tiny, *LAZY_TINY, f"train.output_dir={out}", "train.checkpointer.period=4"]
    check_ok(run_train_net([*common, "train.max_iter=8"]))
    assert_trained(read_metrics(out), range(8))
    for name in ("model_0000007.pth", "model_final.pth", "last_checkpoint", "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "model_0000003.pth").exists()  # the toy config keeps only the newest periodic checkpoint
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 7
    assert list(out.glob("*.tmp*")) == []
    assert list(out.glob("events.out.tfevents.*"))

    # Training again in the finished run's folder without --resume would replace its checkpoints: refused.
    final = (out / "model_final.pth").read_bytes()
    proc = run_train_net([*common, "train.max_iter=10"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"train.output_dir {out} already holds a run (its last_checkpoint names model_final.pth)" in proc.stderr
    assert "Continue it with --resume" in proc.stderr and (out / "model_final.pth").read_bytes() == final

    # --resume continues at iteration 8 and runs exactly the four missing iterations; the periodic checkpoint of the
    # first run counts towards max_to_keep=1 (detectron2 alone would only count those saved after the resume).
    log = check_ok(run_train_net([*common, "train.max_iter=12", "--resume"]))
    assert re.search(r"Resuming from \S*model_final\.pth at iteration 8", log)
    records = [r for r in read_metrics(out) if "total_loss" in r]
    assert [r["iteration"] for r in records] == list(range(12))
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 11
    assert (out / "model_0000011.pth").is_file() and not (out / "model_0000007.pth").exists()

    # A file that is not a checkpoint: one line naming it, no traceback.
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    proc = run_train_net([*common, "--eval-only", f"train.init_checkpoint={notes}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"train_net: '{notes}' is not a checkpoint" in proc.stderr

    # --eval-only loads the given weights and prints box and mask AP. (Ten iterations score every box below the
    # default 0.05, and COCO AP of no detections is NaN: keep them all, so that the AP printed is a number.)
    log = check_ok(run_train_net([*common, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}",
                                  "model.roi_heads.box_predictor.test_score_thresh=0.0"]))
    for task in ("bbox", "segm"):
        m = re.search(rf"copypaste: Task: {task}\n.*copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: ([-\d.na]+),", log)
        assert m, log[-3000:]
        assert 0.0 <= float(m.group(1)) <= 100.0
    assert f"Loading from {out / 'model_final.pth'}" in log


# -- command line: yacs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_yacs_train(tiny, tmp_path):
    out = tmp_path / "yacs"
    log = check_ok(
        run_train_net(
            [
                "--config-file", str(YACS), *tiny,
                "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST=('tiny_val',)",  # both override forms
                "INPUT.MIN_SIZE_TRAIN=(128,)", "INPUT.MIN_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS=0",
                "SOLVER.MAX_ITER=8", "SOLVER.WARMUP_ITERS=2", "SOLVER.CHECKPOINT_PERIOD=4", f"OUTPUT_DIR={out}",
            ]
        )
    )  # fmt: skip
    assert_trained(read_metrics(out), range(8))
    assert (out / "model_0000003.pth").is_file() and (out / "model_final.pth").is_file()
    assert "copypaste: Task: segm" in log
    assert "AMP (mixed precision) is disabled" not in log  # the toy YAML already disables AMP


# -- 2 CPU processes through gloo -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU/gloo path; with CUDA launch uses NCCL")
def test_two_cpu_processes_stay_in_sync(tiny, tmp_path):
    out = tmp_path / "ddp"
    log = check_ok(
        run_train_net(
            ["--config", str(LAZY), "--num-gpus", "2", *tiny, *LAZY_TINY, f"train.output_dir={out}",
             "train.max_iter=4", "train.checkpointer.period=100"]
        )
    )  # fmt: skip
    assert "World size: 2" in (out / "log.txt").read_text()
    digests = final_digests(out)
    assert set(digests) == {0, 1}, digests
    assert digests[0] == digests[1]
    assert "Weights are identical on all 2 ranks" in log
    # The digest is of the trained weights: it matches model_final.pth and differs from the initial weights.
    model = builders.build_model(load_config(str(LAZY)))
    init_digest = weights_digest(model)
    MViTv2Checkpointer(model).load(str(out / "model_final.pth"))
    assert weights_digest(model) == digests[0] != init_digest
    assert [r["iteration"] for r in read_metrics(out) if "total_loss" in r] == [0, 1, 2, 3]


# -- in-process: NaN guard and atomic checkpoints -----------------------------------------------------------
class _Quadratic(nn.Module):
    """loss = |w|^2; the batch is the iteration number, and batch ``nan_at`` gives a NaN loss."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.nan_at = nan_at

    def forward(self, batch: int) -> dict:
        loss = (self.w**2).sum()
        return {"loss": loss * float("nan") if batch == self.nan_at else loss}


def test_nonfinite_loss_stops_before_the_update_and_keeps_last_checkpoint(tmp_path):
    model = _Quadratic(nan_at=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, itertools.count(), opt)
    ckpt = AtomicCheckpointer(model, str(tmp_path), trainer=trainer)
    evals = []
    trainer.register_hooks(
        [hooks.PeriodicCheckpointer(ckpt, 2), engine._EvalHook(0, lambda: evals.append(1) or {})]
    )
    with pytest.raises(NonFiniteLossError, match=r"NaN or Inf at iteration 5 .*last saved checkpoint"):
        trainer.train(0, 6)  # the NaN comes at the last iteration, where the final eval/checkpoint would run
    # Five good SGD steps (w <- 0.8 w), none with the NaN.
    assert torch.allclose(model.w.detach(), torch.full((3,), 0.8**5))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    assert evals == []  # no evaluation of a failed run
    saved = torch.load(tmp_path / "model_0000003.pth", weights_only=False)
    assert saved["iteration"] == 3 and torch.allclose(saved["model"]["w"], torch.full((3,), 0.8**4))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_final", iteration=1)
    before = (tmp_path / "model_final.pth").read_bytes()

    def dies_midway(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(detection_checkpoint.torch, "save", dies_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_final", iteration=2)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]


# -- argument handling --------------------------------------------------------------------------------------
def test_yacs_override_forms():
    assert yacs_opts_to_list(["SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR=0.1", "DATASETS.TRAIN=('a',)"]) == [
        "SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "0.1", "DATASETS.TRAIN", "('a',)",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"Cannot parse yacs override 'solver.max_iter=3'"):
        yacs_opts_to_list(["solver.max_iter=3"])
    with pytest.raises(ValueError, match=r"yacs override 'SOLVER.MAX_ITER' has no value"):
        yacs_opts_to_list(["SOLVER.MAX_ITER"])


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="LazyConfig overrides must be key=value"):
        load_config(str(LAZY), ["train.max_iter", "10"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ValueError, match="Unknown config type"):
        (tmp_path / "cfg.json").write_text("{}")
        load_config(str(tmp_path / "cfg.json"))
    proc = run_train_net(["--config", str(tmp_path / "missing.yaml")], timeout=120)
    assert proc.returncode == 2 and "missing.yaml does not exist" in proc.stderr


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    import importlib

    train_net = importlib.import_module("tools.train_net")

    def interrupted(*args, **kwargs):
        (out / "model_0000003.pth").write_bytes(b"")
        (out / "last_checkpoint").write_text("model_0000003.pth")
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(train_net, "launch", interrupted)
    assert train_net.cli(["--config", str(LAZY), f"train.output_dir={out}"]) == 130
    err = capsys.readouterr().err
    assert f"train_net: interrupted. The last saved checkpoint is {out / 'model_0000003.pth'}; the same command with " \
           "--resume continues from it." in err  # fmt: skip
    assert not (out / ".mvit_det_run.lock").exists()  # the lock is released
    assert resume_hint(str(tmp_path)) == f"Nothing was saved in {tmp_path} yet; the same command starts the run again."
