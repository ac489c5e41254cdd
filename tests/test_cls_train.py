"""tools/cls_train.py and mvit_det.classification.train: layouts, recipes, outputs, the self-describing checkpoint,
exact resume, the NaN stop, bad inputs, and a real data set (scikit-learn's handwritten digits) learnt to a stated
held-out top-1.

Everything runs MViTv2-T at 32x32 on a few images, so the whole file takes a few minutes on two cores. One trained
run (module fixture ``digits_run``) serves every test that needs a trained checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvit_det import get_model, inference_model
from mvit_det.checkpoint import load_file
from mvit_det.classification.datasets import DatasetError
from mvit_det.classification.recipes import DROP_PATH, RecipeError, resolve_recipe
from mvit_det.classification.train import OutputError, ResumeError, TrainConfig, TrainingDiverged, train
from mvit_det.classification.train_data import prepare_data
from mvit_det.classification.train_state import create_train_model, create_train_optimizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mvitv2-tiny_3rdparty_in1k"

#: A quick recipe for 32x32 inputs: no augmentation that would need many epochs, a constant-ish schedule.
FAST = dict(
    epochs=1, warmup_epochs=0, batch_size=4, lr=1e-3, min_lr=1e-5, drop_path=0.0, auto_augment=None, mixup=0.0,
    cutmix=0.0, re_prob=0.0, label_smoothing=0.0, hflip=0.0, scale=[0.8, 1.0], crop_pct=1.0, img_size=32,
)


from tools import classify, cls_eval, cls_train  # noqa: E402


def _image(path: Path, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, classes: dict[str, int], size: int = 32) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            _image(root / name / f"img_{i}.png", 100 * c + i, size)
    return root


def _cfg(data, out, **kw) -> TrainConfig:
    overrides = dict(FAST, **kw.pop("overrides", {}))
    kw.setdefault("pretrained", "none")
    return TrainConfig(data=str(data), output=str(out), model=MODEL, workers=0, progress=False, overrides=overrides, **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)["model"]


def _abs_diffs(a: dict, b: dict) -> torch.Tensor:
    """Every weight's absolute difference between two state dicts with the same keys, as one flat tensor."""
    assert a.keys() == b.keys()
    return torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])


def _max_diff(a: dict, b: dict) -> float:
    return float(_abs_diffs(a, b).max())


# --------------------------------------------------------------------------------------------------------
# A real data set, trained once: held-out top-1, outputs, and the self-describing checkpoint
# --------------------------------------------------------------------------------------------------------
#: scikit-learn's digits at 32x32, 30 images per digit (6 held out), 4 epochs of the quick recipe (48 steps of
#: 20 images, the first 12 warming up). The held-out top-1 this must reach; chance is 10%.
DIGITS_MIN_TOP1 = 50.0


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set (requirements.txt)")
    from mvit_det.data.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    info = write_digits(root / "data", size=32, per_class=30, val_fraction=0.2)
    out = root / "out"
    cfg = _cfg(info["train_dir"], out, val_data=info["val_dir"], ckpt_every=2,
               overrides=dict(epochs=4, batch_size=20, lr=1e-3, warmup_epochs=1.0))
    summary = train(cfg)
    return {"summary": summary, "out": out, **info}


def test_digits_reach_the_stated_held_out_top1(digits_run):
    s = digits_run["summary"]
    assert s["val_images"] == 60 and s["train_images"] == 240
    assert s["val_top1"] >= DIGITS_MIN_TOP1, s["records"]
    losses = [r["loss"] for r in s["records"]]
    assert losses[-1] < losses[0] * 0.7, losses


def test_outputs(digits_run):
    out = digits_run["out"]
    for name in ("model_final.pth", "model_best.pth", "last.pth", "checkpoint_epoch_0002.pth",
                 "checkpoint_epoch_0004.pth", "metrics.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "lr", "val_top1", "val_top5", "images_per_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["val_top1"] <= r["val_top5"] <= 100
    assert records[-1]["val_top1"] == digits_run["summary"]["val_top1"]
    best = load_file(out / "model_best.pth")["meta"]
    assert best["val_top1"] == max(r["val_top1"] for r in records)
    cm = np.array(digits_run["summary"]["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 60 and cm.sum(axis=1).tolist() == [6] * 10
    assert 100 * np.trace(cm) / cm.sum() == pytest.approx(records[-1]["val_top1"])
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_checkpoint_describes_itself(digits_run):
    meta = load_file(digits_run["out"] / "model_final.pth")["meta"]
    assert meta["model_name"] == MODEL and meta["model_kwargs"]["arch"] == "tiny"
    assert meta["class_names"] == [f"digit_{d}" for d in range(10)]
    assert meta["input_size"] == 32 and meta["preprocess"]["crop_size"] == 32 and meta["preprocess"]["resize_size"] == 32


def test_get_model_and_inference_model_use_the_description(digits_run):
    path = str(digits_run["out"] / "model_final.pth")
    model = get_model(pretrained=path)
    assert model.num_classes == 10 and model.class_names[3] == "digit_3"
    same = get_model(MODEL, pretrained=path)  # the two-argument form: the description still decides the head
    assert same.num_classes == 10
    image = sorted((Path(digits_run["val_dir"]) / "digit_3").glob("*.png"))[0]
    result = inference_model(model, str(image))
    assert result["pred_class"].startswith("digit_") and len(result["pred_scores"]) == 10
    # The stored preprocessing (32x32, no crop) is what inference used: recompute it by hand.
    from mvit_det.classification.transforms import IMAGENET_MEAN, IMAGENET_STD

    with Image.open(image) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))).float()
    x = ((x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0].numpy()
    np.testing.assert_allclose(result["pred_scores"], probs, atol=1e-5)


def test_cls_eval_one_and_two_arguments(digits_run, tmp_path, capsys):
    path, val = str(digits_run["out"] / "model_final.pth"), digits_run["val_dir"]
    for args, name in (([path], "one.json"), ([MODEL, path], "two.json")):
        assert cls_eval.main([*args, "--data", val, "--workers", "0", "--no-progress", "--out", str(tmp_path / name)]) == 0
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    # The same protocol as the training's validation: the same top-1, on all 60 images, at 32x32.
    assert one["top1"] == pytest.approx(digits_run["summary"]["val_top1"]) == two["top1"]
    assert one["evaluated"] == 60 and "crop_size=32" in one["preprocessing"]
    # A validation folder with some classes missing is matched by name.
    sub = tmp_path / "val_subset"
    for d in (2, 7):
        (sub / f"digit_{d}").mkdir(parents=True)
        for f in sorted((Path(val) / f"digit_{d}").glob("*.png")):
            (sub / f"digit_{d}" / f.name).write_bytes(f.read_bytes())
    assert cls_eval.main([path, "--data", str(sub), "--workers", "0", "--no-progress", "--predictions",
                          str(tmp_path / "p.csv")]) == 0
    labels = {line.split(",")[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]}
    assert labels == {"2", "7"}
    # A checkpoint that does not describe itself needs the model name.
    plain = tmp_path / "plain.pth"
    torch.save({"model": get_model(MODEL).state_dict()}, plain)
    assert cls_eval.main([str(plain), "--data", val]) == 2
    assert "does not describe its model" in capsys.readouterr().err


def test_classify_uses_the_description(digits_run, capsys):
    images = [str(sorted((Path(digits_run["val_dir"]) / f"digit_{d}").glob("*.png"))[0]) for d in (0, 5)]
    assert classify.main([*images, "--weights", str(digits_run["out"] / "model_final.pth"), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("digit_") >= 6 and "RANDOM" not in out


def test_classifier_initialises_the_detector_backbone(digits_run):
    pytest.importorskip("detectron2")
    from mvit_det.detection import MViTv2Checkpointer
    from mvit_det.detection.builders import build_model as build_detector
    from mvit_det.detection.run_config import load_config, run_settings

    path = str(digits_run["out"] / "model_final.pth")
    trained = load_file(path)["model"]
    trunk_keys = [k for k in trained if not k.startswith(("norm.", "head."))]
    for config, opts in (
        (ROOT / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py", [f"train.init_checkpoint={path}"]),
        (ROOT / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml", ["MODEL.WEIGHTS", path]),
    ):
        cfg = load_config(str(config), opts)
        init = run_settings(cfg).init_checkpoint
        assert init == path
        detector = build_detector(cfg)
        MViTv2Checkpointer(detector).resume_or_load(init, resume=False)
        sd = detector.state_dict()
        for k in trunk_keys:  # every trunk weight is the classifier's (rel-pos tables resized to the detector's)
            got = sd["backbone.bottom_up." + k]
            if k.endswith(("rel_pos_h", "rel_pos_w")) and got.shape != trained[k].shape:
                continue
            assert torch.equal(got, trained[k]), k
        assert not any(k.startswith("backbone.bottom_up.head") for k in sd)


def test_pretrained_from_a_fine_tune_and_from_a_detector_trunk(digits_run, tmp_path, caplog):
    """--pretrained takes a previous fine-tune (new head for another class count) and a detector's trunk."""
    from mvit_det.classification.train_state import load_pretrained
    from mvit_det.models import MViTv2

    r = resolve_recipe("tiny", overrides=dict(FAST))
    previous = str(digits_run["out"] / "model_final.pth")
    trained = load_file(previous)["model"]
    model, _ = create_train_model(MODEL, 2, r, act_checkpoint=False)
    how = load_pretrained(model, MODEL, previous)
    assert "new 2-class head (the checkpoint has 10 classes)" in how
    sd = model.state_dict()
    assert all(torch.equal(sd[k], trained[k]) for k in trained if not k.startswith("head."))
    assert sd["head.fc.weight"].shape == (2, 768)

    trunk = MViTv2("tiny", detection=True, pretrain_img_size=32).state_dict()
    det = tmp_path / "detector.pth"
    torch.save({"model": {"backbone.bottom_up." + k: v for k, v in trunk.items()}}, det)
    model, _ = create_train_model(MODEL, 2, r, act_checkpoint=False)
    how = load_pretrained(model, MODEL, str(det))
    assert "trunk from the detector checkpoint" in how and "norm and head are new" in how
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in trunk.items() if k.startswith(("blocks.", "patch_embed.")))

    data = _folder(tmp_path / "d", {"a": 2, "b": 2})
    with caplog.at_level("INFO"):
        train(_cfg(data, tmp_path / "out", pretrained=previous, overrides=dict(batch_size=4)))
    assert "new 2-class head" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------
def test_imagefolder_with_any_names_and_label_file(tmp_path):
    folder = _folder(tmp_path / "f", {"Cat pictures": 3, "dog": 3, "zebra-2": 3})
    data = prepare_data(folder, val_split=0.34)
    assert data.class_names == ["Cat pictures", "dog", "zebra-2"] and data.layout == "imagefolder"
    assert len(data.val) == 3 and len(data.train) == 6 and sorted(lab for _, lab in data.val) == [0, 1, 2]

    flat = tmp_path / "flat"
    lines = []
    for i in range(6):
        _image(flat / f"im{i}.png", i)
        lines.append(f"im{i}.png {i % 2}")
    (flat / "flat.txt").write_text("\n".join(lines) + "\n")
    s = train(_cfg(flat, tmp_path / "out", val_data=str(flat), overrides=dict(batch_size=2)))
    assert s["classes"] == ["0", "1"] and s["train_images"] == 6 and s["val_images"] == 6
    assert load_file(tmp_path / "out" / "model_final.pth")["meta"]["class_names"] == ["0", "1"]


# --------------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------------
def test_imagenet_recipe_defaults():
    for arch, dp in (("tiny", 0.1), ("small", 0.1), ("base", 0.3), ("large", 0.5)):
        r = resolve_recipe(arch)
        assert r.drop_path == dp == DROP_PATH[arch]
        assert (r.opt, r.base_lr, r.base_batch, r.weight_decay, r.epochs, r.warmup_epochs, r.clip_grad) == (
            "adamw", 2.5e-4, 256, 0.05, 300, 70, 1.0)
        assert (r.auto_augment, r.color_jitter, r.re_prob, r.mixup, r.cutmix, r.label_smoothing) == (
            "rand-m9-n6-mstd0.5-inc1", 0.4, 0.25, 0.8, 1.0, 0.1)
    assert resolve_recipe("tiny", overrides={"batch_size": 1024}).learning_rate() == pytest.approx(1e-3)
    assert resolve_recipe("tiny", overrides={"batch_size": 1024, "lr": 3e-4}).learning_rate() == 3e-4
    short = resolve_recipe("tiny", overrides={"epochs": 30})
    assert short.warmup_epochs == pytest.approx(7.0)  # the warm-up keeps its 70/300 share


def test_finetune_recipe_and_config_file(tmp_path):
    ft = resolve_recipe("base", recipe="finetune")
    assert ft.layer_decay == 0.75 and ft.ema and ft.epochs == 30 and ft.warmup_epochs == 5 and ft.drop_path == 0.3
    cfg = tmp_path / "r.yaml"
    cfg.write_text("recipe: finetune\nepochs: 10\nmixup: 0.0\nfreeze_stages: 2\nscale: [0.5, 1.0]\n")
    r = resolve_recipe("tiny", config=cfg, overrides={"batch_size": 64})
    assert (r.name, r.epochs, r.mixup, r.freeze_stages, r.scale, r.batch_size) == (
        "finetune", 10, 0.0, 2, (0.5, 1.0), 64)
    cfg.write_text("epoch: 10\n")
    with pytest.raises(RecipeError, match="Did you mean 'epochs'"):
        resolve_recipe("tiny", config=cfg)
    cfg.write_text("epochs: ten\n")
    with pytest.raises(RecipeError, match="must be an integer"):
        resolve_recipe("tiny", config=cfg)


def test_no_weight_decay_groups_and_layer_decay():
    r = resolve_recipe("tiny", overrides={"batch_size": 256})
    model, _ = create_train_model(MODEL, 10, r, act_checkpoint=False)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_train_optimizer(model, r, r.learning_rate())
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert not any("rel_pos" in n for n in decayed) and "head.fc.weight" in decayed
    r.layer_decay = 0.75
    opt = create_train_optimizer(model, r, r.learning_rate())
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["head.fc.weight"] == 1.0 > scale["blocks.9.attn.qkv.weight"] > scale["blocks.0.attn.qkv.weight"]
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** 11)


# --------------------------------------------------------------------------------------------------------
# Resume, accumulation, activation checkpointing, AMP
# --------------------------------------------------------------------------------------------------------
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    """With the full augmentation (RandAugment, Mixup/CutMix, random erasing, drop path) and an EMA."""
    data = _folder(tmp_path / "d", {"a": 6, "b": 6})
    aug = dict(epochs=2, batch_size=4, auto_augment="rand-m9-n2-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25,
               label_smoothing=0.1, drop_path=0.1, hflip=0.5, ema=True, ema_decay=0.9)
    train(_cfg(data, tmp_path / "full", overrides=aug))
    stopped = train(_cfg(data, tmp_path / "cut", overrides=aug, stop_at_step=4))  # inside epoch 2 (3 steps each)
    assert stopped["stopped"] and not (tmp_path / "cut" / "model_final.pth").exists()
    assert load_file(tmp_path / "cut" / "last.pth")["train_state"]["step_in_epoch"] == 1
    assert cls_train.main(["--data", str(data), "--output", str(tmp_path / "cut"), "--resume", "--pretrained", "none",
                           "--config", str(_yaml(tmp_path, aug)), "--workers", "0", "--no-progress"]) == 0
    full, resumed = (_weights(tmp_path / d / "model_final.pth") for d in ("full", "cut"))
    assert _max_diff(full, resumed) < 1e-5
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    # A resume with other settings is refused.
    with pytest.raises(ResumeError, match=r"lr: saved 0.001, given 0.0005"):
        train(_cfg(data, tmp_path / "cut", overrides=dict(aug, lr=5e-4), resume=True))


def _yaml(tmp_path: Path, values: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**FAST, **values}))
    return path


def test_accumulation_and_activation_checkpointing_match_one_big_batch(tmp_path):
    data = _folder(tmp_path / "d", {"a": 4, "b": 4})
    train(_cfg(data, tmp_path / "big", overrides=dict(batch_size=8, epochs=2)))
    train(_cfg(data, tmp_path / "acc", accum_steps=2, act_checkpoint=True, overrides=dict(batch_size=8, epochs=2)))
    big, acc = _weights(tmp_path / "big" / "model_final.pth"), _weights(tmp_path / "acc" / "model_final.pth")
    # AdamW's step is about lr * sign(grad) where a gradient is near zero, so summation-order rounding moves a few
    # weights by up to ~1e-4 (30 of 23M on an AMX Xeon, none on an AMD EPYC). A wrong accumulation (steps of 4
    # images instead of 8) changes 93% of the weights by more than 1e-5 and the whole by 4e-2 relative.
    diff = _abs_diffs(big, acc)
    norm = torch.cat([v.float().flatten() for v in big.values()]).norm()
    assert float(diff.norm() / norm) < 1e-5
    assert float((diff > 1e-5).float().mean()) < 1e-5


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path):
    data = _folder(tmp_path / "d", {"a": 2, "b": 2})
    s = train(_cfg(data, tmp_path / "bf16", amp="bf16"))
    assert math.isfinite(s["records"][-1]["loss"])
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA.*--amp bf16"):
        train(_cfg(data, tmp_path / "fp16", amp="fp16", device="cpu"))


# --------------------------------------------------------------------------------------------------------
# The NaN stop and bad inputs
# --------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = _folder(tmp_path / "d", {"a": 2, "b": 2})
    out = tmp_path / "out"
    rc = cls_train.main(["--data", str(data), "--output", str(out), "--pretrained", "none", "--workers", "0",
                         "--no-progress", "--config", str(_yaml(tmp_path, dict(epochs=3, lr=1e30, clip_grad=None)))])
    assert rc == 3
    err = capsys.readouterr().err
    assert "training diverged" in err and "last good checkpoint" in err and "--resume" in err
    state = load_file(out / "last.pth")
    assert state["train_state"]["epoch"] >= 1  # saved after a finished epoch, before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "model_final.pth").exists()
    # --resume continues from that checkpoint, and diverges again with the same learning rate.
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(_cfg(data, out, resume=True, overrides=dict(epochs=3, lr=1e30, clip_grad=None)))


def test_bad_inputs(tmp_path):
    empty = _folder(tmp_path / "empty", {"a": 2, "b": 2})
    (empty / "c").mkdir()
    with pytest.raises(DatasetError, match="'c'.*hold no images"):
        prepare_data(empty)
    with pytest.raises(DatasetError, match="single class"):
        prepare_data(_folder(tmp_path / "one", {"only": 3}))
    small = _folder(tmp_path / "small", {"a": 2, "b": 2})
    _image(small / "a" / "tiny.png", 9, size=16)
    with pytest.raises(DatasetError, match=r"1 training image.*smaller than 32x32.*tiny.png \(16x16\).*upscale"):
        prepare_data(small)
    bad = _folder(tmp_path / "bad", {"a": 3, "b": 3})
    (bad / "a" / "broken.png").write_bytes(b"not an image at all")
    data = prepare_data(bad)
    assert len(data.skipped) == 1 and "broken.png" in data.skipped[0][0] and len(data.train) == 6
    s = train(_cfg(bad, tmp_path / "out_bad", overrides=dict(batch_size=2)))
    assert s["skipped_images"] == 1 and s["train_images"] == 6
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable.*--output"):
        train(_cfg(bad, blocker / "out"))
    with pytest.raises(RecipeError, match="smaller than the network's total stride"):
        train(_cfg(bad, tmp_path / "o2", overrides=dict(img_size=16)))
    with pytest.raises(DatasetError, match="larger than the training set"):
        train(_cfg(bad, tmp_path / "o3", overrides=dict(batch_size=64)))


def test_cli_errors_exit_2(tmp_path, capsys):
    one = _folder(tmp_path / "one", {"only": 3})
    assert cls_train.main(["--data", str(one), "--output", str(tmp_path / "o"), "--pretrained", "none"]) == 2
    assert "single class" in capsys.readouterr().err
    assert cls_train.main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreachable_pretrained_url_names_the_flags(tmp_path, capsys):
    data = _folder(tmp_path / "d", {"a": 2, "b": 2})
    rc = cls_train.main(["--data", str(data), "--output", str(tmp_path / "o"), "--img-size", "32",
                         "--batch-size", "4", "--pretrained", "http://127.0.0.1:9/mvitv2_t.pth", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "Could not download http://127.0.0.1:9/mvitv2_t.pth" in err and "--pretrained none" in err


def test_finetune_recipe_freezes_stages_and_saves_the_ema(tmp_path):
    data = _folder(tmp_path / "d", {"a": 2, "b": 2})
    torch.manual_seed(0)
    start, _ = create_train_model(MODEL, 2, resolve_recipe("tiny", overrides=dict(FAST)), act_checkpoint=False)
    init = tmp_path / "init.pth"
    torch.save({"model": start.state_dict()}, init)
    s = train(_cfg(data, tmp_path / "ft", recipe="finetune", pretrained=str(init),
                   overrides=dict(freeze_stages=2, epochs=2, ema_decay=0.5)))
    assert s["records"][-1]["loss"] > 0
    final = load_file(tmp_path / "ft" / "model_final.pth")
    assert final["meta"]["ema"] and final["meta"]["recipe"]["layer_decay"] == 0.75
    state = load_file(tmp_path / "ft" / "last.pth")
    raw, ema = state["model"], state["train_state"]["ema"]
    first_stage3_block = start.arch.last_block_indexes[1] + 1
    for k, v in start.state_dict().items():
        frozen = k.startswith("patch_embed.") or (k.startswith("blocks.") and int(k.split(".")[1]) < first_stage3_block)
        if frozen:
            assert torch.equal(raw[k], v), k  # stem and stages 1-2 frozen
    assert not torch.equal(raw["blocks.9.attn.qkv.weight"], start.state_dict()["blocks.9.attn.qkv.weight"])
    # model_final.pth holds the EMA, which lags the raw weights
    assert torch.equal(final["model"]["head.fc.weight"], ema["head.fc.weight"])
    assert not torch.equal(ema["head.fc.weight"], raw["head.fc.weight"])
