"""Robustness, issue 17: nothing a user had is lost, and no result is silently wrong.

* Tensors read from a checkpoint own their memory: saving over the file just read works.
* Every writer is atomic (``mvit_det.utils.atomic``): ``save_checkpoint``, ``cls_eval.py --out``, ``export_onnx.py``,
  detectron2 checkpoints; a failure (full disk) leaves the previous file whole and no temporary file behind.
* Two ``train_net.py`` runs in one output folder: the second is refused (a lock with the pid; stale locks are taken
  over).
* Run settings are checked before any model is built (``period=0``, ``max_iter=-5``, ``total_batch_size=0``,
  ``max_iter=abc``, an unwritable output folder, a ``last_checkpoint`` naming a missing or cut file).
* NaN/Inf logits stop ``cls_eval.py``; integer weights are refused; every checkpoint the project or detectron2 writes
  (the yacs bare trunk's ``backbone.*``, DDP's ``module.``, torch.compile's ``_orig_mod.``) loads back.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("detectron2")
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402

from mvit_det.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from mvit_det.detection import MViTv2Checkpointer, add_mvitv2_config, build_mvitv2_backbone  # noqa: E402
from mvit_det.detection.checkpoint import AtomicCheckpointer  # noqa: E402
from mvit_det.detection.resume import LOCK_NAME, output_dir_lock  # noqa: E402
from mvit_det.models import MViTv2  # noqa: E402
from mvit_det.utils import atomic  # noqa: E402
from mvit_det.utils.atomic import atomic_open  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAZY = REPO / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
YACS = REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml"
MODEL = "mvitv2-tiny_3rdparty_in1k"


from tools import cls_eval, export_onnx, train_net  # noqa: E402


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- reading never maps the file -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zip", "mvit-det", "safetensors"])
def test_saving_over_the_checkpoint_just_read_keeps_it_whole(kind, tmp_path):
    from safetensors.torch import save_file

    sd = {"patch_embed.proj.weight": torch.randn(96, 3, 7, 7), "blocks.0.attn.qkv.weight": torch.randn(1024, 1024)}
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    {"zip": lambda: torch.save(sd, path), "mvit-det": lambda: save_checkpoint(sd, path),
     "safetensors": lambda: save_file(sd, str(path))}[kind]()  # fmt: skip
    loaded, _ = read_checkpoint(path)
    # Before: torch.load(mmap=True) mapped these tensors to the file, and this save died with SIGBUS.
    if kind == "safetensors":
        save_file(loaded, str(path))
    else:
        torch.save(loaded, path)
    again, _ = read_checkpoint(path)
    assert all(torch.equal(again[k], v) for k, v in sd.items())
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())  # the tensors in memory are intact too


# -- atomic writers --------------------------------------------------------------------------------------------
def test_atomic_helper_keeps_the_old_file_on_any_failure(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("writer failed")
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        with atomic_open(target, "w") as f:
            f.write("new")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(IsADirectoryError, match=r"it is an existing folder. Give a file name"):
        with atomic_open(tmp_path, "w"):
            pass


def test_save_checkpoint_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    sd = {"patch_embed.proj.weight": torch.randn(96, 3, 7, 7)}
    path = save_checkpoint(sd, tmp_path / "w.pth")
    before = path.read_bytes()

    def half_then_full(obj, f, *a, **k):
        f.write(b"PK partial")
        _disk_full()

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}, path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_export_onnx_writes_atomically_and_refuses_a_folder(tmp_path, monkeypatch, capsys):
    rc = export_onnx.main(["--output", str(tmp_path)])  # a folder: refused before the model is built
    assert rc == 2 and f"--output {tmp_path} is a folder; give the file to write" in capsys.readouterr().err
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")

    def half_then_full(model, args, f, *a, **k):
        Path(f).write_bytes(b"\x08" * 1000)
        _disk_full()

    monkeypatch.setattr(torch.onnx, "export", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx.export(nn.Conv2d(3, 4, 3), ["logits"], (32, 32), out)
    assert out.read_bytes() == b"previous export" and _leftovers(tmp_path) == []


# -- cls_eval: NaN logits, atomic --out ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, ckpt_fill_random) -> dict:
    root = tmp_path_factory.mktemp("cls")
    for i, cls in enumerate(("n0", "n1")):
        (root / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(root / "val" / cls / "a.png")
    model = ckpt_fill_random(MViTv2("tiny"), 1)
    good = save_checkpoint(model, root / "good.pth")
    sd = model.state_dict()
    sd["head.fc.weight"][3, 5] = float("nan")  # one NaN weight
    nan = save_checkpoint(sd, root / "nan.pth")
    return {"data": root / "val", "good": good, "nan": nan}


def _cls_eval(ckpt: Path, data: Path, out: Path, capsys) -> tuple[int, str]:
    rc = cls_eval.main([MODEL, str(ckpt), "--data", str(data), "--workers", "0", "--no-progress", "--out", str(out)])
    return rc, capsys.readouterr().err


def test_cls_eval_refuses_nan_logits(eval_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text('{"top1": 80.0}')
    rc, err = _cls_eval(eval_data["nan"], eval_data["data"], out, capsys)
    assert rc == 1
    assert "The model returned NaN/Inf logits for 2 of 2 images" in err
    assert "1 weight tensors of the checkpoint contain NaN/Inf (first: head.fc.weight)" in err
    assert out.read_text() == '{"top1": 80.0}'  # nothing scored, nothing written


def test_cls_eval_out_on_a_full_disk_keeps_the_old_results(eval_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    before = json.dumps({"model": MODEL, "evaluated": 50000, "top1": 82.3}, indent=2)
    out.write_text(before)
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)
    rc, err = _cls_eval(eval_data["good"], eval_data["data"], out, capsys)
    # Before: the old file was truncated first, and a full disk left invalid JSON behind.
    assert rc == 1 and "No space left on device" in err
    assert out.read_text() == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    predictions = tmp_path / "pred.csv"
    rc = cls_eval.main([MODEL, str(eval_data["good"]), "--data", str(eval_data["data"]), "--workers", "0",
                        "--no-progress", "--out", str(out), "--predictions", str(predictions)])  # fmt: skip
    assert rc == 0 and json.loads(out.read_text())["evaluated"] == 2 and len(predictions.read_text().splitlines()) == 3


# -- integer weights -------------------------------------------------------------------------------------------
def test_integer_weights_are_refused_with_the_reason(mini_detector):
    model = mini_detector.backbone.bottom_up
    sd = dict(model.state_dict())
    sd["blocks.3.mlp.fc1.weight"] = sd["blocks.3.mlp.fc1.weight"].mul(100).to(torch.int8)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, sd)
    msg = str(err.value)
    assert "stores 1 floating-point weights of the model as integers: blocks.3.mlp.fc1.weight (int8)" in msg
    assert "quantized" in msg and "dequantize" in msg
    assert torch.is_floating_point(model.state_dict()["blocks.3.mlp.fc1.weight"])


# -- every checkpoint the project or detectron2 writes loads back ----------------------------------------------
def _perturbed(model: nn.Module) -> dict:
    return {k: v + 0.25 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


def _equal(model: nn.Module, sd: dict) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_yacs_bare_trunk_checkpoint_loads_back(tmp_path):
    """``build_mvitv2_backbone`` makes ``backbone.blocks.*`` keys, which mmpretrain uses too."""
    cfg = add_mvitv2_config(get_cfg())
    model = nn.Module()
    model.backbone = build_mvitv2_backbone(cfg, ShapeSpec(channels=3))
    model.proposal_generator = nn.Linear(4, 2)
    saved = _perturbed(model)
    model.load_state_dict(saved)
    AtomicCheckpointer(model, str(tmp_path)).save("model_0000004", iteration=4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ckpt = MViTv2Checkpointer(model, str(tmp_path), require_all=True)
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 4  # --resume, --eval-only --resume
    assert _equal(model, saved)


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compiled_detector_checkpoints_load_back(wrapper, mini_detector, tmp_path):
    """What ``DistributedDataParallel(model).state_dict()`` and ``torch.compile(model).state_dict()`` give."""
    model = mini_detector
    saved = _perturbed(model)
    sd = {wrapper + k: v for k, v in saved.items()}
    torch.save({"model": sd, "iteration": 9}, tmp_path / "model_final.pth")
    MViTv2Checkpointer(model, require_all=True).load(str(tmp_path / "model_final.pth"))
    assert _equal(model, saved)


def test_integer_head_weight_in_a_detector_checkpoint_is_refused(mini_detector, tmp_path):
    model = mini_detector
    sd = dict(model.state_dict())
    sd["roi_heads.weight"] = sd["roi_heads.weight"].to(torch.int8)
    torch.save({"model": sd}, tmp_path / "q.pth")
    with pytest.raises(ValueError, match=r"roi_heads.weight \(int8\).*quantized"):
        MViTv2Checkpointer(model).load(str(tmp_path / "q.pth"))


# -- train_net: one run per folder, settings checked before the model is built --------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if train_net gets as far as starting the workers (building the model)."""

    def launch(*a, **k):
        raise AssertionError("train_net started a run although the settings are invalid")

    monkeypatch.setattr(train_net, "launch", launch)


def test_second_run_in_the_same_output_folder_is_refused(tmp_path, no_launch, capsys):
    out = tmp_path / "run"
    with output_dir_lock(str(out), "train.output_dir") as lock:
        assert Path(lock).read_text().split()[0] == str(os.getpid())
        rc = train_net.cli(["--config", str(LAZY), f"train.output_dir={out}"])
        err = capsys.readouterr().err
    assert rc == 2
    assert f"The output folder {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in err
    assert "Give this run its own folder (train.output_dir=...)" in err
    assert not (out / LOCK_NAME).exists()  # released


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()} 2026-01-01 00:00:00\n")
    with output_dir_lock(str(out)):
        assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert f"Removing the stale lock {out / LOCK_NAME} of process {dead.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (LAZY, ["train.checkpointer.period=0"], "train.checkpointer.period is 0; it is a number of iterations and must be >= 1."),
        (LAZY, ["train.log_period=0"], "train.log_period is 0; it is a number of iterations and must be >= 1."),
        (LAZY, ["train.max_iter=-5"], "train.max_iter is -5: nothing would be trained."),
        (LAZY, ["train.max_iter=abc"], "train.max_iter must be an integer, got 'abc'. Example: train.max_iter=100."),
        (LAZY, ["dataloader.train.total_batch_size=0"], "dataloader.train.total_batch_size is 0; it is the number of images per iteration"),
        (LAZY, ["dataloader.train.total_batch_size=3", "--num-gpus", "2"], "dataloader.train.total_batch_size is 3, which the 2 processes cannot share equally"),
        (LAZY, ["train.output_dir={file}/sub"], "Cannot write to the output folder '{file}/sub' (train.output_dir): Not a directory"),
        (LAZY, ["--eval-only", "train.init_checkpoint={tmp}/gone.pth"], "train.init_checkpoint is {tmp}/gone.pth, which does not exist"),
        (YACS, ["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD is 0; it is a number of iterations and must be >= 1."),
        (YACS, ["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH is 0; it is the number of images per iteration"),
        (YACS, ["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER is 0: nothing would be trained."),
        (YACS, ["OUTPUT_DIR", "{file}/sub"], "Cannot write to the output folder '{file}/sub' (OUTPUT_DIR): Not a directory"),
    ],
)  # fmt: skip
def test_run_settings_are_checked_before_the_model_is_built(config, overrides, message, tmp_path, no_launch, capsys):
    file = tmp_path / "a_file"
    file.write_text("")
    fill = {"file": str(file), "tmp": str(tmp_path)}
    args = [o.format(**fill) for o in overrides]
    if not any("output_dir" in a or a == "OUTPUT_DIR" for a in args):
        args += [f"train.output_dir={tmp_path / 'out'}"] if config == LAZY else ["OUTPUT_DIR", str(tmp_path / "out")]
    rc = train_net.cli(["--config", str(config), *args])
    assert rc == 2
    assert message.format(**fill) in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "truncated", "empty"])
def test_resume_from_a_last_checkpoint_naming_a_bad_file(case, tmp_path, no_launch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}, "iteration": 99}, out / "model_0000099.pth")
    name = "model_0000199.pth"
    if case == "truncated":
        data = (out / "model_0000099.pth").read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    elif case == "empty":
        (out / name).write_bytes(b"")
    (out / "last_checkpoint").write_text(name)
    rc = train_net.cli(["--config", str(LAZY), "--resume", f"train.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--resume: {out / 'last_checkpoint'} names" in err
    expected = {"missing": "which does not exist", "truncated": "is truncated or corrupt", "empty": "it is empty"}[case]
    assert expected in err
    assert f"Write the name of a complete checkpoint into {out / 'last_checkpoint'} (found: model_0000099.pth)" in err
