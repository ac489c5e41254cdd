"""Every precision on every x86 CPU (issue 11): the fast paths are chosen by probing, and the AVX2 path is
proven on any host by a subprocess capped with ONEDNN_MAX_CPU_ISA=AVX2 / ATEN_CPU_CAPABILITY=avx2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvit_det.models.fastpath import cpu_info, cpu_isa, native_bf16, onednn_linear_ok

sys.path.insert(0, str(Path(__file__).parent))
from cpu_paths_check import check  # noqa: E402

# MKL (torch.mm, ATen's F.linear) ignores the oneDNN cap and keeps AVX-512 on an Intel Xeon unless told to.
CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _assert_numerics(result: dict) -> None:
    for name in ("cls", "det"):
        r = result[name]
        assert r["fused_fp32"] < 1e-4, (name, r)
        # bf16 has 8 mantissa bits; outputs of a 10-block random network stay within a few percent
        assert r["autocast_bf16"] < 0.05 and r["bf16_model"] < 0.05, (name, r)
        assert r["autocast_dtype"] == r["bf16_model_dtype"] == "torch.bfloat16", (name, r)
        # relative L2 of bf16 autocast gradients: 0.05-0.06 here, and timm's mvitv2_tiny 0.055 in the same check
        assert r["train_grad_finite"] and r["train_bf16_grad"] < 0.1, (name, r)


@pytest.fixture(scope="module")
def capped_result() -> dict:
    env = {**os.environ, **CAPPED, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "cpu_paths_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_avx2_capped_subprocess_runs_every_precision(capped_result):
    # Never skipped: the cap works on every x86 host with oneDNN (AVX2 is the floor it caps to).
    assert capped_result["cpu"]["torch_cpu_capability"] == "AVX2"
    assert capped_result["native_bf16"] is False
    _assert_numerics(capped_result)
    # bf16 asked for without native bf16: said once per process, naming the path taken.
    assert len(capped_result["fallback_logs"]) == 1
    assert "computes in float32 and returns bfloat16" in capped_result["fallback_logs"][0]
    # The whole detector (detectron2 heads too) runs fp32 rather than emulated bf16 there.
    assert capped_result["predictor_bf16_autocast"] is False
    # With AVX2 kernels GELU runs after the GEMM rather than as oneDNN's post-op (the numerics above cover that path).
    assert capped_result["gelu_post_op"] is False
    # The caps change the kernels torch picks, not what the CPU is reported to have (the benchmark warns on that).
    assert capped_result["cpu"]["cpu_isa"] == cpu_isa()


def test_host_runs_every_precision():
    result = check()
    _assert_numerics(result)
    assert len(result["fallback_logs"]) == (0 if result["native_bf16"] else 1)
    assert result["predictor_bf16_autocast"] is result["native_bf16"]


def test_cpu_isa_agrees_with_the_kernels_torch_picked():
    # Uncapped, ATen picks its AVX-512 kernels exactly when the CPU has AVX-512 (Xeon Phi aside). Under QEMU's user
    # mode (scripts/avx2_cpu_test.sh) /proc/cpuinfo still shows the host's avx512f: the ISA must come from CPUID.
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("ATEN_CPU_CAPABILITY caps torch's kernels; test_avx2_capped_subprocess_runs_every_precision "
                    "checks the report under a cap")
    info = cpu_info()
    assert (info["cpu_isa"] in ("AVX-512", "AMX")) == (info["torch_cpu_capability"] == "AVX512"), info


def test_cpu_isa_reads_cpuid_and_falls_back_to_proc_cpuinfo(monkeypatch):
    host_proc = {"flags": "fpu sse2 avx avx2 avx512f avx512bw"}  # what an emulator passes through from its host
    for name, value in (("_is_amx_tile_supported", False), ("_is_avx512_supported", False),
                        ("_is_avx2_supported", True)):
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert cpu_isa(host_proc) == "AVX2"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_isa(host_proc) == "AMX"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch without the probes
    assert cpu_isa(host_proc) == "AVX-512"
    assert cpu_isa({"flags": "sse2 avx avx2"}) == "AVX2" and cpu_isa({}) == "other"


def test_probe_is_decided_once():
    onednn_linear_ok.cache_clear()
    first = native_bf16()
    assert onednn_linear_ok.cache_info().misses == 1
    assert native_bf16() is first and onednn_linear_ok.cache_info().hits >= 1
    assert onednn_linear_ok(torch.float32)  # fp32 oneDNN runs on every x86 CPU torch supports


@pytest.mark.skipif(not native_bf16(), reason="this CPU (or ONEDNN_MAX_CPU_ISA) has no native bf16 oneDNN kernels")
def test_native_bf16_fused_linear_matches_standard_op():
    x, w, b = torch.randn(8, 64), torch.randn(32, 64), torch.randn(32)
    out = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w.bfloat16(), b.bfloat16(), "gelu", [], "none")
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float())
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.02
