"""Robustness of training runs: a job SIGKILLed in the middle of a checkpoint save, ``--resume`` after it, and a
loss that explodes to NaN/Inf. Each case is a real ``tools/train_net.py`` subprocess (through
tests/robustness_train_wrapper.py, which adds the kill and a per-iteration log of the image ids) on 8 tiny toy
images, so every run takes seconds of compute.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
from mvit_det.data.toy import ToySpec, generate_toy_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
WRAPPER = REPO / "tests" / "robustness_train_wrapper.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = generate_toy_dataset(tmp_path_factory.mktemp("data") / "mvit_toy", ToySpec(8, 1, 128, 160))
    return ["--register-coco", "tiny_train", str(root / "annotations/instances_train.json"), str(root / "train")]


def _args(data: list[str], out: Path, *extra: str, max_iter: int = 8, period: int = 3) -> list[str]:
    """``max_iter`` iterations at batch 2 (4 per epoch of the 8 images), short side 64, small RoI heads, a checkpoint
    every ``period`` iterations, no evaluation."""
    return [
        "--config", str(TOY), *data,
        "dataloader.train.dataset.names=tiny_train", "dataloader.test.dataset.names=[]",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]", "dataloader.train.num_workers=0",
        "model.roi_heads.batch_size_per_image=16", "model.proposal_generator.pre_nms_topk=[200,100]",
        "model.proposal_generator.post_nms_topk=[100,50]",
        f"train.max_iter={max_iter}", f"train.checkpointer.period={period}", "train.log_period=1",
        f"train.output_dir={out}", *extra,
    ]  # fmt: skip


def _run(args: list[str], data_log: Path | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", **env_extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if data_log is not None:
        env["MVIT_TEST_DATA_LOG"] = str(data_log)
    return subprocess.run([sys.executable, str(WRAPPER), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def _per_iteration(out: Path, key: str) -> dict[int, float]:
    """``key`` per iteration from metrics.json; a resumed run appends, so the last record of an iteration wins."""
    values = {}
    for line in (out / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["iteration"]] = record[key]
    return values


def _image_ids(log: Path) -> dict[int, list[int]]:
    return {r["iter"]: r["image_ids"] for r in map(json.loads, log.read_text().splitlines())}


def test_sigkill_mid_save_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    """6 iterations, checkpoints after iterations 1, 3 and 5 (model_final); the warm-up spans 4.5 iterations, so the
    learning rate differs from one iteration to the next."""

    def args(out: Path) -> list[str]:
        return _args(data, out, "lr_multiplier.warmup_length=0.75", max_iter=6, period=2)

    # The reference: one uninterrupted run.
    ref_out, ref_log = tmp_path / "ref", tmp_path / "ref_data.jsonl"
    proc = _run(args(ref_out), ref_log)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_ids, ref_lr = _image_ids(ref_log), _per_iteration(ref_out, "lr")
    assert sorted(ref_ids) == list(range(6)) and sorted(ref_lr) == list(range(6))
    assert len({tuple(v) for v in ref_ids.values()}) > 3  # the sampler shuffles: batches differ

    # The same run, SIGKILLed halfway through writing its second checkpoint (model_0000003.pth).
    out, log = tmp_path / "run", tmp_path / "run_data.jsonl"
    proc = _run(args(out), log, MVIT_TEST_KILL_SAVE="2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "SIGKILL while writing" in proc.stderr and "model_0000003.pth" in proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists()
    partial = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert len(partial) == 1 and partial[0].startswith("model_0000003.pth.tmp")  # the half-written temporary file
    good = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)
    assert good["iteration"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values())

    # --resume continues at iteration 2 with the learning rate and the images of the uninterrupted run.
    resume_log = tmp_path / "resume_data.jsonl"
    proc = _run([*args(out), "--resume"], resume_log)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = proc.stdout + proc.stderr
    assert re.search(r"Resuming from \S*model_0000001\.pth at iteration 2", log_text)
    assert re.search(r"Removed 1 unfinished checkpoint file.*model_0000003\.pth\.tmp", log_text)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    ids, lr = _image_ids(resume_log), _per_iteration(out, "lr")
    assert sorted(ids) == [2, 3, 4, 5]
    assert ids == {i: ref_ids[i] for i in range(2, 6)}
    assert {i: lr[i] for i in range(2, 6)} == {i: ref_lr[i] for i in range(2, 6)}
    assert len(set(ref_lr.values())) == 6  # a different lr at every iteration: the comparison bites
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 5


def test_exploding_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """The learning rate jumps to 1e30x from iteration 2 (the multiplier's milestones count 300 steps, set here
    rather than taken from the config's max_iter, over the 8 iterations), so the weights blow up and iteration 3
    sees Inf/NaN: in the loss, or already in detectron2's RPN, which raises its own FloatingPointError. Either way
    training stops before that update, with exit code 3."""
    out = tmp_path / "nan"
    proc = _run(_args(data, out, "lr_multiplier.scheduler.values=[1.0,1e30,1e30]",
                      "lr_multiplier.scheduler.milestones=[70,280]", "lr_multiplier.scheduler.num_updates=300",
                      period=2))  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-3000:]
    m = re.search(r"Loss became NaN or Inf at iteration (\d+) \((this rank's losses: \{.*\}|detectron2 stopped earlier in "
                  r"the forward pass: Predicted boxes or scores contain Inf/NaN\. Training has diverged\.)\)\. Training "
                  r"was stopped before this update, so the last saved checkpoint holds the last good weights\.", text)
    assert m and int(m.group(1)) == 3, text[-3000:]
    assert re.search(r"Last good checkpoint: \S*model_0000001\.pth", text)
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists() and not (out / "model_0000003.pth").exists()
    good = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    losses = _per_iteration(out, "total_loss")
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
