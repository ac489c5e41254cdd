"""Every foreign checkpoint layout loads into mvit-det and reproduces the reference implementation.

References run with random weights (random rel-pos tables, non-unit norms): timm (T/S/B/L), the official
``.pyth`` layout (written from the same timm weights), mmpretrain's ImageClassifier (T, also at a
non-square input size) and detectron2's MViT (T, detection outputs).
"""
import logging
import pickle
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mvit_det import get_model
from mvit_det.checkpoint import (
    convert,
    describe_state_dict,
    detect_format,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mvit_det.models import MViTv2

REPO = Path(__file__).resolve().parents[1]


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|"""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_timm(name: str, fill, seed: int) -> nn.Module:
    """A randomised timm MViTv2, created on the meta device so that its own (slow) init is skipped."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    model = model.to_empty(device="cpu")
    return fill(model, seed).eval()


def timm_to_official(timm_sd: dict, depths, *, five_d: bool = False) -> dict:
    """Write timm weights in the official ``.pyth`` layout (the inverse of timm's checkpoint filter)."""
    starts = np.cumsum((0,) + tuple(depths))
    out = {}
    for k, v in timm_sd.items():
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k)
        if m:
            rest = re.sub(r"^shortcut_proj_(attn|mlp)\.", "proj.", m.group(3))
            k = f"blocks.{starts[int(m.group(1))] + int(m.group(2))}.{rest}"
        k = k.replace("head.fc.", "head.projection.")
        if five_d and v.ndim == 4:  # PySlowFast-style (C_out, C_in, T=1, kh, kw) conv weights
            v = v.unsqueeze(2)
        out[k] = v.clone()
    return {"model_state": out, "epoch": 300, "cfg": "MODEL:\n  NUM_CLASSES: 1000\n"}


# --------------------------------------------------------------------------------------------
# 1. timm and official layouts, T/S/B/L
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "timm_name, registry_name, seed",
    [
        ("mvitv2_tiny", "mvitv2-tiny_3rdparty_in1k", 1),
        ("mvitv2_small", "mvitv2-small_3rdparty_in1k", 2),
        ("mvitv2_base", "mvitv2-base_3rdparty_in1k", 3),
        ("mvitv2_large", "mvitv2-large_3rdparty_in1k", 4),  # expand_attn=False: widens in the MLP
    ],
)
def test_timm_and_official_parity(timm_name, registry_name, seed, tmp_path, ckpt_fill_random):
    ref = build_timm(timm_name, ckpt_fill_random, seed)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(x)
    timm_sd = ref.state_dict()
    torch.save(timm_sd, tmp_path / "timm.pth")
    official = timm_to_official(timm_sd, ref.depths, five_d=timm_name == "mvitv2_tiny")
    depths, large = ref.depths, timm_name == "mvitv2_large"
    del ref
    torch.save(official, tmp_path / "official.pyth")
    del official

    model = get_model(registry_name, pretrained=tmp_path / "timm.pth")
    with torch.no_grad():
        assert rel_diff(model(x), expected) <= 1e-4
    assert read_checkpoint(tmp_path / "timm.pth")[1] == "timm"

    if large:
        # Same weights either way: equal tensors imply equal logits, and spare a second 43-GMAC forward.
        from_timm = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        report = load_checkpoint(model, tmp_path / "official.pyth")
        assert report.format == "official" and report.complete
        assert all(torch.equal(v, from_timm[k]) for k, v in model.state_dict().items())
    else:
        model = get_model(registry_name, pretrained=tmp_path / "official.pyth")
        with torch.no_grad():
            assert rel_diff(model(x), expected) <= 1e-4
    assert sum(depths) == len(model.blocks)


def test_official_five_d_weights_are_squeezed(ckpt_fill_random):
    ref = build_timm("mvitv2_tiny", ckpt_fill_random, 0)
    official = timm_to_official(ref.state_dict(), ref.depths, five_d=True)
    assert official["model_state"]["patch_embed.proj.weight"].shape == (96, 3, 1, 7, 7)
    report = load_checkpoint(MViTv2("tiny"), official)
    assert report.format == "official" and report.complete
    assert any("squeezed the temporal dimension" in n for n in report.notes)


# --------------------------------------------------------------------------------------------
# 2 + 4. mmpretrain, and an input size the 224 tables were not built for
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mmpretrain_tiny(tmp_path_factory, ckpt_fill_random):
    from mmpretrain.registry import MODELS
    import mmpretrain.models  # noqa: F401  (registers ImageClassifier, MViT, ...)

    # configs/_base_/models/mvit/mvitv2-tiny.py, minus the training-only loss / augments
    ref = MODELS.build(
        dict(
            type="ImageClassifier",
            backbone=dict(type="MViT", arch="tiny", drop_path_rate=0.1),
            neck=dict(type="GlobalAveragePooling"),
            head=dict(type="LinearClsHead", in_channels=768, num_classes=1000),
        )
    )
    ckpt_fill_random(ref, 5).eval()
    path = tmp_path_factory.mktemp("mm") / "mvitv2-tiny_mm.pth"
    torch.save({"state_dict": ref.state_dict(), "meta": {"mmpretrain_version": "1.2.0", "epoch": 300}}, path)
    ours = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=path)
    return ref, ours, path


def test_mmpretrain_parity(mmpretrain_tiny):
    ref, ours, path = mmpretrain_tiny
    assert read_checkpoint(path)[1] == "mmpretrain"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_diff(ours(x), ref(x, mode="tensor")) <= 1e-4


@pytest.mark.parametrize("hw", [(256, 320), (200, 296)])
def test_any_input_size_matches_mmpretrain(mmpretrain_tiny, hw):
    # mmpretrain resizes the 224 rel-pos tables at run time, as we do. (timm cannot be the reference
    # here: it builds its tables for one square img_size and asserts a square grid.)
    ref, ours, _ = mmpretrain_tiny
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(ours(x), ref(x, mode="tensor")) <= 1e-4


# --------------------------------------------------------------------------------------------
# 3. detectron2
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d2_tiny(ckpt_fill_random):
    from detectron2.modeling import MViT

    ref = MViT(
        embed_dim=96,
        depth=10,
        num_heads=1,
        last_block_indexes=(0, 2, 7, 9),
        drop_path_rate=0.2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return ckpt_fill_random(ref, 6).eval()


def test_detectron2_model_zoo_pkl(d2_tiny, tmp_path):
    weights = {f"backbone.bottom_up.{k}": v.numpy() for k, v in d2_tiny.state_dict().items()}
    fake = {
        "backbone.fpn_lateral2.weight": np.zeros((256, 96, 1, 1), np.float32),
        "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 1024), np.float32),
    }
    with open(tmp_path / "model_final_abc.pkl", "wb") as f:
        pickle.dump({"model": {**weights, **fake}, "__author__": "Detectron2 Model Zoo"}, f)

    ours = MViTv2("tiny", detection=True).eval()
    report = load_checkpoint(ours, tmp_path / "model_final_abc.pkl")
    assert report.format == "detectron2" and report.complete
    assert report.ignored == sorted(fake) and not report.initialized and not report.unused
    assert len(report.loaded) == len(d2_tiny.state_dict())

    x = torch.randn(1, 3, 512, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = d2_tiny(x), ours(x)
    assert list(got) == ["scale2", "scale3", "scale4", "scale5"]
    for name in expected:
        assert got[name].shape == expected[name].shape
        assert rel_diff(got[name], expected[name]) <= 1e-4, name


def test_detectron2_checkpointer_pth(d2_tiny, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    detector = nn.Module()  # the naming of a GeneralizedRCNN: backbone (FPN) -> bottom_up (MViT)
    detector.backbone = nn.Module()
    detector.backbone.bottom_up = d2_tiny
    detector.backbone.fpn_lateral2 = nn.Conv2d(96, 256, 1)
    DetectionCheckpointer(detector, save_dir=str(tmp_path)).save("model_final", iteration=10)

    ours = MViTv2("tiny", detection=True)
    report = load_checkpoint(ours, tmp_path / "model_final.pth")
    assert report.format == "detectron2" and report.complete
    assert report.ignored == ["backbone.fpn_lateral2.bias", "backbone.fpn_lateral2.weight"]
    ref_sd = d2_tiny.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in ours.state_dict().items())


def test_imagenet_checkpoint_initialises_detection_trunk(tmp_path, ckpt_fill_random, caplog):
    ref = build_timm("mvitv2_tiny", ckpt_fill_random, 7)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    classifier = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=tmp_path / "timm.pth")
    trunk = MViTv2("tiny", detection=True)
    scale_norms = {k: v.clone() for k, v in trunk.state_dict().items() if k.startswith("scale")}

    with caplog.at_level(logging.INFO, logger="mvit_det"):
        report = load_checkpoint(trunk, tmp_path / "timm.pth")
    assert report.complete and report.format == "timm"
    assert report.unused == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    assert report.initialized == sorted(scale_norms)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "keep their initialisation" in caplog.text
    cls_sd = classifier.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, scale_norms[k] if k in scale_norms else cls_sd[k]), k


# --------------------------------------------------------------------------------------------
# Format detection on minimal examples
# --------------------------------------------------------------------------------------------
T = torch.zeros(1)


@pytest.mark.parametrize(
    "obj, fmt",
    [
        ({"model": {"blocks.0.norm1.weight": T}, "meta": {"format": "mvit-det"}}, "mvit-det"),
        ({"blocks.0.norm1.weight": T, "head.fc.weight": T}, "mvit-det"),
        ({"model_state": {"blocks.0.norm1.weight": T, "head.projection.weight": T}}, "official"),
        ({"blocks.0.norm1.weight": T, "head.projection.weight": T}, "official"),
        ({"state_dict": {"backbone.blocks.0.norm1.weight": T}, "meta": {}}, "mmpretrain"),
        ({"stages.0.blocks.0.norm1.weight": T, "head.fc.weight": T}, "timm"),
        ({"state_dict": {"stages.0.blocks.0.norm1.weight": T}}, "timm"),
        ({"model": {"backbone.bottom_up.blocks.0.norm1.weight": T}, "iteration": 9}, "detectron2"),
        ({"module.stages.0.blocks.0.norm1.weight": T}, "timm"),  # DistributedDataParallel prefix
    ],
)
def test_detect_format(obj, fmt):
    assert detect_format(obj) == fmt
    assert "blocks.0.norm1.weight" in convert(obj).state_dict


def test_legacy_torch_save_format(tmp_path):
    # torch.save's pre-1.6 (non-zip) serialisation, as older .pyth files may use
    sd = {"blocks.0.attn.qkv.weight": torch.randn(288, 96), "head.projection.weight": torch.randn(1000, 768)}
    torch.save({"model_state": sd}, tmp_path / "old.pyth", _use_new_zipfile_serialization=False)
    out, fmt = read_checkpoint(tmp_path / "old.pyth")
    assert fmt == "official" and torch.equal(out["head.fc.weight"], sd["head.projection.weight"])


def test_timm_safetensors_file(tmp_path):
    # timm's Hugging Face weights are .safetensors files holding a bare timm state dict.
    from safetensors.torch import save_file

    sd = {"patch_embed.proj.weight": torch.randn(96, 3, 7, 7), "stages.1.blocks.0.shortcut_proj_attn.weight": torch.randn(192, 96),
          "stages.0.blocks.0.norm1.weight": torch.randn(96), "head.fc.weight": torch.randn(1000, 768)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    out, fmt = read_checkpoint(tmp_path / "model.safetensors")
    assert fmt == "timm"
    assert torch.equal(out["blocks.1.proj.weight"], sd["stages.1.blocks.0.shortcut_proj_attn.weight"])
    assert torch.equal(out["head.fc.weight"], sd["head.fc.weight"])


def test_timm_stage_mapping_counts_blocks_in_the_checkpoint():
    sd = {f"stages.{s}.blocks.{j}.norm1.weight": torch.full((1,), 10.0 * s + j) for s, d in enumerate((1, 2, 5, 2)) for j in range(d)}
    sd["stages.1.blocks.0.shortcut_proj_attn.weight"] = T
    sd["stages.0.blocks.0.shortcut_proj_mlp.bias"] = T
    out = convert(sd).state_dict
    assert out["blocks.3.norm1.weight"].item() == 20.0  # stage 2, block 0 follows 1 + 2 blocks
    assert out["blocks.9.norm1.weight"].item() == 31.0
    assert "blocks.1.proj.weight" in out and "blocks.0.proj.bias" in out


# --------------------------------------------------------------------------------------------
# 7. tools/convert_checkpoint.py
# --------------------------------------------------------------------------------------------
def test_convert_tool_round_trip(tmp_path, ckpt_fill_random, capsys):
    from tools import convert_checkpoint as tool

    ref = build_timm("mvitv2_tiny", ckpt_fill_random, 8)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    assert tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "ours.pth"), "--model", "T"]) == 0
    printed = capsys.readouterr().out
    for line in ["format:      timm", "blocks:      10", "width:       96", "size:        MViTv2-T (10 blocks, width 96)",
                 "cls token:   no", "num_classes: 1000", "widens:      in attention (expand_attn=True)",
                 "check:       all 242 weights load strictly into --model T"]:
        assert line in printed

    raw = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert raw["meta"]["format"] == "mvit-det" and raw["meta"]["source_format"] == "timm"
    assert raw["meta"]["size"] == "tiny" and detect_format(raw) == "mvit-det"
    assert describe_state_dict(raw["model"]).num_classes == 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind

    model = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=tmp_path / "ours.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_diff(model(x), ref(x)) <= 1e-4

    # --model checks the weights before writing: an S model refuses T weights and nothing is written.
    with pytest.raises(ValueError, match=r"the checkpoint looks like MViTv2-T \(10 blocks, width 96\), the model is MViTv2-S"):
        tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "bad.pth"), "--model", "mvitv2-small_3rdparty_in1k"])
    assert not (tmp_path / "bad.pth").exists()

    # The old spelling --arch still works, with a one-line notice.
    assert tool.main([str(tmp_path / "timm.pth"), str(tmp_path / "old.pth"), "--arch", "T"]) == 0
    captured = capsys.readouterr()
    assert "--arch is deprecated; use --model" in captured.err and "into --model T" in captured.out


def test_num_classes_equal_to_the_checkpoint_head_loads_the_head(tmp_path, monkeypatch):
    """get_model(name, pretrained=file, num_classes=N) keeps a fine-tuned N-class head (it used to compare N with
    the model card's 1000 classes and leave the head at its initialisation). It reads the head size from the
    converted weights and loads those same weights: one conversion per call."""
    import mvit_det.checkpoint.loading as loading

    torch.manual_seed(0)
    tuned = get_model("mvitv2-tiny_3rdparty_in1k", num_classes=7)
    save_checkpoint(tuned, tmp_path / "tuned.pth")
    x = torch.randn(1, 3, 64, 64)
    calls = []
    monkeypatch.setattr(loading, "convert", lambda obj: calls.append(1) or convert(obj))
    again = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=str(tmp_path / "tuned.pth"), num_classes=7)
    assert len(calls) == 1
    assert torch.equal(again(x), tuned(x))
    other = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=str(tmp_path / "tuned.pth"), num_classes=5)
    assert other.head.fc.weight.shape == (5, 768)  # another size: a new head, the trunk loaded
    assert torch.equal(other.blocks[0].attn.qkv.weight, tuned.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_num_classes_must_be_a_count(bad):
    with pytest.raises(ValueError, match=rf"num_classes must be an int >= 1 .* got {re.escape(repr(bad))}\."):
        get_model("mvitv2-tiny_3rdparty_in1k", num_classes=bad)
    assert MViTv2("tiny", num_classes=np.int64(3)).head.fc.out_features == 3


@pytest.mark.parametrize("typed, meant", [("mvitv2-tiny", "'mvitv2-tiny_3rdparty_in1k'?"),
                                          ("MViTv2_Base", "'mvitv2-base_3rdparty_in1k' or 'mvitv2-base_in21k'?")])
def test_a_short_model_name_suggests_the_full_ones(typed, meant):
    with pytest.raises(ValueError, match=re.escape(f"Unknown model {typed!r}. Did you mean {meant}")):
        get_model(typed)


def test_get_model_given_a_config_says_what_to_call(tmp_path):
    from detectron2.config import get_cfg

    with pytest.raises(TypeError, match="get_model takes a model name .* not a CfgNode.*build_predictor"):
        get_model(get_cfg())
    (tmp_path / "m.yaml").write_text("arch: tiny\n")
    with pytest.raises(ValueError, match=r"pretrained='.*m\.yaml' is a config file, not a checkpoint.*build_classifier"):
        get_model("mvitv2-tiny_3rdparty_in1k", pretrained=str(tmp_path / "m.yaml"))


def test_a_detector_saved_with_save_checkpoint_gives_its_trunk(tmp_path):
    """save_checkpoint(detector) writes the mvit-det container around detectron2's names: the trunk must load."""
    trunk = MViTv2("tiny", detection=True)
    detector = nn.Module()
    detector.backbone = nn.Module()
    detector.backbone.bottom_up = trunk
    detector.backbone.fpn_lateral2 = nn.Conv2d(96, 8, 1)
    save_checkpoint(detector, tmp_path / "detector.pth")
    fresh = MViTv2("tiny", detection=True)
    report = load_checkpoint(fresh, str(tmp_path / "detector.pth"))
    assert report.complete and len(report.loaded) == len(trunk.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trunk.state_dict().values()))
