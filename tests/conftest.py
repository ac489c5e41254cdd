"""Shared pytest fixtures. Each helper's fixtures live in clearly named functions below."""
import contextlib
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn


# ---- checkpoint interop (test_checkpoint_*.py, test_download.py) ----------------------------
def _fill_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with non-trivial random values, so that parity tests can fail.

    rel-pos tables ~ N(0, 0.1) (the default zero / 0.02 init would hide indexing bugs), LayerNorm
    weights 1 + 0.1 N and biases 0.1 N, all other biases N(0, 0.02), weights N(0, 1/fan_in).
    """
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "rel_pos" in name:
                p.copy_(0.1 * noise)
            elif id(p) in norm_params:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1 or name.endswith("cls_token"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)
    return model


@pytest.fixture(scope="session")
def ckpt_fill_random():
    """``fn(model, seed=0) -> model``: randomise all parameters of a (reference) model in place."""
    return _fill_random_


@pytest.fixture
def ckpt_hub_dir(tmp_path):
    """Point torch.hub's cache (and so mvit-det's download cache) at a fresh folder for one test."""
    old = torch.hub.get_dir()
    hub = tmp_path / "hub"
    torch.hub.set_dir(str(hub))
    try:
        yield hub / "checkpoints"
    finally:
        torch.hub.set_dir(old)


# ---- log capture (test_robustness_checkpoints.py, test_robustness_datasets.py) ----------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_log(name: str, level: int | None = None):
    """The messages of logger ``name``, from a handler attached to it directly: detectron2's ``setup_logger`` may stop
    propagation to the root logger, where caplog listens. ``level`` lowers the logger's own level for the duration."""
    handler, log = _Records(), logging.getLogger(name)
    old_level = log.level
    log.addHandler(handler)
    if level is not None:
        log.setLevel(level)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _named_loggers() -> list[logging.Logger]:
    return [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]


@pytest.fixture(autouse=True)
def _restore_loggers():
    """Undo what a tool's ``main()`` run in-process did to the named loggers: detectron2's ``setup_logger`` (cached,
    so called once per process) binds a handler to the sys.stdout of that moment, pytest's capture of one test, which
    is closed by the next; a later test that logs to the same logger printed '--- Logging error ---' into its stderr.
    The root logger is pytest's to manage (its capture handlers change between a test's phases)."""
    saved = {log: (list(log.handlers), log.level, log.propagate) for log in _named_loggers()}
    yield
    for log in _named_loggers():
        handlers, level, propagate = saved.get(log, ([], logging.NOTSET, True))
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate
    d2_logger = sys.modules.get("detectron2.utils.logger")  # not imported here: some tests check who imports it
    if d2_logger is not None:
        d2_logger.setup_logger.cache_clear()


# ---- the emulated AVX2-only CPU (scripts/avx2_cpu_test.sh) ----------------------------------------------
EMULATION_SLOWDOWN = 60  # QEMU's user mode ran these tests 8-55x slower than the host (docs/performance.md)


@pytest.fixture(autouse=True, scope="session")
def _emulated_cpu_hang_guards():
    """Stretch the tests' subprocess timeouts under the emulator. They are hang guards sized for a real CPU (a
    two-process training run 600 s); emulated, a run that is merely slow would be killed as hung. Only the script's
    ``MVIT_DET_EMULATED_CPU`` turns this on; subprocess.run, check_output and Popen.communicate all pass here."""
    if not os.environ.get("MVIT_DET_EMULATED_CPU"):
        yield
        return
    communicate = subprocess.Popen.communicate

    def stretched(self, input=None, timeout=None):
        return communicate(self, input, None if timeout is None else timeout * EMULATION_SLOWDOWN)

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "communicate", stretched)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def capture_log():
    """``with capture_log(name, level=None) as messages``: what logger ``name`` logs inside the block."""
    return _capture_log


# ---- issue 17 robustness (test_robustness_security.py, test_robustness_dataloss.py) ----------------
@pytest.fixture(scope="session")
def mini_detector() -> nn.Module:
    """The smallest detector-shaped model for checkpointer tests: an MViTv2-T trunk at ``backbone.bottom_up``
    (detectron2's FPN layout) and one head layer (``roi_heads``). Tests may change its weights."""
    from mvit_det.detection import MViTv2Backbone

    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.bottom_up = MViTv2Backbone("tiny")
    model.roi_heads = nn.Linear(4, 3)
    return model


# ---- detector zoo, batched predictors and demo (test_demo_batch.py, test_predictor_options.py) -----------------
@pytest.fixture(scope="session")
def toy_detector_weights(tmp_path_factory) -> str:
    """Seeded random weights of configs/toy/mvitv2_t_maskrcnn_toy.py (MViTv2-T Mask R-CNN, 3 classes, short side
    144), saved like a detectron2 checkpoint."""
    from pathlib import Path

    from mvit_det.detection.builders import build_model
    from mvit_det.detection.run_config import load_config

    torch.manual_seed(0)
    config = Path(__file__).resolve().parents[1] / "configs" / "toy" / "mvitv2_t_maskrcnn_toy.py"
    model = build_model(load_config(str(config)))
    path = tmp_path_factory.mktemp("toy_detector") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="session")
def toy_bgr():
    """``fn(seed, h, w) -> (h, w, 3) BGR uint8``: a rendered toy-shapes image."""
    import numpy as np

    from mvit_det.data.toy import ToySpec, render_toy_image

    def make(seed: int, h: int, w: int):
        rgb, _ = render_toy_image(np.random.default_rng(seed), ToySpec(1, 1, h, w))
        return np.ascontiguousarray(rgb[:, :, ::-1])

    return make
