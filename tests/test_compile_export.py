"""torch.compile and torch.export friendliness: the model traces as one graph (no graph breaks) in inference and
in training, and ``torch.export`` gives a program that computes the same outputs."""
from __future__ import annotations

import pytest
import torch

from mvit_det.detection import MViTv2Backbone
from mvit_det.models import MViTv2
from benchmarks.references import randomize_

MODELS = {
    "classifier": (lambda: MViTv2("tiny", num_classes=10), (1, 3, 224, 224)),
    "detection-trunk": (lambda: MViTv2Backbone("tiny", drop_path_rate=0.0), (1, 3, 128, 160)),
}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(MODELS))
def test_no_graph_breaks(name, grad):
    build, shape = MODELS[name]
    model = build().train(grad)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(model)(torch.randn(shape))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_same_outputs(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_(build()).eval()
    x = torch.randn(shape)
    program = torch.export.export(model, (x,)).run_decompositions()
    x2 = torch.randn(shape)  # new values, same shape: nothing input-dependent was baked in
    with torch.no_grad():
        ref, got = model(x2), program.module()(x2)
    ref, got = ({"out": ref}, {"out": got}) if torch.is_tensor(ref) else (ref, got)
    for k, r in ref.items():
        torch.testing.assert_close(got[k], r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=k)
