"""Robustness, issue 17: data never runs code, and every download is the complete file or an error.

* YAML (yacs configs with their ``_BASE_`` chain, model config files) is read with ``yaml.safe_load``: a
  ``!!python/object/apply`` tag is a clear error and never runs (a marker file proves it).
* Checkpoints load with ``weights_only=True`` or the numpy-only unpickler, whatever their suffix; no message
  advises ``weights_only=False``.
* The download cache is keyed by the whole URL; every incomplete server answer is a ``DownloadError`` that leaves
  nothing in the cache (a local http.server on 127.0.0.1 plays the misbehaving host).
* A URL that cannot be fetched (``detectron2://``, ``http://``) gets the "download it yourself" advice.
"""
from __future__ import annotations

import http.server
import importlib
import io
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from mvit_det.checkpoint import DownloadError, download, read_checkpoint  # noqa: E402
from mvit_det.checkpoint.io import cache_path  # noqa: E402
from mvit_det.hub import ModelSpecError, load_model_config  # noqa: E402
from mvit_det.detection import MViTv2Checkpointer  # noqa: E402
from mvit_det.detection.run_config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YACS = REPO / "configs" / "yacs" / "mvitv2_t_maskrcnn.yaml"


def _tool(name: str):
    return importlib.import_module(f"tools.{name}")


# -- YAML ------------------------------------------------------------------------------------------------------
def _evil(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def test_yacs_yaml_with_a_python_tag_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    direct = tmp_path / "e.yaml"
    direct.write_text(f"_BASE_: {YACS}\nSOLVER: {{MAX_ITER: {_evil(marker)}}}\n")
    child = tmp_path / "child.yaml"  # the tag hides in a _BASE_ file
    child.write_text("_BASE_: e.yaml\nSOLVER: {MAX_ITER: 5}\n")
    for path in (direct, child):
        with pytest.raises(ValueError) as err:
            load_config(str(path))
        msg = str(err.value)
        assert f"{direct}, line 2 uses a YAML tag that would create a Python object" in msg
        assert "python/object/apply:os.system" in msg and "nothing was run" in msg
    # The command line: exit 2, one line, nothing run.
    rc = _tool("train_net").cli(["--config-file", str(child), "--eval-only"])
    assert rc == 2 and "uses a YAML tag that would create a Python object" in capsys.readouterr().err
    assert not marker.exists()
    # The same tag-free config still loads.
    direct.write_text(f"_BASE_: {YACS}\nSOLVER: {{MAX_ITER: 7}}\n")
    assert load_config(str(child)).SOLVER.MAX_ITER == 5


def test_model_config_yaml_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "marker"
    cfg = tmp_path / "model.yaml"
    cfg.write_text(f"arch: tiny\nnum_classes: {_evil(marker)}\n")
    with pytest.raises(ModelSpecError, match=r"Cannot parse model config .*model.yaml.*python/object/apply"):
        load_model_config(cfg)
    assert not marker.exists()


# -- weights_only ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_weights(mini_detector) -> dict:
    """Weights that differ from the model's own (so that a load is visible)."""
    return {k: v + 0.5 if v.is_floating_point() else v.clone() for k, v in mini_detector.state_dict().items()}


def _equal(model: nn.Module, sd: dict) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_detectron2_pkl_renamed_to_pth_loads_and_pickled_code_never_runs(mini_detector, detector_weights, tmp_path):
    detector = mini_detector
    zoo = {"model": {k: v.numpy() for k, v in detector_weights.items()}, "__author__": "Detectron2 Model Zoo"}
    renamed = tmp_path / "model_final.pth"  # a detectron2 model-zoo .pkl (numpy arrays), renamed
    renamed.write_bytes(pickle.dumps(zoo, protocol=2))
    assert not _equal(detector, detector_weights)
    MViTv2Checkpointer(detector, require_all=True).load(str(renamed))
    assert _equal(detector, detector_weights)

    marker = tmp_path / "marker"
    for name in ("evil.pkl", "evil.pth"):
        (tmp_path / name).write_bytes(pickle.dumps({"model": {"x": _Boom(marker)}, "__author__": "x"}, protocol=2))
        with pytest.raises(ValueError) as err:
            MViTv2Checkpointer(detector).load(str(tmp_path / name))
        msg = str(err.value)
        assert "holds pickled Python objects, not only tensors (it needs posix.system)" in msg
        assert "save the weights as a plain state dict" in msg and "weights_only" not in msg
    buf = io.BytesIO()
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Boom(marker)}, buf)  # a zip .pth with a code object
    (tmp_path / "evil_zip.pth").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"holds pickled Python objects") as err:
        MViTv2Checkpointer(detector).load(str(tmp_path / "evil_zip.pth"))
    assert "weights_only" not in str(err.value)
    assert not marker.exists()


# -- downloads -------------------------------------------------------------------------------------------------
def _zip_bytes(sd: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


class _Host(http.server.BaseHTTPRequestHandler):
    """Misbehaving routes, by path: ``/ok/<any>``, ``/html/``, ``/short/`` (Content-Length larger than the body),
    ``/chunked-cut/``, ``/cut/`` (no length, cut body), ``/500/``."""

    files: dict[str, bytes] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        route = self.path.split("/")[1]
        body = self.files.get(self.path, self.files.get("default", b""))
        if route == "500":
            self.send_error(500, "Internal Server Error")
            return
        self.send_response(200)
        if route == "html":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif route == "short":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
        elif route == "chunked-cut":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            part = body[: len(body) // 2]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")  # no terminating 0-chunk
        elif route == "cut":
            self.end_headers()  # no length: the body ends when the connection closes
            self.wfile.write(body[: len(body) // 2])
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.close_connection = True


@pytest.fixture
def host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        _Host.files = {}


def test_download_cache_is_keyed_by_the_whole_url(host, ckpt_hub_dir):
    a = {"patch_embed.proj.weight": torch.full((2, 3, 7, 7), 1.0)}
    b = {"patch_embed.proj.weight": torch.full((2, 3, 7, 7), 2.0)}
    _Host.files = {"/ok/a/model_final.pth": _zip_bytes(a), "/ok/b/model_final.pth": _zip_bytes(b)}
    got_a, _ = read_checkpoint(f"{host}/ok/a/model_final.pth")
    got_b, _ = read_checkpoint(f"{host}/ok/b/model_final.pth")
    assert torch.equal(got_a["patch_embed.proj.weight"], a["patch_embed.proj.weight"])
    assert torch.equal(got_b["patch_embed.proj.weight"], b["patch_embed.proj.weight"])  # not a's weights
    assert cache_path(f"{host}/ok/a/model_final.pth") != cache_path(f"{host}/ok/b/model_final.pth")
    # The published names keep torch hub's location (documented for offline copies).
    from mvit_det.models import MODEL_CARDS

    url = MODEL_CARDS["mvitv2-tiny_3rdparty_in1k"].url
    assert cache_path(url) == ckpt_hub_dir / url.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    "route, message",
    [
        ("500", r"HTTP 500"),
        ("html", r"not a complete checkpoint: the server sent a text page \(it starts with b'<!DOCTYPE"),
        ("short", r"was cut off after \d+ more bytes|stopped after \d+ of \d+ bytes"),
        ("chunked-cut", r"was cut off after \d+ more bytes \(IncompleteRead"),
        ("cut", r"not a complete checkpoint: the zip archive is cut short"),
    ],
)
def test_incomplete_server_answers_are_download_errors_and_cache_nothing(host, ckpt_hub_dir, route, message):
    _Host.files = {"default": _zip_bytes({"patch_embed.proj.weight": torch.randn(96, 3, 7, 7)})}
    url = f"{host}/{route}/model_final.pth"
    with pytest.raises(DownloadError, match=message) as err:
        download(url, progress=False)
    assert "Nothing was cached" in str(err.value)
    assert "download" in str(err.value) and "pass the local file" in str(err.value)
    assert not ckpt_hub_dir.exists() or list(ckpt_hub_dir.rglob("*")) == []
    _Host.files = {"default": _Host.files["default"]}
    assert download(f"{host}/ok/model_final.pth", progress=False).read_bytes() == _Host.files["default"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_urls_get_the_download_it_yourself_hint(mini_detector, monkeypatch, tmp_path):
    detector = mini_detector
    from detectron2.utils.file_io import Detectron2Handler

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(Detectron2Handler, "S3_DETECTRON2_PREFIX", f"{dead}/detectron2/")
    for url, resolved in [
        ("detectron2://ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth", f"{dead}/detectron2/ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth"),
        (f"{dead}/a/model_final.pth", f"{dead}/a/model_final.pth"),
    ]:  # fmt: skip
        start = time.monotonic()
        with pytest.raises(DownloadError) as err:
            MViTv2Checkpointer(detector).load(url)
        assert time.monotonic() - start < 60
        msg = str(err.value)
        assert msg.startswith(f"Could not download checkpoint {url}")
        name = resolved.rsplit("/", 1)[1]
        assert f"download {resolved} elsewhere and pass the local file: train.init_checkpoint=/path/to/{name}" in msg


def test_no_message_in_the_package_advises_weights_only_false():
    """Source-level guard for the whole class: no string in mvit_det or tools tells users to turn it off."""
    offenders = []
    for path in list((REPO / "mvit_det").rglob("*.py")) + list((REPO / "tools").glob("*.py")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "weights_only=False" in line.replace(" ", "") and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert offenders == []
