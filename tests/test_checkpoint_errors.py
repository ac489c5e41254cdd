"""Bad checkpoints fail with messages that name the file, the cause and the fix; partial loads are reported."""
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch

from mvit_det import get_model
from mvit_det.checkpoint import load_checkpoint, load_file, read_checkpoint, save_checkpoint
from mvit_det.models import MViTv2


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, ckpt_fill_random):
    """A random MViTv2-T classifier and its checkpoint in mvit-det's format."""
    model = ckpt_fill_random(MViTv2("tiny"), 11).eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth", meta={"note": "test"})
    return model, path


def meta_model(*args, **kwargs) -> MViTv2:
    """An MViTv2 on the meta device: right names and shapes, no memory, no init time."""
    with torch.device("meta"):
        return MViTv2(*args, **kwargs)


def meta_state_dict(*args, **kwargs) -> dict:
    return meta_model(*args, **kwargs).state_dict()


# --------------------------------------------------------------------------------------------
# Unreadable files
# --------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"Checkpoint file not found: '{path}'. Check the path")):
        get_model("mvitv2-tiny_3rdparty_in1k", pretrained=path)


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; pass the checkpoint file inside it"):
        load_file(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth' is empty \(0 bytes\), probably from an interrupted download"):
        read_checkpoint(tmp_path / "empty.pth")


def test_truncated_file(tiny_ckpt, tmp_path):
    data = tiny_ckpt[1].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pth' is truncated or corrupt \(\d+ bytes\).*delete the file and download"):
        get_model("mvitv2-tiny_3rdparty_in1k", pretrained=tmp_path / "cut.pth")


def test_get_model_reads_the_checkpoint_once(tiny_ckpt, monkeypatch):
    """The description and the weights come from one read of the file."""
    from mvit_det.checkpoint import loading

    reads = []
    monkeypatch.setattr(loading, "load_file", lambda path, _read=loading.load_file: reads.append(path) or _read(path))
    model = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=tiny_ckpt[1])
    assert reads == [tiny_ckpt[1]]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tiny_ckpt[0].state_dict().items())


def test_truncated_pickle(tmp_path):
    blob = pickle.dumps({"model": {"backbone.bottom_up.patch_embed.proj.weight": np.zeros((96, 3, 7, 7), np.float32)}})
    (tmp_path / "model_final.pkl").write_bytes(blob[:-100])
    with pytest.raises(ValueError, match="model_final.pkl' is truncated or corrupt"):
        load_file(tmp_path / "model_final.pkl")


@pytest.mark.parametrize("text", [b"<!DOCTYPE html><html>404 Not Found</html>", b"hello, world\n", b"{\"a\": 1}"])
def test_text_file(tmp_path, text):
    (tmp_path / "page.pth").write_bytes(text)
    with pytest.raises(ValueError, match=r"page.pth' is not a checkpoint: it is neither a PyTorch file \(zip\), a pickle"):
        load_checkpoint(MViTv2("tiny"), tmp_path / "page.pth")


class _Opaque:
    pass


def test_pickled_objects_are_refused_with_a_safe_fix(tiny_ckpt, tmp_path):
    sd = tiny_ckpt[0].state_dict()
    torch.save({"model_state": sd, "extra": _Opaque()}, tmp_path / "unsafe.pyth")
    with pytest.raises(ValueError, match=r"holds pickled Python objects, not only tensors \(it needs test_checkpoint_errors\._Opaque\).*save the weights as a plain state dict") as err:
        read_checkpoint(tmp_path / "unsafe.pyth")
    assert "weights_only" not in str(err.value)  # never advises turning it off
    # Fix 1: a plain state dict saved where the file was made.
    torch.save({"model_state": sd}, tmp_path / "plain.pyth")
    assert load_checkpoint(MViTv2("tiny"), tmp_path / "plain.pyth").complete
    # Fix 2: allow exactly the named harmless class; loading stays weights-only.
    with torch.serialization.safe_globals([_Opaque]):
        assert load_checkpoint(MViTv2("tiny"), tmp_path / "unsafe.pyth").complete


def test_not_an_mvit_checkpoint(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet.pth': This does not look like an MViTv2 checkpoint.*'conv1.weight'"):
        read_checkpoint(tmp_path / "resnet.pth")


def test_detector_with_another_backbone(tmp_path):
    d2_resnet = {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1), "roi_heads.x": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"This detectron2 checkpoint holds no MViTv2 network: its backbone is not an MViTv2 \(first weight names: 'stem.conv1.weight'\)"):
        load_checkpoint(MViTv2("tiny", detection=True), d2_resnet)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"Could not read safetensors file .*model.safetensors'.*download it again"):
        read_checkpoint(tmp_path / "model.safetensors")


def test_bad_source_type():
    with pytest.raises(TypeError, match="must be a file path, an http"):
        load_checkpoint(MViTv2("tiny"), 42)


# --------------------------------------------------------------------------------------------
# Checkpoints for another model
# --------------------------------------------------------------------------------------------
def test_wrong_size(tmp_path):
    with pytest.raises(ValueError) as err:
        load_checkpoint(MViTv2("tiny"), meta_state_dict("small"))
    msg = str(err.value)
    assert "Likely cause: wrong model size: the checkpoint looks like MViTv2-S (16 blocks, width 96), the model is MViTv2-T (10 blocks, width 96)" in msg
    assert "get_model('mvitv2-small_3rdparty_in1k', pretrained=...)" in msg
    # the lists are capped and counted
    assert re.search(r"Unexpected in the checkpoint \(\d+\): blocks\.\d+\..*, \.\.\. and \d+ more", msg)


def test_wrong_width_same_depth():
    with pytest.raises(ValueError, match=r"checkpoint looks like MViTv2-L \(48 blocks, width 144\), the model is MViTv2-B \(24 blocks"):
        load_checkpoint(meta_model("base"), meta_state_dict("large", expand_attn=False))


@pytest.mark.parametrize("ckpt_expand, model_expand", [(True, False), (False, True)])
def test_large_in1k_vs_in21k_expand_attn(ckpt_expand, model_expand):
    with pytest.raises(ValueError) as err:
        load_checkpoint(meta_model("large", expand_attn=model_expand), meta_state_dict("large", expand_attn=ckpt_expand))
    msg = str(err.value)
    assert f"Build the model with expand_attn={ckpt_expand}." in msg
    assert "the ImageNet-1k L checkpoint uses expand_attn=False" in msg
    assert "Shape mismatch" in msg and "wrong model size" not in msg


def test_cls_token_mismatch():
    with pytest.raises(ValueError, match="has a class token .*: build the model with cls_token=True"):
        load_checkpoint(MViTv2("tiny"), meta_state_dict("tiny", cls_token=True))


def test_detector_checkpoint_into_classifier(caplog):
    d2 = {"model": {f"backbone.bottom_up.{k}": v for k, v in MViTv2("tiny", detection=True).state_dict().items()}}
    with pytest.raises(ValueError, match=r"Checkpoint <dict> is from a detector \(detectron2 format\): its MViTv2 trunk has no classifier norm and head.*detection=True"):
        load_checkpoint(MViTv2("tiny"), d2)

    # strict=False initialises the trunk and says loudly which layers stay random.
    model = MViTv2("tiny")
    with caplog.at_level(logging.WARNING, logger="mvit_det"):
        report = load_checkpoint(model, d2, strict=False)
    assert report.missing == ["norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"]
    assert sorted(report.unexpected) == sorted(k.split("bottom_up.")[1] for k in d2["model"] if "_norm" in k)
    assert "4 model weights were not in the checkpoint and keep their random initialisation: norm.weight" in caplog.text


def test_detector_into_trunk_with_fewer_outputs():
    d2 = {"model": {f"backbone.bottom_up.{k}": v for k, v in meta_state_dict("tiny", detection=True).items()}}
    report = load_checkpoint(meta_model("tiny", detection=True, out_features=("scale3", "scale4", "scale5")), d2)
    assert report.complete and report.unused == ["scale2_norm.bias", "scale2_norm.weight"]


def test_features_only_model_ignores_the_head(tiny_ckpt):
    report = load_checkpoint(MViTv2("tiny", num_classes=0), tiny_ckpt[1])
    assert report.complete and report.unused == ["head.fc.bias", "head.fc.weight"]


def test_new_num_classes_needs_skip_head(tiny_ckpt):
    src_model, path = tiny_ckpt
    with pytest.raises(ValueError) as err:
        load_checkpoint(MViTv2("tiny", num_classes=10), path)
    msg = str(err.value)
    assert "classifier head size: the checkpoint has 1000 classes, the model 10" in msg
    assert "pass num_classes=10 to get_model" in msg and "skip_head=True" in msg
    assert "head.fc.weight checkpoint [1000, 768] vs model [10, 768]" in msg

    model = MViTv2("tiny", num_classes=10)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_checkpoint(model, path, skip_head=True)
    assert report.complete and report.head_skipped == ["head.fc.bias", "head.fc.weight"]
    assert all(torch.equal(v, fresh_head[k]) for k, v in model.head.state_dict().items())
    src = src_model.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items() if not k.startswith("head."))

    # get_model passes skip_head itself when num_classes differs from the card's
    tuned = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=path, num_classes=10)
    assert tuned.head.fc.out_features == 10 and torch.equal(tuned.norm.weight, src["norm.weight"])


def test_skip_head_still_requires_the_trunk():
    sd = dict(meta_state_dict("tiny"))
    del sd["blocks.3.attn.rel_pos_h"]
    with pytest.raises(ValueError, match=r"Missing from the checkpoint \(1\): blocks.3.attn.rel_pos_h"):
        load_checkpoint(MViTv2("tiny", num_classes=10), sd, skip_head=True)


def test_strict_false_partial_load_reports_everything(tiny_ckpt, caplog):
    sd = dict(torch.load(tiny_ckpt[1], weights_only=True)["model"])
    del sd["blocks.2.mlp.fc1.weight"], sd["norm.bias"]
    sd["blocks.4.attn.pool_k.weight"] = torch.zeros(192, 1, 3, 3)  # wrong shape (model: 96 channels)
    sd["something.extra"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_checkpoint(MViTv2("tiny"), sd)
    msg = str(err.value)
    assert "Missing from the checkpoint (2): blocks.2.mlp.fc1.weight, norm.bias" in msg
    assert "Unexpected in the checkpoint (1): something.extra" in msg
    assert "Shape mismatch (1): blocks.4.attn.pool_k.weight checkpoint [192, 1, 3, 3] vs model [96, 1, 3, 3]" in msg
    assert "pass strict=False" in msg

    model = MViTv2("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="mvit_det"):
        report = load_checkpoint(model, sd, strict=False)
    assert not report.complete
    assert report.missing == ["blocks.2.mlp.fc1.weight", "norm.bias"]
    assert report.unexpected == ["something.extra"]
    assert report.mismatched == [("blocks.4.attn.pool_k.weight", (192, 1, 3, 3), (96, 1, 3, 3))]
    assert len(report.loaded) == len(before) - 3
    for key in ["blocks.2.mlp.fc1.weight", "norm.bias", "blocks.4.attn.pool_k.weight"]:
        assert torch.equal(model.state_dict()[key], before[key])
        assert key in caplog.text
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert "missing (kept initialisation): 2" in report.summary()


def test_rel_pos_tables_of_another_length_are_resized(tiny_ckpt):
    sd = dict(torch.load(tiny_ckpt[1], weights_only=True)["model"])
    table = torch.randn(127, 96)  # sized for a 256x256 pre-training grid instead of 224
    sd["blocks.0.attn.rel_pos_h"] = table
    model = MViTv2("tiny")
    report = load_checkpoint(model, sd)
    assert report.complete and report.resized == [("blocks.0.attn.rel_pos_h", 127, 111)]
    expected = torch.nn.functional.interpolate(table.T[None], size=111, mode="linear")[0].T
    assert torch.allclose(model.blocks[0].attn.rel_pos_h, expected)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def test_save_checkpoint_is_atomic_and_round_trips(tiny_ckpt, tmp_path):
    model, path = tiny_ckpt
    assert [p.name for p in path.parent.iterdir()] == ["tiny.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["format"] == "mvit-det" and raw["meta"]["note"] == "test"
    sd, fmt = read_checkpoint(path)
    assert fmt == "mvit-det" and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())

    # Overwriting replaces the file in one step; a failed save leaves the old file intact.
    target = save_checkpoint({"patch_embed.proj.weight": torch.ones(1)}, tmp_path / "a" / "b.pth")
    with pytest.raises(TypeError, match=r"meta\['when'\] has type object; checkpoint meta may only hold str"):
        save_checkpoint({"x": torch.zeros(1)}, target, meta={"when": object()})
    assert torch.equal(torch.load(target, weights_only=True)["model"]["patch_embed.proj.weight"], torch.ones(1))
    assert os.listdir(target.parent) == ["b.pth"]
