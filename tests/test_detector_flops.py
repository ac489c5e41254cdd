"""The zoo table's counted detector FLOPs come out of plain fvcore, recounted here for T Mask R-CNN and T Cascade.

``python tools/analyze_model.py --zoo`` wrote ``mvit_det.detection.zoo.COUNTED_GFLOPS`` (and the README's FLOPs
column) with detectron2's ``FlopCountAnalysis`` on the zoo's input photograph; this recounts the two T detectors the
same way. The count does not depend on the random weights: the box heads always run on the RPN's 1000 proposals,
and the count is taken with the score threshold at 0 so that the mask head runs on the configs' 100 detections (the
no-detection figure subtracts the mask head, which fvcore reports per module). Tolerance: 0.1 GFLOPs (the rounding
of the table); a change of input size by one 32-pixel padding step moves the T Mask R-CNN count by about 4 G.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("skimage")

from mvit_det.detection import analysis  # noqa: E402
from mvit_det.detection.zoo import DETECTORS, get_detector_card  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_readme_flops_column_is_the_zoo_cards():
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)` \| \[`[^`]+`\]\([^)]+\) \|(?:[^|]*\|){6} ([^|]+) \|", line)
        if m and m.group(1) in DETECTORS:
            rows[m.group(1)] = m.group(2).strip()
    assert set(rows) == set(DETECTORS)
    for name, card in DETECTORS.items():
        if card.published_gflops is None:
            assert card.counted_gflops is None and rows[name] == "n/p", name
            continue
        low, high = card.counted_gflops
        assert rows[name] == f"{card.published_gflops:.0f}G / {low:.0f}-{high:.0f}G", (name, rows[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mask_rcnn_mvitv2_t_3x", "cascade_mask_rcnn_mvitv2_t_3x"])
def test_counted_flops_match_the_zoo_table(name):
    card = get_detector_card(name)
    cfg, model = analysis.build_for_counting(str(card.config_path))
    inputs = analysis.test_inputs(cfg, analysis.photographs(analysis.ZOO_INPUTS))
    (count,) = analysis.count_flops(model, inputs, all_detections=True)
    assert count.input_hw == (800, 1199)  # the configs' test resize of the 640x427 photograph
    assert count.proposals == [1000] * (3 if "cascade" in name else 1) and count.detections == 100
    # plain fvcore sees the attention products (aten::matmul under tracing), nothing fused
    assert count.by_operator.get("matmul", 0) > 10e9 and "scaled_dot_product_attention" not in count.by_operator
    low, high = card.counted_gflops
    assert count.total_with(0) / 1e9 == pytest.approx(low, abs=0.1)
    assert count.total / 1e9 == pytest.approx(high, abs=0.1)


@pytest.mark.slow
def test_tool_counts_a_yacs_config(tmp_path, capsys):
    """tools/analyze_model.py reads a .yaml config (which detectron2's own tool cannot) and runs every task."""
    from tools import analyze_model

    out = tmp_path / "flops.json"
    config = str(REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn_toy.yaml")
    tasks = ["--tasks", "flop", "activation", "parameter", "structure"]
    assert analyze_model.main(["--config", config, *tasks, "-n", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Parameter count:" in printed and "GeneralizedRCNN(" in printed
    (r,) = json.loads(out.read_text()).values()
    flop = r["flop"]
    assert flop["inputs"][0]["input_hw"] == [128, 128]  # astronaut at the toy config's test size
    assert flop["max_detections"] == 20 and 0 < flop["gflops_no_detection"] < flop["gflops_max_detections"]
    assert r["mactivations"][0] > 1 and r["parameters"] > 1e7
    assert analyze_model.main(["--config", str(tmp_path / "missing.py")]) == 2
