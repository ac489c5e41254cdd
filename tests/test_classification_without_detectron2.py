"""Classification needs no detectron2: it is not in install_requires, so a classification-only install lacks it.

The check runs in a fresh interpreter whose import system refuses every ``detectron2`` module.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, importlib.abc

    class NoDetectron2(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "detectron2":
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoDetectron2())
    import numpy as np
    from mvit_det import get_model, inference_model
    from mvit_det.data import load_image

    model = get_model("mvitv2-tiny_3rdparty_in1k", num_classes=3)
    result = inference_model(model, np.zeros((64, 64, 3), np.uint8))
    assert 0 <= result["pred_label"] < 3, result
    assert not any(m.split(".")[0] == "detectron2" for m in sys.modules)
    try:
        from mvit_det.data import register_coco_instances  # the COCO helpers do need it, and say so
    except ModuleNotFoundError as e:
        print("coco:", e)
    print("ok")
    """
)


def test_classification_api_imports_and_runs_without_detectron2():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["coco: No module named 'detectron2'", "ok"], proc.stdout
