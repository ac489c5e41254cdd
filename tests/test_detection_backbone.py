"""MViTv2Backbone and its yacs builders: shapes, key layout, registration, checkpointing, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import MViT, build_backbone, build_model

import mvit_det.models.mvitv2 as mvitv2_module
from mvit_det.detection import MViTv2Backbone, add_mvitv2_config, build_mvitv2_backbone
from mvit_det.detection.backbone import DET_DROP_PATH
from mvit_det.models import ARCHS

ROOT = Path(__file__).resolve().parents[1]
YACS = ROOT / "configs" / "yacs"
STAGES = ("scale2", "scale3", "scale4", "scale5")


def yacs_cfg(name: str = "mvitv2_t_maskrcnn.yaml", opts: list | None = None):
    cfg = get_cfg()
    add_mvitv2_config(cfg)
    cfg.merge_from_file(str(YACS / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + (opts or []))
    return cfg


def test_output_shape():
    bb = MViTv2Backbone("tiny")
    assert bb.output_shape() == {
        "scale2": ShapeSpec(channels=96, stride=4),
        "scale3": ShapeSpec(channels=192, stride=8),
        "scale4": ShapeSpec(channels=384, stride=16),
        "scale5": ShapeSpec(channels=768, stride=32),
    }
    assert bb.size_divisibility == 32
    sub = MViTv2Backbone("S", out_features=("scale5", "scale3"))  # listed in stage order
    assert sub.output_shape() == {"scale3": ShapeSpec(channels=192, stride=8), "scale5": ShapeSpec(channels=768, stride=32)}


def test_forward_any_input_size():
    torch.manual_seed(0)
    bb = MViTv2Backbone("tiny").eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, 100, 132))  # not a multiple of 32: every stage rounds up
    expected = {"scale2": (96, 25, 33), "scale3": (192, 13, 17), "scale4": (384, 7, 9), "scale5": (768, 4, 5)}
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == expected
    assert all(v.shape[0] == 2 and torch.isfinite(v).all() for v in out.values())


def test_yacs_build_model_pads_non_multiple_of_32_input():
    """build_model() on the yacs T Mask R-CNN; it pads a 90x130 image to 96x160 and maps the results back."""
    torch.manual_seed(0)
    model = build_model(yacs_cfg(opts=["TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]))
    model.eval()
    image = torch.randint(0, 255, (3, 90, 130)).float()
    assert model.backbone.size_divisibility == 32
    assert model.preprocess_image([{"image": image}]).tensor.shape[-2:] == (96, 160)
    with torch.no_grad():
        (result,) = model([{"image": image, "height": 45, "width": 65}])
    inst = result["instances"]
    assert inst.image_size == (45, 65) and len(inst) == 10
    assert inst.pred_masks.shape == (10, 45, 65)


def test_keys_match_detectron2_mvit():
    """Inside an FPN the parameters sit exactly where detectron2's MViT puts them."""
    model = build_backbone(yacs_cfg())
    ref = MViT(
        embed_dim=96, depth=10, num_heads=1, last_block_indexes=(0, 2, 7, 9),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    ours = {k: v.shape for k, v in model.state_dict().items() if k.startswith("bottom_up.")}
    theirs = {f"bottom_up.{k}": v.shape for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert "bottom_up.blocks.9.attn.rel_pos_h" in ours and "bottom_up.scale5_norm.weight" in ours


@pytest.mark.parametrize("window", [0, 16, 56])
def test_window_size_matches_detectron2_mvit(window):
    """window_size is detectron2's MViT(adaptive_window_size=...): 0 attends globally in every block, 16 uses smaller
    windows (the 24x28 stage-1 map: 2x2 windows, the last row and column partial), 56 (the default) one window per
    map at this size, its padding folded into one key; all give detectron2's outputs with the same weights, and 0
    differs from the default 56."""
    torch.manual_seed(0)
    kwargs = dict(
        embed_dim=96, depth=10, num_heads=1, last_block_indexes=(0, 2, 7, 9), norm_layer=partial(nn.LayerNorm, eps=1e-6)
    )
    ref = MViT(adaptive_window_size=window, **kwargs).eval()
    for p in ref.parameters():  # rel-pos tables start at zero; random values make them count
        nn.init.normal_(p, std=0.05)
    ours = MViTv2Backbone("tiny", window_size=window).eval()
    ours.load_state_dict(ref.state_dict())
    default = MViTv2Backbone("tiny").eval()
    default.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        expected, got, windowed = ref(x), ours(x), default(x)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-4), name
    if window == 0:  # at 96x112 every map is smaller than a 56-token window: padding changes the result
        assert not torch.allclose(windowed["scale5"], got["scale5"], atol=1e-3)
    yacs_backbone = build_backbone(yacs_cfg(opts=["MODEL.MVIT.WINDOW_SIZE", str(window)]))
    assert yacs_backbone.bottom_up.specs[0].window_size == window
    with pytest.raises(ValueError, match="window_size must be 0"):
        MViTv2Backbone("tiny", window_size=20)


def test_yacs_sizes_and_options():
    backbone = build_backbone(yacs_cfg("mvitv2_s_cascade.yaml"))
    bottom_up = backbone.bottom_up
    assert isinstance(bottom_up, MViTv2Backbone)
    assert bottom_up.arch == ARCHS["small"]
    assert len(bottom_up.blocks) == 16
    # DROP_PATH_RATE None: the size's recipe value, rising linearly to the last block.
    assert bottom_up.blocks[-1].drop_path.drop_prob == pytest.approx(DET_DROP_PATH["small"])
    assert list(backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]

    cfg = yacs_cfg(opts=["MODEL.MVIT.DROP_PATH_RATE", "0.3", "MODEL.MVIT.OUT_FEATURES", "['scale3', 'scale4', 'scale5']",
                         "MODEL.FPN.IN_FEATURES", "['scale3', 'scale4', 'scale5']"])
    bb = build_backbone(cfg)
    assert bb.bottom_up.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert list(bb.bottom_up.output_shape()) == ["scale3", "scale4", "scale5"]
    assert "bottom_up.scale2_norm.weight" not in bb.state_dict()


def test_retinanet_fpn_backbone():
    cfg = yacs_cfg(opts=["MODEL.BACKBONE.NAME", "build_retinanet_mvitv2_fpn_backbone",
                         "MODEL.FPN.IN_FEATURES", "['scale3', 'scale4', 'scale5']"])
    bb = build_backbone(cfg).eval()
    assert bb.output_shape() == {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(3, 8)}
    assert bb.top_block.in_feature == "p5"
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 128, 192))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"p{i}": (1, 256, -(-128 // 2**i), -(-192 // 2**i)) for i in range(3, 8)  # sizes round up
    }


def test_act_checkpoint_same_gradients(monkeypatch):
    """Recomputing blocks gives the same loss and gradients, drop path included (the RNG state is
    replayed)."""
    torch.manual_seed(0)
    plain = MViTv2Backbone("tiny", drop_path_rate=0.3).train()
    ckpt = MViTv2Backbone("tiny", drop_path_rate=0.3, act_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)  # stage-1 windows pad to 56x56 tokens, so smaller inputs cost no less

    calls = []
    real_checkpoint = mvitv2_module.checkpoint
    monkeypatch.setattr(mvitv2_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def loss_and_grads(model):
        torch.manual_seed(1)  # same drop-path draws in both runs
        loss = sum((v**2).mean() for v in model(x).values())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads(plain)
    assert calls == []
    loss_ckpt, grads_ckpt = loss_and_grads(ckpt)
    assert len(calls) == len(ckpt.blocks)  # every block really was checkpointed
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for n, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_yacs_act_checkpoint_flag():
    model = build_backbone(yacs_cfg(opts=["MODEL.MVIT.ACT_CHECKPOINT", "True"]))
    assert model.bottom_up.act_checkpoint is True


def test_wrong_size_name():
    msg = "Unknown MViTv2 size 'XL'. Valid sizes: tiny (T), small (S), base (B), large (L), huge (H)."
    with pytest.raises(ValueError, match=r"^" + msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.") + "$"):
        MViTv2Backbone("XL")
    with pytest.raises(ValueError, match=r"^cfg\.MODEL\.MVIT\.SIZE = 'XL': Unknown MViTv2 size 'XL'\. Valid sizes:"):
        build_model(yacs_cfg(opts=["MODEL.MVIT.SIZE", "XL"]))


def test_config_errors():
    with pytest.raises(ValueError, match=r"cfg\.MODEL\.MVIT\.OUT_FEATURES has unknown names \['res5'\]"):
        build_backbone(yacs_cfg(opts=["MODEL.MVIT.OUT_FEATURES", "['res5']"]))
    with pytest.raises(ValueError, match=r"cfg\.MODEL\.FPN\.IN_FEATURES .* asks for \['scale2'\], which "
                                         r"cfg\.MODEL\.MVIT\.OUT_FEATURES .* does not produce"):
        build_backbone(yacs_cfg(opts=["MODEL.MVIT.OUT_FEATURES", "['scale3', 'scale4', 'scale5']"]))
    bare = get_cfg()
    with pytest.raises(KeyError, match=r"call mvit_det\.detection\.add_mvitv2_config\(cfg\)"):
        build_mvitv2_backbone(bare, ShapeSpec(channels=3))


REGISTRATION = """
from detectron2.modeling import BACKBONE_REGISTRY
names = ("build_mvitv2_backbone", "build_mvitv2_fpn_backbone", "build_retinanet_mvitv2_fpn_backbone")
try:
    BACKBONE_REGISTRY.get("build_mvitv2_fpn_backbone")
    raise SystemExit("registered before import")
except KeyError as e:
    assert "No object named 'build_mvitv2_fpn_backbone'" in str(e), e
import mvit_det
assert not any(n in BACKBONE_REGISTRY for n in names)  # `import mvit_det` alone stays detectron2-free
{trigger}
assert all(n in BACKBONE_REGISTRY for n in names)
print("ok")
"""


@pytest.mark.parametrize("trigger", ["mvit_det.add_mvitv2_config", "import mvit_det.detection"])
def test_import_registers_builders(trigger):
    code = REGISTRATION.format(trigger=trigger)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
