"""Downloading: hash-checked, atomic, cached, and failing fast with the offline workaround.

A local http.server on 127.0.0.1 stands in for the checkpoint host; torch.hub's folder points at a
temporary directory (fixture ``ckpt_hub_dir``).
"""
import functools
import hashlib
import http.server
import re
import shutil
import socket
import threading
import time

import pytest
import torch

from mvit_det import get_model
from mvit_det.checkpoint import DownloadError, download, save_checkpoint
from mvit_det.checkpoint.io import cache_path
from mvit_det.models import MODEL_CARDS, MViTv2


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LocalServer:
    """Serves a folder over HTTP from a background thread until ``stop()``."""

    def __init__(self, folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def published(tmp_path_factory, ckpt_fill_random):
    """A random MViTv2-T checkpoint named like a release: ``<name>-<sha256 prefix>.pth``."""
    model = ckpt_fill_random(MViTv2("tiny"), 21).eval()
    folder = tmp_path_factory.mktemp("www")
    tmp = save_checkpoint(model, folder / "upload.pth")
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = tmp.rename(folder / f"mvitv2-tiny_test_in1k_20240101-{digest[:8]}.pth")
    bad_prefix = "deadbeef" if not digest.startswith("deadbeef") else "cafef00d"
    shutil.copy(good, folder / f"mvitv2-tiny_test_in1k_20240101-{bad_prefix}.pth")
    return model, folder, good.name, f"mvitv2-tiny_test_in1k_20240101-{bad_prefix}.pth"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verifies_caches_and_reuses(published, ckpt_hub_dir):
    model, folder, name, _ = published
    server = LocalServer(folder)
    try:
        first = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=f"{server.url}/{name}")
    finally:
        server.stop()
    # Keyed by the whole URL (not a published model's URL): one folder for it, the file, and no partial download.
    assert [p.relative_to(ckpt_hub_dir).as_posix() for p in ckpt_hub_dir.rglob("*")] == [
        cache_path(f"{server.url}/{name}").parent.name, cache_path(f"{server.url}/{name}").relative_to(ckpt_hub_dir).as_posix()
    ]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(first(x), expected)

    # The server is gone: the second call must come from the cache.
    second = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=f"{server.url}/{name}")
    with torch.no_grad():
        assert torch.equal(second(x), expected)


def test_wrong_hash_is_rejected_and_not_cached(published, ckpt_hub_dir):
    _, folder, _, bad = published
    server = LocalServer(folder)
    try:
        with pytest.raises(DownloadError, match=r"its SHA-256 [0-9a-f]{16}\.\.\. does not start with '(deadbeef|cafef00d)'.*Nothing was cached"):
            download(f"{server.url}/{bad}", progress=False)
    finally:
        server.stop()
    assert list(ckpt_hub_dir.iterdir()) == []


def test_http_error(published, ckpt_hub_dir):
    server = LocalServer(published[1])
    try:
        with pytest.raises(DownloadError, match=r"Could not download .*/missing-0123abcd.pth: HTTP 404"):
            download(f"{server.url}/missing-0123abcd.pth", progress=False)
    finally:
        server.stop()
    assert list(ckpt_hub_dir.iterdir()) == []


def test_no_network_fails_fast_with_the_offline_workaround(ckpt_hub_dir):
    url = f"http://127.0.0.1:{closed_port()}/mvitv2-tiny_3rdparty_in1k_20220722-db7beeef.pth"
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        get_model("mvitv2-tiny_3rdparty_in1k", pretrained=url)
    assert time.monotonic() - start < 15
    msg = str(err.value)
    assert msg.startswith(f"Could not download {url}: ")
    assert "pretrained='/path/to/mvitv2-tiny_3rdparty_in1k_20220722-db7beeef.pth'" in msg
    assert str(cache_path(url)) in msg and cache_path(url).parent.parent == ckpt_hub_dir
    assert list(ckpt_hub_dir.iterdir()) == []


def test_pretrained_true_uses_a_file_placed_in_the_cache(published, ckpt_hub_dir):
    # Offline machines can copy the published file into the cache; no network is touched.
    model, folder, name, _ = published
    card_file = re.sub(r".*/", "", MODEL_CARDS["mvitv2-tiny_3rdparty_in1k"].url)
    ckpt_hub_dir.mkdir(parents=True)
    shutil.copy(folder / name, ckpt_hub_dir / card_file)
    loaded = get_model("mvitv2-tiny_3rdparty_in1k", pretrained=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_url_without_file_name():
    with pytest.raises(ValueError, match="does not end in a file name"):
        download("http://127.0.0.1:1/", progress=False)
