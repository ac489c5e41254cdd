"""The MViTv2 family: sizes, parameter/FLOP counts, any input size, detection mode and input errors."""
import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from mvit_det import get_model
from mvit_det.models import ARCHS, MViTv2, get_arch
from mvit_det.utils.flops import flop_count


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Exact counts from the seed table (mmpretrain metafile; identical in timm's results).
@pytest.mark.parametrize(
    "name, params, gflops",
    [
        ("mvitv2-tiny_3rdparty_in1k", 24_173_320, 4.70),
        ("mvitv2-small_3rdparty_in1k", 34_870_216, 7.00),
        ("mvitv2-base_3rdparty_in1k", 51_472_744, 10.16),
        ("mvitv2-large_3rdparty_in1k", 217_992_952, 43.87),
    ],
)
def test_in1k_params_and_flops(name, params, gflops):
    model = get_model(name)
    assert n_params(model) == params
    flops = flop_count(model, torch.zeros(1, 3, 224, 224)).total()
    assert round(flops / 1e9, 2) == gflops
    # Plain fvcore (as detectron2's analyze_model.py uses it) gives the same figure without custom handles:
    # under tracing, attention is written with matmuls that fvcore counts (issue 15).
    plain = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    plain.unsupported_ops_warnings(False)
    assert plain.total() == flops


@pytest.mark.parametrize(
    "name, params",
    [
        # cls-token, widen-in-attention models with the 19168-way in21k head (timm *_cls / official .pyth)
        ("mvitv2-base_in21k", 65_444_032),
        ("mvitv2-large_in21k", 234_583_216),
    ],
)
def test_in21k_variants_params(name, params):
    assert n_params(get_model(name)) == params


def test_huge_in21k_params():
    # 695M parameters: count them on the meta device rather than allocating 2.8 GB.
    with torch.device("meta"):
        model = MViTv2("huge", num_classes=19168, cls_token=True)
    assert n_params(model) == 694_804_128
    with torch.device("meta"):
        model = MViTv2("huge", num_classes=1000)
    assert n_params(model) == 666_879_720
    with torch.device("meta"):
        model = MViTv2("large", num_classes=1000)
    assert n_params(model) == 213_635_368  # L in21k trunk (widens in attention) with a 1000-way head


@pytest.mark.parametrize("size, millions", [("T", 23.41), ("S", 34.10), ("B", 50.71), ("L", 212.48), ("H", 665.35)])
def test_detection_trunk_params(size, millions):
    with torch.device("meta"):
        model = MViTv2(size, detection=True)
    assert round(n_params(model) / 1e6, 2) == millions


def test_size_table_is_the_single_definition():
    assert set(ARCHS) == {"tiny", "small", "base", "large", "huge"}
    for alias, name in [("T", "tiny"), ("mvitv2_s", "small"), ("MViTv2-B", "base"), ("l", "large"), ("H", "huge")]:
        assert get_arch(alias) is ARCHS[name]
    assert ARCHS["tiny"].last_block_indexes == (0, 2, 7, 9)
    assert ARCHS["huge"].last_block_indexes == (3, 11, 71, 79)
    with pytest.raises(ValueError, match="Unknown MViTv2 size 'XL'. Valid sizes: tiny"):
        get_arch("XL")


@pytest.mark.parametrize("hw", [(224, 224), (256, 320), (200, 296), (97, 64)])
def test_any_input_size(hw):
    model = MViTv2("tiny", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
        feats = model.extract_feat(torch.randn(1, 3, *hw))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert [f.shape[1] for f in feats] == [96, 192, 384, 768]


def test_detection_mode_outputs():
    model = MViTv2("tiny", detection=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 320, 480))
    assert list(out) == ["scale2", "scale3", "scale4", "scale5"]
    for (name, t), stride, ch in zip(out.items(), (4, 8, 16, 32), (96, 192, 384, 768)):
        assert t.shape == (1, ch, 320 // stride, 480 // stride), name
    assert {n for n, _ in model.named_children() if n.endswith("_norm")} == {f"scale{i}_norm" for i in range(2, 6)}
    assert model.norm is None and model.head is None


def test_detection_mode_geometry_matches_detectron2_recipe():
    specs = MViTv2("tiny", detection=True).specs
    # windows 56 / 28 / 14 / 7 in pre-pooling tokens, halved after the first block of a stage (that
    # block still uses the previous stage's window); global in the last block of stages 2-4
    assert [s.window_size for s in specs] == [56, 56, 0, 28, 14, 14, 14, 0, 14, 0]
    assert [s.window_size // s.stride_q for s in specs][-2] == 7
    # kv stride 4/2/1/1, doubled in the global blocks of stages 2 and 3
    assert [s.stride_kv for s in specs] == [4, 2, 4, 1, 1, 1, 1, 2, 1, 1]
    assert [s.stride_q for s in specs] == [1, 2, 1, 2, 1, 1, 1, 1, 2, 1]


def test_l_in1k_widens_in_mlp():
    specs = MViTv2("large", expand_attn=False).specs
    last_of_stage1 = specs[1]
    assert (last_of_stage1.dim, last_of_stage1.dim_out, last_of_stage1.attn_dim) == (144, 288, 144)
    first_of_stage2 = specs[2]
    assert (first_of_stage2.dim, first_of_stage2.dim_out, first_of_stage2.stride_q) == (288, 288, 2)


def test_cls_token_model_runs_and_pools_token():
    model = MViTv2("tiny", num_classes=5, cls_token=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
    assert tokens.shape == (2, 1 + 7 * 7, 768)
    torch.testing.assert_close(logits, model.head(tokens[:, 0]))


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    ref = MViTv2("tiny", num_classes=4).train()
    ckpt = MViTv2("tiny", num_classes=4, act_checkpoint=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    ref(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_reset_classifier_and_no_weight_decay():
    model = MViTv2("tiny")
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    nwd = model.no_weight_decay()
    assert "blocks.0.attn.rel_pos_h" in nwd and "blocks.9.attn.rel_pos_w" in nwd and len(nwd) == 20


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(3, 224, 224), ValueError, r"4-D batch \(B, 3, H, W\).*unsqueeze\(0\)"),
        (torch.randn(1, 1, 224, 224), ValueError, r"expects 3 input channels, got 1.*convert\('RGB'\)"),
        (torch.randn(1, 4, 224, 224), ValueError, r"expects 3 input channels, got 4"),
        (torch.randn(1, 3, 16, 224), ValueError, r"16x224 is smaller than the network's total stride \(32\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, r"floating-point tensor, got torch.uint8"),
        ([[1.0]], TypeError, r"expects a torch.Tensor"),
    ],
)
def test_bad_input_errors(x, error, message):
    model = MViTv2("tiny").eval()
    with pytest.raises(error, match=message):
        model(x)


def test_detection_mode_rejects_unsupported_combinations():
    with pytest.raises(ValueError, match="class token"):
        MViTv2("tiny", detection=True, cls_token=True)
    with pytest.raises(ValueError, match="expand_attn=True"):
        MViTv2("large", detection=True, expand_attn=False)
    with pytest.raises(ValueError, match="Unknown out_features"):
        MViTv2("tiny", detection=True, out_features=("scale1",))


@pytest.mark.parametrize("detection", [False, True])
def test_fused_inference_path_matches_standard_ops(detection):
    """Without autograd on CPU, linears run through oneDNN's fused kernel; with autograd, plain F.linear."""
    torch.manual_seed(0)
    model = MViTv2("tiny", detection=detection).eval()
    with torch.no_grad():
        for blk in model.blocks:  # non-trivial rel-pos tables and norms
            blk.attn.rel_pos_h.normal_(0, 0.1)
            blk.attn.rel_pos_w.normal_(0, 0.1)
            blk.norm1.weight.normal_(1, 0.1)
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        fused = model(x)
    plain = model(x)  # grad enabled -> standard ops
    if detection:
        for name in fused:
            torch.testing.assert_close(fused[name], plain[name].detach(), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(fused, plain.detach(), rtol=1e-4, atol=1e-5)


def test_traceable_for_export():
    """Tracing (TorchScript export, detectron2's TracingAdapter, fvcore) must see standard ops only."""
    model = MViTv2("tiny", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


def _update_load_state_dict(model, other):
    model.load_state_dict(other.state_dict())


def _update_data_copy(model, other):
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q)  # bumps neither p's version counter nor its data pointer


def _update_no_grad_copy(model, other):
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)


def _update_optimizer_step(model, other):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p, q in zip(model.parameters(), other.parameters()):
        p.grad = p.detach() - q  # one SGD step with lr 1 lands exactly on `other`
    opt.step()


@pytest.mark.parametrize(
    "update", [_update_load_state_dict, _update_data_copy, _update_no_grad_copy, _update_optimizer_step]
)
@pytest.mark.parametrize("precision", ["autocast", "bf16_model"])
def test_bf16_inference_follows_weight_updates(update, precision):
    """Every way a user updates weights is seen by the next bf16 forward (issue 17, item 8): no stale casts."""
    torch.manual_seed(0)
    model = MViTv2("tiny", num_classes=10).eval()
    other = MViTv2("tiny", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)

    def run(m):
        with torch.no_grad():
            if precision == "bf16_model":
                return m(x.bfloat16()).float()
            with torch.autocast("cpu", torch.bfloat16):
                return m(x).float()

    if precision == "bf16_model":
        model.bfloat16(), other.bfloat16()
    before = run(model)
    update(model, other)
    after = run(model)
    fresh = MViTv2("tiny", num_classes=10).eval().to(next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict())  # new tensors: nothing cached from before the update
    torch.testing.assert_close(after, run(fresh))
    assert not torch.allclose(before, after)
    with torch.no_grad():
        fp32 = other.float()(x)
    torch.testing.assert_close(after, fp32, rtol=0.05, atol=0.05)  # bf16 stays close to fp32


@pytest.mark.parametrize("detection", [False, True], ids=["global", "windows"])
def test_chunked_rel_pos_bias_gives_the_same_outputs(monkeypatch, detection):
    """Inference builds a large rel-pos bias in chunks (of images, then of query rows); the outputs do not change."""
    from mvit_det.models import blocks

    torch.manual_seed(0)
    model = MViTv2("tiny", 10, detection=detection, window_size=16 if detection else 56).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero rel-pos tables, so that the bias matters
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(3, 3, 128, 160)
    calls = []
    real = blocks.attention
    monkeypatch.setattr(blocks, "attention", lambda *a: calls.append(a[3].shape) or real(*a))
    with torch.inference_mode():
        whole = model(x)
        n_whole = len(calls)
        # Tiny limits force both kinds of chunk at this input size.
        monkeypatch.setattr(blocks, "BIAS_WHOLE_BYTES", 1 << 10)
        monkeypatch.setattr(blocks, "BIAS_CHUNK_BYTES", 1 << 16)
        chunked = model(x)
    assert len(calls) > 2 * n_whole  # chunks were used
    assert any(shape[0] == 1 and shape[2] < 1000 for shape in calls[n_whole:])  # row chunks of one image
    # Same sums in another blocking: bit-identical with MKL's AVX-512 GEMMs inside SDPA, within 1.8e-6 with its
    # AVX2 ones (MKL_ENABLE_INSTRUCTIONS=AVX2); a wrong row or image chunk would differ by O(1).
    for a, b in zip(_outputs(whole), _outputs(chunked)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # Training builds the bias whole (autograd needs it anyway), with the limits still tiny.
    calls.clear()
    model.train()
    model(x)
    assert len(calls) == n_whole


def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("detection", [False, True], ids=["classifier", "trunk"])
def test_chunked_mlp_gives_the_same_outputs(monkeypatch, detection):
    """CPU inference runs a large MLP over chunks of tokens (see HIDDEN_WHOLE_BYTES); the outputs do not change, and
    autograd keeps the whole MLP."""
    from mvit_det.models import layers

    torch.manual_seed(0)
    model = MViTv2("tiny", 10, detection=detection).eval()
    x = torch.randn(2, 3, 96, 128)
    calls = []
    real = layers.linear
    monkeypatch.setattr(layers, "linear", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    with torch.inference_mode():
        whole = model(x)
        n_whole = len(calls)
        monkeypatch.setattr(layers, "HIDDEN_WHOLE_BYTES", 1 << 10)  # every MLP is "large" at this input size
        monkeypatch.setattr(layers, "HIDDEN_CHUNK_BYTES", 1 << 16)
        chunked = model(x)
    assert len(calls) > 2 * n_whole  # chunks were used
    for a, b in zip(_outputs(whole), _outputs(chunked)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    calls.clear()
    model(x)  # autograd: the limits are still tiny
    assert len(calls) == n_whole


@pytest.mark.parametrize("hw, stride", [((2, 2), 1), ((2, 2), 2), ((1, 1), 1), ((2, 1), 1), ((3, 3), 1)])
def test_tiny_map_depthwise_gradients(hw, stride):
    """On maps of at most TINY_MAP positions CPU training takes the weight gradient as a sum per kernel tap
    (oneDNN's kernel was 18-45x slower there capped to AVX2); forward and both gradients equal F.conv2d's in
    float64."""
    from mvit_det.models.fastpath import TINY_MAP, depthwise_conv

    torch.manual_seed(0)
    c = 12
    x = torch.randn(3, *hw, c, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()  # channels-last view
    w = torch.randn(c, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    out = depthwise_conv(x, w, (stride, stride), (1, 1))
    assert (type(out.grad_fn).__name__ == "_TinyMapDepthwiseBackward") == (hw[0] * hw[1] <= TINY_MAP)
    gy = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), gy)
    ref = torch.nn.functional.conv2d(x, w, None, stride, 1, groups=c)
    rgx, rgw = torch.autograd.grad(ref, (x, w), gy)
    for a, b in ((out, ref), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # inference and frozen weights keep F.conv2d
        assert depthwise_conv(x, w, (stride, stride), (1, 1)).grad_fn is None
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    out = depthwise_conv(xb, wb, (stride, stride), (1, 1))  # bf16 keeps oneDNN's fp32 accumulation
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"


def test_tiny_map_training_step_matches_plain_convs(monkeypatch):
    """A 32x32 classifier (the digits pre-training of make demo: 2x2 and 1x1 maps in the last stages) gets the
    same gradients with the per-tap weight gradient as with F.conv2d's."""
    from mvit_det.models import fastpath

    torch.manual_seed(0)
    model = MViTv2("tiny", 10, pretrain_img_size=32).double().train()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 5, 9])

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    used = []
    real = fastpath._TinyMapDepthwise.apply
    monkeypatch.setattr(fastpath._TinyMapDepthwise, "apply", lambda *a: used.append(a[0].shape) or real(*a))
    tiny = grads()
    assert len(used) >= 10  # stages 3-4: 2x2 and 1x1 maps
    monkeypatch.setattr(fastpath, "TINY_MAP", 0)
    plain = grads()
    for name in plain:
        torch.testing.assert_close(tiny[name], plain[name], rtol=0, atol=1e-10, msg=name)


def test_window_groups_split_each_axis_into_full_windows_and_the_partial_last_one():
    """Along one axis: (first window, windows, real query tokens, real key tokens) per run of same-shaped windows."""
    from mvit_det.models.blocks import _window_groups

    assert _window_groups(112, 28, 56, 14) == [(0, 2, 56, 14)]  # whole windows only
    assert _window_groups(72, 18, 56, 14) == [(0, 1, 56, 14), (1, 1, 16, 4)]  # the last one partial
    assert _window_groups(40, 10, 56, 14) == [(0, 1, 40, 10)]  # the map inside one window
    assert _window_groups(112, 27, 56, 14) == [(0, 1, 56, 14), (1, 1, 56, 13)]  # full queries, partial keys
    with pytest.raises(ValueError, match="do not"):
        _window_groups(72, 14, 56, 14)  # 2 query windows, 1 key window: the maps do not line up
