"""The GPU benchmark plan (issue 16): every requested row is in it, and a CPU dry run of it works end to end."""
from __future__ import annotations

import json

import torch

from benchmarks.gpu import ROWS, plan, run
from benchmarks.runner import _count_graph_breaks


def test_plan_covers_the_requested_rows():
    rows = {(t, m, b, s, d, c) for t, m, b, s, d, c in ROWS}
    for size in ("T", "B"):
        for dtype in ("bf16", "fp16", "fp32"):
            assert ("cls", size, 256, (224, 224), dtype, False) in rows
        assert ("cls", size, 256, (224, 224), "bf16", True) in rows  # torch.compile
        assert ("cls", size, 64, (224, 224), "bf16", False) in rows
        assert ("det-backbone", size, 8, (1024, 1024), "bf16", True) in rows
    assert ("det-model", "T", 8, (800, 1333), "bf16", False) in rows
    assert ("det-train", "T", 8, (1024, 1024), "bf16", False) in rows
    gpu = plan(dry_run=False, iters=10, warmup=3)
    assert all(s.device == "cuda" and s.threads is None for s in gpu)
    dry = plan(dry_run=True, iters=10, warmup=3)
    assert all(s.device == "cpu" and s.iters == 1 and max(s.img_size) <= 128 for s in dry)


def test_dry_run_writes_json_and_markdown(tmp_path):
    eager_cls = next(i for i, r in enumerate(ROWS) if r[0] == "cls" and not r[5])
    report = run(tmp_path, dry_run=True, rows=[eager_cls])
    (cls_run,) = report["runs"]
    assert [m["name"] for m in cls_run["models"]][0] == "mvit-det"
    assert all(m["max_rel_diff"]["fp32"] < 1e-4 for m in cls_run["models"][1:])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["runs"][0]["title"] == cls_run["title"] and saved["dry_run"] is True
    assert "| implementation | img/s |" in (tmp_path / "gpu.md").read_text()


def test_graph_breaks_are_counted():
    def clean(x):
        return (x * 2).sin()

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y.sin()

    x = torch.randn(4)
    assert _count_graph_breaks(lambda: torch.compile(clean, backend="eager")(x)) == 0
    assert _count_graph_breaks(lambda: torch.compile(broken, backend="eager")(x)) >= 1


def test_budget_stops_starting_rows(tmp_path):
    report = run(tmp_path, dry_run=True, budget_s=-1.0, rows=[0, 1])
    assert report["runs"] == [] and len(report["not_run"]) == 2
    assert "time budget" in report["not_run"][0]["reason"]
