"""The side-by-side benchmark (``tools/benchmark.py``) and the reference models it and the tests compare against.

Outside the ``mvit_det`` package on purpose: it imports timm, mmpretrain and detectron2's own MViT, which a user
of mvit-det does not need.

* ``settings``: constants, ``Settings``, machine description (CPU ISA, GEMM rate), timing statistics
* ``memory``: peak memory of one step
* ``workloads``: what one step of each task is, for ours and for each reference
* ``references``: the reference models (timm, mmpretrain, detectron2) loaded with our weights
* ``runner``: round-robin timing, numerics check, fresh-process memory probe
* ``report``: the JSON report and its Markdown tables
* ``cli``: the command line
"""
from .cli import build_parser, main, settings_from_args
from .references import ReferenceUnavailable, max_rel_diff, randomize_
from .report import report_markdown, run_markdown, run_report, scaling_markdown
from .runner import build_contenders, fresh_process_peak_rss, memory_probe, run_benchmark
from .settings import Settings, gemm_gflops, hardware_info, noise_warning
from .workloads import WORKLOADS

__all__ = [
    "WORKLOADS", "ReferenceUnavailable", "Settings", "build_contenders", "build_parser", "fresh_process_peak_rss",
    "gemm_gflops", "hardware_info", "main", "max_rel_diff", "memory_probe", "noise_warning", "randomize_",
    "report_markdown", "run_benchmark", "run_markdown", "run_report", "scaling_markdown", "settings_from_args",
]
