"""Run ``tools/train_net.py`` with test instrumentation; used by tests/test_robustness_training.py only.

The instrumentation lives here, not in the package, so that production code has no test hooks. With one
process, detectron2's ``launch`` runs training in this process, so the patches below apply to it.

Environment variables:
    MVIT_TEST_DATA_LOG=FILE     append ``{"iter": i, "image_ids": [...]}`` for every training forward pass
    MVIT_TEST_KILL_SAVE=N       SIGKILL this process while writing the N-th checkpoint file (1-based), right after
                                half of its bytes reached the temporary file: a job killed in the middle of a save
"""
from __future__ import annotations

import io
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _log_data(path: str) -> None:
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.utils.events import get_event_storage

    forward = GeneralizedRCNN.forward

    def logged(self, batched_inputs):
        if self.training:
            with open(path, "a") as f:
                ids = [int(d["image_id"]) for d in batched_inputs]
                f.write(json.dumps({"iter": get_event_storage().iter, "image_ids": ids}) + "\n")
        return forward(self, batched_inputs)

    GeneralizedRCNN.forward = logged


def _kill_during_save(n: int) -> None:
    save = torch.save
    count = 0

    def dying_save(obj, f, *args, **kwargs):
        nonlocal count
        if not (hasattr(f, "write") and ".pth" in str(getattr(f, "name", ""))):
            return save(obj, f, *args, **kwargs)
        count += 1
        if count < n:
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"robustness_train_wrapper: SIGKILL while writing {f.name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save


if __name__ == "__main__":
    if os.environ.get("MVIT_TEST_DATA_LOG"):
        _log_data(os.environ["MVIT_TEST_DATA_LOG"])
    if os.environ.get("MVIT_TEST_KILL_SAVE"):
        _kill_during_save(int(os.environ["MVIT_TEST_KILL_SAVE"]))
    sys.argv = [str(REPO / "tools" / "train_net.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
