"""Fast-path numerics on this CPU: classifier and detection trunk, fp32 and bf16, inference and training.

Imported by tests/test_cpu_paths.py, which runs :func:`check` in-process (the host's own ISA) and as
``python tests/cpu_paths_check.py`` in a subprocess capped to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``), so an AVX-512 host proves the AVX2 path too. Prints one JSON line.
"""
from __future__ import annotations

import copy
import json
import logging

import torch

from mvit_det.detection.predictor import _autocast_context
from mvit_det.models import MViTv2
from mvit_det.models import fastpath
from mvit_det.models.fastpath import cpu_info, native_bf16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def _check_model(model: MViTv2, x: torch.Tensor) -> dict:
    """Relative differences of each precision/mode against the standard fp32 ops (outputs: max; gradients: L2)."""
    def flat(out):
        return torch.cat([t.flatten() for t in out.values()]) if isinstance(out, dict) else out.flatten()

    model.eval()
    with torch.enable_grad():  # grad mode takes the standard ops: the reference for the fused path
        ref = flat(model(x)).detach()
    with torch.no_grad():
        fused = flat(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = flat(model(x))
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        cast = flat(model_bf16(x.to(torch.bfloat16)))

    # The loss is a fixed random projection of the outputs. Not their mean square: the detection trunk ends in
    # LayerNorms, whose squared outputs barely depend on their input, so the true gradient of every block is ~0 and
    # the bf16 error measured was noise on an ill-conditioned sum that changed with the thread count (0.07-0.2).
    proj = torch.randn(ref.numel(), generator=torch.Generator().manual_seed(1))
    model.train()
    model.zero_grad()
    (flat(model(x)).float() * proj).sum().backward()
    g32 = _grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flat(model(x))
    (out.float() * proj).sum().backward()
    g16 = _grads(model)
    return {
        "fused_fp32": _rel(fused, ref),
        "autocast_bf16": _rel(auto, ref),
        "autocast_dtype": str(auto.dtype),
        "bf16_model": _rel(cast, ref),
        "bf16_model_dtype": str(cast.dtype),
        "train_bf16_grad": float((g16 - g32).norm() / g32.norm()),  # relative L2: a few large entries set max()
        "train_grad_finite": bool(torch.isfinite(g32).all() and torch.isfinite(g16).all()),
    }


def check() -> dict:
    torch.manual_seed(0)
    fastpath._fallback_logged = False  # count this check's own log lines, whatever ran before it
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collect()
    logging.getLogger("mvit_det.models.fastpath").addHandler(handler)
    try:
        cls = _check_model(MViTv2("tiny", num_classes=10), torch.randn(2, 3, 96, 96))
        det = _check_model(MViTv2("tiny", detection=True), torch.randn(1, 3, 96, 128))
        with _autocast_context(torch.device("cpu"), "bf16")():  # LazyPredictor(precision="bf16") on this CPU
            predictor_autocast = torch.is_autocast_enabled("cpu")
    finally:
        logging.getLogger("mvit_det.models.fastpath").removeHandler(handler)
    fallback_logs = [r.getMessage() for r in records if "no native bf16" in r.getMessage()]
    return {"cpu": cpu_info(), "native_bf16": native_bf16(), "cls": cls, "det": det, "fallback_logs": fallback_logs,
            "predictor_bf16_autocast": predictor_autocast, "gelu_post_op": fastpath.gelu_post_op_pays()}


if __name__ == "__main__":
    print(json.dumps(check()))
