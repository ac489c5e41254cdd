"""tools/cls_eval.py: the seed table's top-1/top-5 protocol, proven on photographs built here.

No ImageNet and no trained weights are available, so a random-weights MViTv2-T (with a head made to depend
on the input) is evaluated on small folders of real photographs (scikit-image's bundled samples, resized
and cropped several ways) and synthetic images, and every number the tool reports is recomputed here
independently: our own PIL preprocessing, the model called directly, our own top-k counting.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photographs")

from mvit_det.checkpoint import save_checkpoint  # noqa: E402
from mvit_det.classification.datasets import (
    DatasetError,
    EvalDataset,
    ShardSampler,
    build_eval_dataset,
    collate_skip_failed,
    find_label_file,
    limit_dataset,
)
from mvit_det.models import MViTv2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "cls_eval.py"
MODEL = "mvitv2-tiny_3rdparty_in1k"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


cls_eval = importlib.import_module("tools.cls_eval")


# ------------------------------------------------------------------------------------------------
# Independent reference: preprocessing written from the protocol, model called directly
# ------------------------------------------------------------------------------------------------
def reference_preprocess(path: Path) -> torch.Tensor:
    """Short side -> 256 (long side truncated, as mmpretrain ResizeEdge), Pillow bicubic, centre crop 224
    with offsets rounded half-to-even (mmcv CenterCrop), (x - mean) / std per RGB channel."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    nw, nh = (256, int(256 * h / w)) if w < h else (int(256 * w / h), 256)
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = round((nw - 224) / 2), round((nh - 224) / 2)
    x = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    x = (x - np.array([123.675, 116.28, 103.53], np.float32)) / np.array([58.395, 57.12, 57.375], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    return model(torch.stack([reference_preprocess(p) for p in paths]))


def topk_hits(logits: torch.Tensor, labels: list[int]) -> tuple[int, int]:
    top5 = logits.topk(5, dim=1).indices
    labels_t = torch.tensor(labels)[:, None]
    return int((top5[:, :1] == labels_t).sum()), int((top5 == labels_t).any(dim=1).sum())


# ------------------------------------------------------------------------------------------------
# Test data
# ------------------------------------------------------------------------------------------------
def _gradient(w: int, h: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=90)
    else:
        image.save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    _save(_photo("coffee"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cls_eval")


@pytest.fixture(scope="module")
def imagefolder(work) -> dict:
    """4 WordNet-id class folders, 11 files (an odd number): 10 readable (a grey JPEG, a CMYK JPEG,
    PNGs, sizes whose resize/crop roundings matter) and one truncated JPEG."""
    root = work / "imagefolder" / "val"
    c0, c1, c2, c3 = (root / w for w in WNIDS)
    files = [
        (_save(_photo("astronaut").resize((300, 260)), c0 / "ILSVRC2012_val_00000001.JPEG"), 0),
        (_save(_photo("astronaut").crop((100, 0, 300, 333)), c0 / "astronaut_portrait.png"), 0),
        (_save(_gradient(257, 300), c0 / "gradient.jpg"), 0),  # -> 256x298 (298.8 truncated, not rounded)
        (_save(_photo("coffee"), c1 / "coffee.JPEG"), 1),
        (_save(_photo("coffee").convert("L").resize((259, 256)), c1 / "coffee_grey.jpg"), 1),
        (_save(_photo("chelsea").convert("CMYK"), c2 / "chelsea_cmyk.jpg"), 2),
        (_save(_photo("chelsea").crop((150, 60, 300, 180)), c2 / "chelsea_small.png"), 2),  # upsampled
        (_save(_noise(256, 256, 0), c2 / "noise.png"), 2),
        (_save(_photo("rocket"), c3 / "rocket.jpeg"), 3),
        (_save(_photo("camera").resize((320, 240)), c3 / "camera_grey.png"), 3),  # -> 341x256, x0 round(58.5)=58
    ]
    corrupt = _truncated_jpeg(c1 / "truncated.JPEG")
    assert Image.open(files[4][0]).mode == "L" and Image.open(files[5][0]).mode == "CMYK"
    return {"root": root, "files": files, "corrupt": corrupt}


@pytest.fixture(scope="module")
def checkpoint(work, ckpt_fill_random) -> tuple[MViTv2, Path]:
    """A random MViTv2-T (every weight random, rel-pos tables and norms included, so a weight the tool
    failed to load would show) whose head depends on the input: the logits are centred on the mean feature
    of noise images and scaled to unit spread there, and classes 0..3 get a bias so that the 4-class folder
    gets some hits (top-1 and top-5 strictly between 0 and 100 %)."""
    model = ckpt_fill_random(MViTv2("tiny"), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(6, 3, 224, 224, generator=g)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(calib), pre_logits=True)
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        w = torch.randn(1000, feats.shape[1], generator=g) / sd / feats.shape[1] ** 0.5
        model.head.fc.weight.copy_(w)
        model.head.fc.bias.copy_(-(w @ mu))
        model.head.fc.bias[:4] += 16.0
    path = save_checkpoint(model, work / "mvitv2_t_random.pth")
    return model, path


@pytest.fixture(scope="module")
def reference(checkpoint, imagefolder) -> dict:
    model, _ = checkpoint
    paths = [p for p, _ in imagefolder["files"]]
    logits = reference_logits(model, paths)
    top5 = logits.topk(6, dim=1)
    # The comparison below is exact; it is only meaningful if no two ranks are near-ties that a different
    # batch composition could swap.
    gaps = (top5.values[:, :-1] - top5.values[:, 1:]).min()
    assert gaps > 1e-4, f"near-tie in the reference logits ({gaps}); change the seed"
    labels = [label for _, label in imagefolder["files"]]
    c1, c5 = topk_hits(logits, labels)
    return {"logits": logits, "top5": top5.indices[:, :5], "labels": labels, "correct1": c1, "correct5": c5}


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cls_eval.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _read_predictions(path: Path) -> dict[str, list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["path"]: [int(r["label"])] + [int(r[f"top{i}"]) for i in range(1, 6)] for r in rows}


@pytest.fixture(scope="module")
def single_run(checkpoint, imagefolder, work) -> dict:
    """One fp32 single-process run of the tool on the ImageFolder (batch 4: full and partial batches,
    2 DataLoader workers)."""
    _, ckpt = checkpoint
    out, preds = work / "single.json", work / "single.csv"
    args = [MODEL, str(ckpt), "--data", str(imagefolder["root"]), "--batch-size", "4", "--workers", "2",
            "--device", "cpu", "--out", str(out), "--predictions", str(preds)]
    code = cls_eval.main(args)
    return {"code": code, "json": json.loads(out.read_text()), "predictions": _read_predictions(preds)}


# ------------------------------------------------------------------------------------------------
# The numbers
# ------------------------------------------------------------------------------------------------
def test_imagefolder_matches_independent_computation(single_run, reference, imagefolder, checkpoint):
    assert single_run["code"] == 0
    r = single_run["json"]
    n_good = len(imagefolder["files"])
    assert (r["images"], r["evaluated"], r["skipped"]) == (n_good + 1, n_good, 1)
    assert 0 < reference["correct1"] < n_good and reference["correct1"] < reference["correct5"]  # not trivial
    assert (r["correct_top1"], r["correct_top5"]) == (reference["correct1"], reference["correct5"])
    assert r["top1"] == pytest.approx(100 * reference["correct1"] / n_good)
    assert r["top5"] == pytest.approx(100 * reference["correct5"] / n_good)
    # Per image: label and the five best classes, in order.
    root = imagefolder["root"]
    expected = {
        os.path.relpath(p, root): [label] + reference["top5"][i].tolist()
        for i, (p, label) in enumerate(imagefolder["files"])
    }
    assert single_run["predictions"] == expected
    # The truncated file is listed with its reason, and the checkpoint is identified.
    assert [s["path"] for s in r["skipped_files"]] == [str(imagefolder["corrupt"])]
    assert "truncated" in r["skipped_files"][0]["reason"]
    assert r["checkpoint_sha256"] == hashlib.sha256(checkpoint[1].read_bytes()).hexdigest()
    assert r["checkpoint"] == str(checkpoint[1]) and r["model"] == MODEL
    assert (r["device"], r["amp"], r["processes"], r["layout"]) == ("cpu", None, 1, "imagefolder")
    assert r["images_per_s"] > 0


def test_printed_summary(checkpoint, imagefolder, reference, capsys):
    code, out, err = _run(
        [MODEL, str(checkpoint[1]), "--data", str(imagefolder["root"]), "--workers", "0", "--limit", "3"], capsys
    )
    assert code == 0
    # --limit 3 of 11 files takes dataset indices 0, 3 and 7 (spread evenly). The dataset is sorted by class
    # folder then file name, so these are the files at fixture positions 0, 3 and 6, all readable.
    picked = [0, 3, 6]
    c1, c5 = topk_hits(reference["logits"][picked], [reference["labels"][i] for i in picked])
    assert f"top-1 {100 * c1 / 3:.2f}  top-5 {100 * c5 / 3:.2f}  on 3 of 3 images (0 skipped)" in out
    assert "eval:" in err and "top1=" in err  # the tqdm bar with the running top-1


def test_label_file_layout_and_model_config(checkpoint, work, capsys):
    """Flat folder + ``val.txt`` next to it (mmpretrain meta format), MODEL given as a YAML config.
    Labels are chosen from the reference logits so that the expected counts are known in advance:
    3 top-1 hits, 2 more top-5 hits (ranks 2 and 5), 2 misses."""
    model, ckpt = checkpoint
    root = work / "flat" / "val"
    images = [
        _save(_photo("astronaut"), root / "ILSVRC2012_val_00000001.JPEG"),
        _save(_photo("coffee").crop((0, 0, 400, 400)), root / "ILSVRC2012_val_00000002.JPEG"),
        _save(_photo("chelsea").resize((225, 300)), root / "ILSVRC2012_val_00000003.png"),
        _save(_photo("rocket").crop((100, 0, 400, 427)), root / "ILSVRC2012_val_00000004.JPEG"),
        _save(_noise(300, 240, 1), root / "ILSVRC2012_val_00000005.png"),
        _save(_gradient(512, 256), root / "ILSVRC2012_val_00000006.JPEG"),
        _save(_photo("camera"), root / "sub" / "ILSVRC2012_val_00000007.JPEG"),  # grey, in a sub-folder
    ]
    top6 = reference_logits(model, images).topk(6, dim=1).indices
    ranks = [0, 0, 0, 1, 4, 5, None]  # which predicted class becomes the label; None: a class outside the top 6
    labels = []
    for i, r in enumerate(ranks):
        if r is None:
            labels.append(next(c for c in range(999, -1, -1) if c not in top6[i]))
        else:
            labels.append(int(top6[i, r]))
    lines = ["# image label"] + [f"{os.path.relpath(p, root)} {label}" for p, label in zip(images, labels)]
    (root.parent / "val.txt").write_text("\n".join(lines) + "\n")
    config = work / "mvitv2_t.yaml"
    config.write_text("arch: tiny\nnum_classes: 1000\nexpand_attn: true\ncls_token: false\n")

    out_json = work / "flat.json"
    code, out, _ = _run(
        [str(config), str(ckpt), "--data", str(root), "--batch-size", "3", "--workers", "0", "--no-progress",
         "--out", str(out_json)], capsys,
    )
    assert code == 0, out
    r = json.loads(out_json.read_text())
    assert (r["layout"], r["label_file"]) == ("label-file", str(root.parent / "val.txt"))
    assert (r["images"], r["evaluated"], r["skipped"], r["correct_top1"], r["correct_top5"]) == (7, 7, 0, 3, 5)
    assert r["top1"] == pytest.approx(300 / 7) and r["top5"] == pytest.approx(500 / 7)
    assert "top-1 42.86  top-5 71.43  on 7 of 7 images (0 skipped)" in out


def test_two_processes_equal_one(single_run, checkpoint, imagefolder, work):
    """--num-procs 2 on 11 files: shards of 6 and 5, nothing padded or counted twice."""
    _, ckpt = checkpoint
    out, preds = work / "two.json", work / "two.csv"
    proc = subprocess.run(
        [sys.executable, str(TOOL), MODEL, str(ckpt), "--data", str(imagefolder["root"]), "--num-procs", "2",
         "--batch-size", "4", "--workers", "1", "--device", "cpu", "--no-progress",
         "--out", str(out), "--predictions", str(preds)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    two, one = json.loads(out.read_text()), single_run["json"]
    keys = ["images", "evaluated", "skipped", "correct_top1", "correct_top5", "top1", "top5", "skipped_files",
            "checkpoint_sha256"]
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    assert two["processes"] == 2
    assert _read_predictions(preds) == single_run["predictions"]
    assert proc.stdout.count("top-1") == 1  # only rank 0 reports


def test_torchrun_two_processes(single_run, checkpoint, imagefolder, work):
    """Launched by torchrun (torch.distributed environment variables, gloo): --limit 5 picks dataset
    indices 0, 2, 4, 6, 8 of the 11 sorted files, split 3 + 2 over the ranks."""
    _, ckpt = checkpoint
    out, preds = work / "torchrun.json", work / "torchrun.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(TOOL),
         MODEL, str(ckpt), "--data", str(imagefolder["root"]), "--limit", "5", "--batch-size", "2",
         "--workers", "0", "--no-progress", "--out", str(out), "--predictions", str(preds)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    rows = _read_predictions(preds)
    picked = ["n01440764/ILSVRC2012_val_00000001.JPEG", "n01440764/gradient.jpg", "n01443537/coffee_grey.jpg",
              "n01484850/chelsea_cmyk.jpg", "n01484850/noise.png"]
    assert rows == {p: single_run["predictions"][p] for p in picked}
    c1 = sum(row[0] == row[1] for row in rows.values())
    c5 = sum(row[0] in row[1:] for row in rows.values())
    assert (r["images"], r["evaluated"], r["skipped"], r["processes"]) == (5, 5, 0, 2)
    assert (r["correct_top1"], r["correct_top5"]) == (c1, c5)
    assert proc.stdout.count("top-1") == 1


def test_bf16_agrees_with_fp32(single_run, checkpoint, imagefolder, work, capsys):
    _, ckpt = checkpoint
    out, preds = work / "bf16.json", work / "bf16.csv"
    code, stdout, _ = _run(
        [MODEL, str(ckpt), "--data", str(imagefolder["root"]), "--amp", "bf16", "--batch-size", "4",
         "--workers", "0", "--no-progress", "--out", str(out), "--predictions", str(preds)], capsys,
    )
    assert code == 0
    r = json.loads(out.read_text())
    assert r["amp"] == "bf16" and "bf16" in stdout and r["evaluated"] == 10 and r["top1"] is not None
    bf16, fp32 = _read_predictions(preds), single_run["predictions"]
    same_top1 = sum(bf16[k][1] == fp32[k][1] for k in fp32)
    assert same_top1 >= 0.8 * len(fp32), (same_top1, len(fp32))
    print(f"bf16 vs fp32: top-1 {r['top1']:.2f} vs {single_run['json']['top1']:.2f}, "
          f"same argmax on {same_top1}/{len(fp32)} images")


# ------------------------------------------------------------------------------------------------
# Errors and exit codes
# ------------------------------------------------------------------------------------------------
def _flat(root: Path, names: list[str]) -> Path:
    for n in names:
        _save(_gradient(64, 48), root / n)
    return root


def test_empty_folder_exit_2(checkpoint, tmp_path, capsys):
    (tmp_path / "val").mkdir()
    code, _, err = _run([MODEL, str(checkpoint[1]), "--data", str(tmp_path / "val")], capsys)
    assert code == 2
    assert f"No images found in {tmp_path / 'val'}: it has no images and no sub-folders." in err
    assert "1. ImageFolder: DATA/<class>/<image>" in err and "2. Label file:" in err


def test_flat_folder_without_label_file_exit_2(checkpoint, tmp_path, capsys):
    root = _flat(tmp_path / "val", ["a.jpg", "b.jpg"])
    code, _, err = _run([MODEL, str(checkpoint[1]), "--data", str(root)], capsys)
    assert code == 2
    assert f"{root} holds 2 images directly but no label file was found" in err
    assert str(root / "val.txt") in err and str(tmp_path / "meta" / "val.txt") in err
    assert "1. ImageFolder" in err and "2. Label file" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg 0\nb.jpg\n", "val.txt line 2: expected '<image path> <integer label>', got 'b.jpg'."),
        ("a.jpg 0\n\nb.jpg cat\n", "val.txt line 3: expected '<image path> <integer label>', got 'b.jpg cat'."),
        ("a.jpg 0\nmissing.jpg 1\nb.jpg 2\n", "val.txt line 2: image 'missing.jpg' not found in"),
        ("a.jpg 0\nb.jpg 1\na.jpg 2\n", "val.txt line 3: 'a.jpg' is listed again (first on line 1)."),
        ("a.jpg -1\n", "val.txt line 1: label -1 is negative"),
        ("a.jpg 5\nb.jpg 1000\n",
         "val.txt line 2: label 1000 is out of range for a model with 1000 classes (valid labels: 0..999)."),
        ("# nothing\n", "lists no images"),
    ],
)
def test_bad_label_file_exit_2(checkpoint, tmp_path, capsys, text, message):
    root = _flat(tmp_path / "val", ["a.jpg", "b.jpg"])
    (root / "val.txt").write_text(text)  # found inside the folder
    code, _, err = _run([MODEL, str(checkpoint[1]), "--data", str(root)], capsys)
    assert code == 2, err
    assert message in err


def test_imagefolder_label_out_of_range_exit_2(checkpoint, imagefolder, tmp_path, capsys):
    config = tmp_path / "three.json"
    config.write_text(json.dumps({"arch": "tiny", "num_classes": 3}))
    code, _, err = _run([str(config), str(checkpoint[1]), "--data", str(imagefolder["root"])], capsys)
    assert code == 2
    assert "has 4 class folders, but the model has 3 classes: folder 'n01491361'" in err
    assert "out of range 0..2" in err


def test_explicit_labels_out_of_range_exit_2(checkpoint, tmp_path, capsys):
    root = _flat(tmp_path / "images", ["x.png"])
    labels = tmp_path / "labels.txt"
    labels.write_text("x.png 12\n")
    config = tmp_path / "ten.yaml"
    config.write_text("arch: tiny\nnum_classes: 10\n")
    code, _, err = _run([str(config), str(checkpoint[1]), "--data", str(root), "--labels", str(labels)], capsys)
    assert code == 2
    assert f"{labels} line 1: label 12 is out of range for a model with 10 classes (valid labels: 0..9)." in err


def test_usage_errors_exit_2(checkpoint, imagefolder, tmp_path, capsys):
    data = str(imagefolder["root"])
    code, _, err = _run(["mvitv2-tiny_in1k", str(checkpoint[1]), "--data", data], capsys)
    assert code == 2 and "Unknown model 'mvitv2-tiny_in1k'. Did you mean 'mvitv2-tiny_3rdparty_in1k'" in err
    code, _, err = _run([MODEL, str(tmp_path / "nope.pth"), "--data", data], capsys)
    assert code == 2 and f"Checkpoint {tmp_path / 'nope.pth'} does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: tiny\nnum_class: 10\n")
    code, _, err = _run([str(bad), str(checkpoint[1]), "--data", data], capsys)
    assert code == 2 and "unknown keys ['num_class']" in err
    with pytest.raises(SystemExit) as e:
        cls_eval.main([MODEL, str(checkpoint[1]), "--data", data, "--batch-size", "0"])
    assert e.value.code == 2


def test_checkpoint_that_does_not_fit_exit_1(checkpoint, imagefolder, tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text("arch: small\n")  # 16 blocks; the checkpoint is a T (10 blocks)
    code, _, err = _run([str(config), str(checkpoint[1]), "--data", str(imagefolder["root"])], capsys)
    assert code == 1
    assert "does not fit the model" in err


def test_no_readable_image_exit_1(checkpoint, tmp_path, capsys):
    root = tmp_path / "val"
    _truncated_jpeg(root / "n01440764" / "a.jpg")
    (root / "n01443537").mkdir()
    (root / "n01443537" / "b.jpg").write_bytes(b"")  # empty file
    code, out, err = _run([MODEL, str(checkpoint[1]), "--data", str(root), "--workers", "0", "--no-progress"], capsys)
    assert code == 1
    assert "on 0 of 2 images (2 skipped)" in out and "the file is empty (0 bytes)" in out
    assert "error: none of the 2 images could be read (all skipped)." in err


def test_help_documents_layouts_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cls_eval.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ["exit status:", "0  evaluated", "1  any other failure", "2  usage or data error",
                 "1. ImageFolder", "2. Label file", "--num-procs", "torchrun", "arch: tiny"]:
        assert text in out


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_covers_each_index_once(n, world):
    shards = [list(ShardSampler(n, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, world, r)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_collate_skips_failed_samples():
    img = torch.ones(3, 4, 4)
    batch = collate_skip_failed([(img, 3, 0, None), (None, 1, 1, "bad"), (2 * img, 5, 2, None)])
    assert batch.images.shape == (2, 3, 4, 4) and batch.images[1, 0, 0, 0] == 2
    assert batch.labels.tolist() == [3, 5] and batch.indices.tolist() == [0, 2]
    assert batch.failed == [(1, "bad")]
    empty = collate_skip_failed([(None, 1, 7, "bad")])
    assert empty.images.shape[0] == 0 and empty.failed == [(7, "bad")]


def test_label_file_discovery(tmp_path):
    root = _flat(tmp_path / "imagenet" / "val", ["a.jpg"])
    assert find_label_file(root) is None
    meta = tmp_path / "imagenet" / "meta" / "val.txt"  # mmpretrain's layout
    meta.parent.mkdir()
    meta.write_text("a.jpg 1\n")
    assert find_label_file(root) == meta
    ds = build_eval_dataset(root, num_classes=1000)
    assert ds.layout == "label-file" and ds.samples == [(str(root / "a.jpg"), 1)]
    (tmp_path / "imagenet" / "val.txt").write_text("a.jpg 2\n")  # next to the folder: preferred
    assert build_eval_dataset(root).samples == [(str(root / "a.jpg"), 2)]


def test_imagefolder_labels_follow_sorted_wnids(imagefolder):
    ds = build_eval_dataset(imagefolder["root"], num_classes=1000)
    assert ds.classes == WNIDS
    assert sorted(ds.samples) == sorted([(str(p), label) for p, label in imagefolder["files"]]
                                        + [(str(imagefolder["corrupt"]), 1)])
    with pytest.raises(DatasetError, match="does not exist"):
        build_eval_dataset(imagefolder["root"] / "missing")


def test_limit_spreads_over_classes():
    ds = EvalDataset("/x", [(f"/x/{i}.jpg", i // 10) for i in range(40)], "imagefolder")
    assert [label for _, label in limit_dataset(ds, 4).samples] == [0, 1, 2, 3]
    assert limit_dataset(ds, 100) is ds
