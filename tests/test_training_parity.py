"""Training numerics: the autograd path (explicit attention on CPU, see ``mvitv2.attention``) gives the same
loss and gradients as the reference implementations, for global attention (timm's classifier) and for
window attention (detectron2's ``MViT``).

float64 shows that the math is the same (agreement to 1e-9); float32 shows the precision users get. Some random
initialisations make a deep net's fp32 gradients ill-conditioned (timm and ours then differ by 1e-3 whichever
attention kernel we use, and agree to 1e-14 in float64), so the fp32 cases use a fixed, well-conditioned seed.
"""
from __future__ import annotations

import pytest
import torch

from mvit_det.detection import MViTv2Backbone
from mvit_det.models import MViTv2
from mvit_det.models.mvitv2 import attention
from benchmarks.references import detectron2_mvit, randomize_, timm_classifier
from mvit_det.checkpoint.formats import to_timm_state_dict


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    assert ours.keys() == ref.keys()
    largest = max(g.abs().max() for g in ref.values())
    for name, g in ours.items():
        if ref[name].abs().max() < 1e-6 * largest:
            # e.g. a key bias under global attention adds the same q.b to every logit of a query row, which
            # softmax ignores: the true gradient is 0 and both sides hold only rounding noise.
            assert g.abs().max() < 1e-6 * largest, name
            continue
        # relative to the tensor's largest gradient: tiny entries carry only rounding noise
        scale = ref[name].abs().max()
        torch.testing.assert_close(g / scale, ref[name] / scale, rtol=0, atol=tol, msg=name)


def _assert_same_loss_and_grads(ours, ref, x, loss_fn, dtype, rename=lambda grads: grads) -> None:
    """Backpropagate ``loss_fn(model(x))`` through both models in ``dtype``; compare losses and gradients.

    ``rename`` maps our parameter names to the reference's (identity when the keys already agree).
    """
    losses = []
    for model in (ours.to(dtype), ref.to(dtype)):
        loss = loss_fn(model(x.to(dtype)))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=TOLERANCE[dtype], atol=0)
    _assert_grads_close(
        rename({n: p.grad for n, p in ours.named_parameters()}),
        {n: p.grad for n, p in ref.named_parameters()},
        TOLERANCE[dtype],
    )


def _projection_loss(seed: int):
    """Sum of every output times a fixed random tensor of its shape (drawn at the first call): every element
    of every output reaches the loss."""
    weights: dict[str, torch.Tensor] = {}

    def loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
        if not weights:
            g = torch.Generator().manual_seed(seed)
            weights.update({k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in out.items()})
        return sum((out[k] * weights[k]).sum() for k in weights)

    return loss


def test_attention_autograd_path_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (10, 7, 7))
    bias = torch.randn(2, 3, 10, 7, generator=g)
    with torch.no_grad():
        fused = attention(q, k, v, bias)  # SDPA
    inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    explicit = attention(*inputs)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    explicit.square().sum().backward()

    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    attn = (ref_inputs[0] @ ref_inputs[1].transpose(-1, -2) / 4.0 + ref_inputs[3]).softmax(-1)
    (attn @ ref_inputs[2]).square().sum().backward()
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_detection_trunk_gradients_match_detectron2(dtype):
    """160x224 input: window attention in stages 1-3 (with padding), global attention in stage 4."""
    torch.manual_seed(1)
    ours = randomize_(MViTv2Backbone("tiny", drop_path_rate=0.0)).train()
    x = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(1))
    _assert_same_loss_and_grads(ours, detectron2_mvit(ours), x, _projection_loss(seed=2), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_classifier_gradients_match_timm(dtype):
    torch.manual_seed(1)
    ours = randomize_(MViTv2("tiny", num_classes=10)).train()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1, 7])
    _assert_same_loss_and_grads(
        ours, timm_classifier(ours), x, lambda logits: torch.nn.functional.cross_entropy(logits, target), dtype,
        rename=lambda grads: to_timm_state_dict(grads, ours.arch.depths, expand_attn=True),
    )  # fmt: skip


@pytest.mark.parametrize(
    "hw, stage1_calls",
    [
        ((96, 128), [(24 * 32, 6 * 8 + 1)]),
        ((256, 288), [(56 * 56, 14 * 14), (56 * 16, 14 * 4 + 1), (8 * 56, 2 * 14 + 1), (8 * 16, 2 * 4 + 1)]),
    ],
    ids=["map-inside-one-window", "map-over-four-windows"],
)
def test_window_queries_are_the_real_tokens(monkeypatch, hw, stage1_calls):
    """detectron2 pads a map to whole windows and attends to the padding. The padded queries' outputs would only be
    cut off again, so just the real ones are computed (a 24x32 map: 768 queries instead of 56x56), and in a window with
    padding the padded keys (zero keys and values) are one zero key whose bias is the log-sum-exp of theirs (6x8
    pooled keys + 1 instead of 14x14). A 64x72 map takes four calls, one per window shape: the full window, the last
    column (16 real columns; 4 of 14 pooled), the last row (8 real rows; 2 of 14 pooled), the corner. Loss and
    gradients are detectron2's."""
    from mvit_det.models import blocks

    shapes = []
    real = blocks.attention
    monkeypatch.setattr(blocks, "attention", lambda q, k, *a: shapes.append((q.shape[0] * q.shape[2], k.shape[2]))
                        or real(q, k, *a))  # fmt: skip
    torch.manual_seed(1)
    ours = randomize_(MViTv2Backbone("tiny", drop_path_rate=0.0)).train()
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    _assert_same_loss_and_grads(ours, detectron2_mvit(ours), x, _projection_loss(seed=2), torch.float64)
    assert shapes[: len(stage1_calls)] == stage1_calls  # (windows x) queries and keys of the first block
