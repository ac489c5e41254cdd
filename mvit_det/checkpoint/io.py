"""Reading checkpoint files, downloading them into a cache, and writing them atomically.

Files are read without executing pickled code: PyTorch files go through ``torch.load(weights_only=True)``
and detectron2 model-zoo ``.pkl`` files through an unpickler that only accepts numpy arrays and plain
containers. A file that needs more than that gets an error explaining how to load it yourself, if you
trust it, and pass the resulting dict instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch
from torch import nn
from tqdm import tqdm

__all__ = ["DownloadError", "download", "is_url", "load_file", "save_checkpoint"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: A hash prefix in a file name, as in ``mvitv2-tiny_3rdparty_in1k_20220722-db7beeef.pth``.
HASH_PREFIX_RE = re.compile(r"-([0-9a-f]{6,64})\.")
#: ``torch.save``'s legacy (non-zip) format starts with this pickled number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded (network error, HTTP error, wrong hash, short read)."""


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays (detectron2 model-zoo ``.pkl``) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def _trust_hint(path: Path, loader: str) -> str:
    """``loader`` is a call with ``{p}`` where the path goes."""
    call = loader.format(p=repr(str(path)))
    return (
        "mvit-det only unpickles tensors, numpy arrays and plain containers. If you trust the file, load it "
        f"yourself with `ckpt = {call}` and pass the dict `ckpt` instead of the path."
    )


def _truncated(path: Path, size: int) -> ValueError:
    return ValueError(
        f"Checkpoint file {str(path)!r} is truncated or corrupt ({size} bytes). This usually comes from an "
        "interrupted download or copy: delete the file and download or copy it again."
    )


def _load_torch(path: Path, size: int) -> Any:
    if not zipfile.is_zipfile(path):  # a zip whose central directory (at the end) is missing
        raise _truncated(path, size)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"Checkpoint {str(path)!r} holds pickled objects that are not tensors ({first}). "
            + _trust_hint(path, "torch.load({p}, map_location='cpu', weights_only=False)")
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise _truncated(path, size) from e


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError:  # pragma: no cover - safetensors comes with timm
        raise ImportError(f"Reading {str(path)!r} needs the safetensors package: pip install safetensors") from None
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for short or bad files
        raise ValueError(
            f"Could not read safetensors file {str(path)!r} ({e}); it is probably truncated: download it again."
        ) from None


def _load_pickle(path: Path, head: bytes, size: int) -> Any:
    with open(path, "rb") as f:
        try:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except (EOFError, pickle.UnpicklingError) as e:
            if "refusing to unpickle" in str(e):
                raise ValueError(
                    f"Checkpoint {str(path)!r} holds pickled Python objects ({e}). "
                    + _trust_hint(path, "pickle.load(open({p}, 'rb'), encoding='latin1')")
                ) from None
            if head[:1] == b"\x80" and ("truncated" in str(e) or isinstance(e, EOFError)):
                raise _truncated(path, size) from None
            raise _not_a_checkpoint(path, head) from None
        except Exception:
            raise _not_a_checkpoint(path, head) from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # torch.save(..., _use_new_zipfile_serialization=False)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"Checkpoint {str(path)!r} holds pickled objects that are not tensors ({e}). "
                + _trust_hint(path, "torch.load({p}, map_location='cpu', weights_only=False)")
            ) from None
        except (RuntimeError, EOFError) as e:
            raise _truncated(path, size) from e
    return obj


def _not_a_checkpoint(path: Path, head: bytes) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not a checkpoint: it is neither a PyTorch file (zip), a pickle nor safetensors "
        f"(it starts with {head[:16]!r}). If it came from a web link you may have saved an HTML or error page; "
        "download the .pth/.pyth/.pkl file itself and pass its path."
    )


def load_file(path: PathLike) -> Any:
    """Load a checkpoint file of any supported kind (``.pth``/``.pyth`` zip or legacy, ``.pkl``,
    ``.safetensors``) onto the CPU. Raises FileNotFoundError / ValueError with the fix in the message.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Checkpoint file not found: {str(path)!r}. Check the path, or pass pretrained=True (or a URL) "
            "to download the published weights."
        )
    if path.is_dir():
        raise IsADirectoryError(f"Checkpoint path {str(path)!r} is a directory; pass the checkpoint file inside it.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"Checkpoint file {str(path)!r} is empty (0 bytes), probably from an interrupted download: "
            "delete it and download it again."
        )
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        return _load_torch(path, size)
    if path.suffix == ".safetensors" or (
        len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size
    ):
        return _load_safetensors(path)
    return _load_pickle(path, head, size)


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``<torch hub dir>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), shared with torch.hub and timm."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download(
    url: str,
    *,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> Path:
    """Download ``url`` into the cache (once) and return the local path.

    A cached file is reused without touching the network. When the file name carries a hash prefix
    (``name-<hex>.ext``), the SHA-256 of the download must start with it. The file is written to a
    temporary name in the cache folder and renamed only when complete, so the cache never holds a
    partial file.

    Args:
        timeout: seconds to wait for the server on connect and on every read. Kept short so that a
            machine without internet fails fast.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"URL {url!r} does not end in a file name.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / name
    if dest.is_file() and dest.stat().st_size > 0:
        logger.info("Using cached checkpoint %s", dest)
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    m = HASH_PREFIX_RE.search(name)
    expected = m.group(1) if m else None

    manual = (
        f"If this machine has no internet access, download {url} elsewhere and pass the local file: "
        f"pretrained='/path/to/{name}' (or copy it to {dest})."
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
    try:
        sha = hashlib.sha256()
        logger.info("Downloading %s to %s", url, dest)
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "mvit-det"})
            with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                fd = -1  # now owned by `out`
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress) as bar:
                    received = 0
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as e:
            raise DownloadError(f"Could not download {url}: HTTP {e.code} {e.reason}. {manual}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, DNS failure, timeout, reset
            reason = getattr(e, "reason", e)
            raise DownloadError(f"Could not download {url}: {reason}. {manual}") from None
        if total is not None and received != total:
            raise DownloadError(f"Download of {url} stopped after {received} of {total} bytes. Try again. {manual}")
        digest = sha.hexdigest()
        if expected is not None and not digest.startswith(expected):
            raise DownloadError(
                f"Downloaded {url} but its SHA-256 {digest[:16]}... does not start with {expected!r} (the hash in "
                "the file name): the file is corrupt or not the published one. Nothing was cached; try again. "
                + manual
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if fd != -1:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
_META_TYPES = (str, int, float, bool, type(None))


def _check_meta(value: Any, where: str = "meta") -> None:
    """Meta must survive ``torch.load(weights_only=True)``: plain str/number/bool/None, lists and dicts."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}.")
            _check_meta(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]")
    elif not isinstance(value, _META_TYPES):
        raise TypeError(
            f"{where} has type {type(value).__name__}; checkpoint meta may only hold str, int, float, bool, None, "
            "lists and dicts (so that the file loads with weights_only=True)."
        )


def save_checkpoint(
    state_dict_or_model: Union[Mapping[str, torch.Tensor], nn.Module],
    path: PathLike,
    meta: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``{"model": state_dict, "meta": {"format": "mvit-det", ...}}`` atomically.

    The data goes to a temporary file in the destination folder, which is then renamed over ``path``,
    so a crash never leaves a half-written checkpoint under the final name.
    """
    from .. import __version__

    sd = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    if not isinstance(sd, Mapping):
        raise TypeError(f"save_checkpoint expects a state dict or an nn.Module, got {type(sd).__name__}.")
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    full_meta = {"format": "mvit-det", "mvit_det_version": __version__}
    if meta:
        _check_meta(meta)
        full_meta.update(meta)
        full_meta["format"] = "mvit-det"
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"model": sd, "meta": full_meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
