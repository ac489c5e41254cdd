"""What a command-line user of the classification tools sees: the converter keeps a checkpoint's description and
never overwrites its source, cls_train.py refuses to mix two runs in one --output, errors name flags rather than
Python arguments, exit codes follow the help text, and metrics.json counts the skipped images.

Checkpoints here are built, not trained (an MViTv2-T with a 3-class head at 32 px, described as tools/cls_train.py
describes its own), so most tests take seconds; two train one epoch on four 32x32 images.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvit_det.checkpoint import load_checkpoint, load_file, save_checkpoint
from mvit_det.checkpoint.described import read_description
from mvit_det.checkpoint.loading import CheckpointMismatchError
from mvit_det.classification.described import describe_classifier
from mvit_det.classification.recipes import RecipeError, resolve_recipe
from mvit_det.classification.train import OutputError, TrainConfig, train
from mvit_det.classification.train_state import interrupt_after, resume_difference
from mvit_det.models import MViTv2
from tools import classify, cls_eval, cls_train, convert_checkpoint

MODEL = "mvitv2-tiny_3rdparty_in1k"
KWARGS = dict(arch="tiny", num_classes=3, expand_attn=True, cls_token=False, pretrain_img_size=32)
NAMES = ["astronaut", "cat", "coffee"]
QUICK = ["--img-size", "32", "--batch-size", "4", "--epochs", "1", "--pretrained", "none", "--workers", "0",
         "--no-progress"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for c, name in enumerate(NAMES):
        for i in range(2):
            _image(root / name / f"{i}.png", 10 * c + i)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A described 3-class checkpoint at 32 px (as cls_train.py writes it) and the same weights without meta."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = MViTv2(**KWARGS)
    described = save_checkpoint(model, root / "described.pth",
                                meta=describe_classifier(MODEL, KWARGS, NAMES, 32, 32, trained_by="tools/cls_train.py"))
    plain = root / "plain.pth"
    torch.save(model.state_dict(), plain)
    return {"described": described, "plain": plain}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. tools/convert_checkpoint.py --------------------------------------------------------------------------
def test_convert_keeps_the_description(checkpoints, tmp_path, capsys):
    dst = tmp_path / "converted.pth"
    assert convert_checkpoint.main([str(checkpoints["described"]), str(dst)]) == 0
    assert "described:   3 classes, input 32 px" in capsys.readouterr().out
    before, after = read_description(checkpoints["described"]), read_description(dst)
    assert after is not None, "the converted checkpoint lost its description"
    for key in ("class_names", "input_size", "preprocess", "model_kwargs", "model_name"):
        assert after[key] == before[key], key
    assert after["source_format"] == "mvit-det" and after["num_classes"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic write left no temp file


def test_convert_refuses_to_overwrite_its_source(checkpoints, tmp_path, capsys):
    src = tmp_path / "model_final.pth"
    src.write_bytes(checkpoints["described"].read_bytes())
    link = tmp_path / "link.pth"
    os.link(src, link)
    digest = _digest(src)
    for dst in (src, tmp_path / "." / "model_final.pth", link):  # the same file, however it is named
        assert convert_checkpoint.main([str(src), str(dst)]) == 2
        assert "is the source file itself" in capsys.readouterr().err
    assert _digest(src) == digest and read_description(src)["class_names"] == NAMES


# -- 2. tools/cls_train.py: one run per --output --------------------------------------------------------------
def test_output_holding_a_run_is_refused_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"old weights")
    (out / "metrics.json").write_text(json.dumps([{"epoch": 1}, {"epoch": 3}]))
    listing = sorted(p.name for p in out.iterdir())
    assert cls_train.main(["--data", str(data), "--output", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert f"--output {out} already holds a run (model_final.pth, epoch 3)" in err
    assert "--resume" in err and "new --output" in err
    assert sorted(p.name for p in out.iterdir()) == listing and (out / "model_final.pth").read_bytes() == b"old weights"
    only_state = tmp_path / "stopped"
    only_state.mkdir()
    (only_state / "last.pth").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"already holds a run \(last\.pth\)"):
        train(TrainConfig(data=str(data), output=str(only_state), pretrained="none", workers=0, progress=False))


def test_bad_arguments_leave_no_output_folder(data, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("warmup_epoch: 1\n")
    assert cls_train.main(["--data", str(data), "--output", str(tmp_path / "o1"), *QUICK, "--config", str(typo)]) == 2
    assert "Did you mean 'warmup_epochs'" in capsys.readouterr().err
    assert cls_train.main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"), *QUICK]) == 2
    assert cls_train.main(["--data", str(data), "--output", str(tmp_path / "o3"), *QUICK,
                           "--pretrained", str(tmp_path / "nowhere.pth")]) == 2  # the last --pretrained counts
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("o")]


# -- 3. errors name the command-line fix ----------------------------------------------------------------------
def test_cls_eval_head_mismatch_names_the_model_config_key(checkpoints, data, tmp_path, capsys):
    config = tmp_path / "m1000.yaml"
    config.write_text("arch: tiny\nnum_classes: 1000\n")
    assert cls_eval.main([str(config), str(checkpoints["plain"]), "--data", str(data), "--workers", "0",
                          "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"set `num_classes: 3` in the model config {config}" in err
    assert "get_model" not in err and "strict=False" not in err
    assert cls_eval.main([str(config), str(checkpoints["described"]), "--data", str(data), "--workers", "0",
                          "--no-progress"]) == 1
    assert "describes its own model: give it alone" in capsys.readouterr().err
    assert cls_eval.main([MODEL, str(checkpoints["plain"]), "--data", str(data), "--workers", "0",
                          "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "give a model config file with `arch: tiny` and `num_classes: 3` as MODEL" in err and "get_model" not in err
    # The Python API keeps its own advice.
    with pytest.raises(CheckpointMismatchError, match=r"num_classes=3.*strict=False") as info:
        load_checkpoint(MViTv2("tiny"), checkpoints["plain"])
    assert isinstance(info.value, ValueError)


def test_classify_folder_and_undescribed_head(checkpoints, data, capsys):
    assert classify.main([str(data / "cat"), "--weights", str(checkpoints["plain"]), "--topk", "2",
                          "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    shown = [line.split()[0] for line in out.splitlines() if line.endswith(")")]
    assert shown == [str(data / "cat" / "0.png"), str(data / "cat" / "1.png")]  # the folder's images, sorted
    assert "3-class head and no class names" in err
    with pytest.raises(SystemExit) as info:
        classify.main([str(data / "cat"), "--weights", str(checkpoints["plain"]), "--model",
                       "mvitv2-small_3rdparty_in1k", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "use --model mvitv2-tiny_3rdparty_in1k" in err and "MViTv2(" not in err and "get_model" not in err


# -- 4. a refused --resume says what differs --------------------------------------------------------------------
def test_resume_difference_names_only_what_changed():
    def fingerprint(**overrides):
        return {"model": MODEL, "classes": NAMES, "train_images": 6, "seed": 0,
                "recipe": resolve_recipe("tiny", overrides=overrides).to_dict()}

    lines, flags = resume_difference(fingerprint(epochs=3), fingerprint(epochs=5))
    assert lines == ["epochs: saved 3, given 5"] and flags == ["--epochs 3"]  # the warm-up follows the epochs
    lines, flags = resume_difference(fingerprint(epochs=3), fingerprint(epochs=3, hflip=0.0, batch_size=8))
    assert lines == ["batch_size: saved 256, given 8", "hflip: saved 0.5, given 0.0"] and flags == ["--batch-size 256"]


# -- 5. exit codes --------------------------------------------------------------------------------------------
def test_exit_codes_follow_the_help(data, tmp_path, capsys):
    mixup = tmp_path / "mixup.yaml"
    mixup.write_text("mixup: 0.8\n")
    argv = ["--data", str(data), "--output", str(tmp_path / "odd"), *QUICK, "--batch-size", "3", "--config", str(mixup)]
    assert cls_train.main(argv) == 2
    assert "must be even" in capsys.readouterr().err and not (tmp_path / "odd").exists()
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert cls_train.main(["--data", str(data), "--output", str(tmp_path / "txt"), *QUICK,
                           "--pretrained", str(text)]) == 2
    assert f"--pretrained {text}" in capsys.readouterr().err
    assert cls_train.main(["--data", str(data), "--output", str(tmp_path / "gone"), *QUICK,
                           "--pretrained", str(tmp_path / "gone.pth")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained none" in err and "pretrained=True" not in err


def test_interrupt_exits_130_with_the_resume_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"state")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cls_train, "train", interrupted)
    assert cls_train.main(["--data", str(tmp_path), "--output", str(out), "--resume"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted. The last saved state is {out / 'last.pth'}; the same command with --resume "
                   "continues from it."]


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_write():
    # Python's own Ctrl-C handler, as in a command-line run (an earlier test in this process may have replaced it;
    # interrupt_after leaves other handlers alone).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupt_after():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the write finished")
        assert done == ["the write finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


# -- 6./7. metrics, recipe values, the resumed log ---------------------------------------------------------
def test_probabilities_outside_0_1_are_refused():
    for key in ("hflip", "re_prob", "mixup_prob"):
        with pytest.raises(RecipeError, match=f"{key} is a probability and must be in 0..1, got 7"):
            resolve_recipe("tiny", overrides={key: 7})


def test_skipped_images_counted_and_resume_logs_no_initialisation(data, tmp_path, caplog):
    bad = tmp_path / "bad"
    for c in NAMES:
        for f in (data / c).iterdir():
            (bad / c).mkdir(parents=True, exist_ok=True)
            (bad / c / f.name).write_bytes(f.read_bytes())
    (bad / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    (bad / "coffee" / "text.png").write_text("not an image")
    out = tmp_path / "out"
    argv = ["--data", str(bad), "--output", str(out), *QUICK]
    assert cls_train.main(argv) == 0
    assert [r["skipped"] for r in json.loads((out / "metrics.json").read_text())] == [2]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cls_train.main([*argv, "--resume"]) == 0  # a finished run: resumed, nothing trained again
    assert "Resumed from" in caplog.text and "random initialisation" not in caplog.text
    assert load_file(out / "model_final.pth")["meta"]["class_names"] == NAMES
