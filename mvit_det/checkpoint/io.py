"""Reading checkpoint files, downloading them into a cache, and writing them atomically.

Files are read without executing pickled code: PyTorch files go through ``torch.load(weights_only=True)``
and detectron2 model-zoo ``.pkl`` files through an unpickler that only accepts numpy arrays and plain
containers. A file that needs more than that is refused with the safe fix (save a plain state dict); no
message ever suggests turning ``weights_only`` off.

Loaded tensors own their memory: nothing is memory-mapped from the file, so the caller may overwrite or delete
the file it just read (``sd, _ = read_checkpoint(p); torch.save(sd, p)``). Every file written here goes
through :mod:`mvit_det.utils.atomic` (temporary file + rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import pickle
import re
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

from .. import __version__
from ..models import MODEL_CARDS
from ..utils.atomic import atomic_open, atomic_path

__all__ = ["DownloadError", "cache_path", "download", "is_url", "load_file", "offline_hint", "save_checkpoint"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: A hash prefix in a file name, as in ``mvitv2-tiny_3rdparty_in1k_20220722-db7beeef.pth``.
HASH_PREFIX_RE = re.compile(r"-([0-9a-f]{6,64})\.")
#: ``torch.save``'s legacy (non-zip) format starts with this pickled number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: ... and, pickled with protocol 2, the first bytes of such a file.
_TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + _TORCH_LEGACY_MAGIC.to_bytes(10, "little")
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


def _safe_fix(path: Path) -> str:
    return (
        "mvit-det only unpickles tensors, numpy arrays and plain containers, so that opening a checkpoint can never "
        "run code. Where the file was made, save the weights as a plain state dict "
        "(`torch.save(model.state_dict(), 'weights.pth')`, or mvit_det.checkpoint.save_checkpoint) and pass that "
        f"file instead of {str(path)!r}."
    )


def _refused_global(error: Exception) -> str:
    """The class or function torch's weights-only unpickler refused, from its (long) message."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(error)) or re.search(r"refusing to unpickle global (\S+)", str(error))
    if m:
        return m.group(1)
    lines = [ln for ln in str(error).splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip() if lines else type(error).__name__


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read as one (not a checkpoint, truncated, empty, pickled objects). A
    ValueError, so existing handlers still catch it; tools catch this one to report it in one line."""


def _pickled_objects(path: Path, error: Exception) -> ValueError:
    name = _refused_global(error)
    return CheckpointFileError(
        f"Checkpoint {str(path)!r} holds pickled Python objects, not only tensors (it needs {name}). "
        + _safe_fix(path)
        + f" If {name} is a harmless class of your own, you may instead allow exactly it with "
        f"torch.serialization.add_safe_globals([{name.rsplit('.', 1)[-1]}]) before loading."
    )


def _truncated(path: Path, size: int) -> ValueError:
    return CheckpointFileError(
        f"Checkpoint file {str(path)!r} is truncated or corrupt ({size} bytes). This usually comes from an "
        "interrupted download or copy: delete the file and download or copy it again."
    )


def _load_torch(path: Path, size: int) -> Any:
    if not zipfile.is_zipfile(path):  # a zip whose central directory (at the end) is missing
        raise _truncated(path, size)
    try:
        # No mmap: mapped tensors would die (SIGBUS) when the caller overwrites the file they came from.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _pickled_objects(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise _truncated(path, size) from e


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError:  # pragma: no cover - safetensors comes with timm
        raise ImportError(f"Reading {str(path)!r} needs the safetensors package: pip install safetensors") from None
    try:
        # From bytes, not safetensors.torch.load_file: that one maps the file, and overwriting it would kill us.
        return load_safetensors(path.read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError for short or bad files
        raise CheckpointFileError(
            f"Could not read safetensors file {str(path)!r} ({e}); it is probably truncated: download it again."
        ) from None


def _load_pickle(path: Path, head: bytes, size: int) -> Any:
    with open(path, "rb") as f:
        try:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except (EOFError, pickle.UnpicklingError) as e:
            if "refusing to unpickle" in str(e):
                raise _pickled_objects(path, e) from None
            if head[:1] == b"\x80" and ("truncated" in str(e) or isinstance(e, EOFError)):
                raise _truncated(path, size) from None
            raise _not_a_checkpoint(path, head) from None
        except Exception:
            raise _not_a_checkpoint(path, head) from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # torch.save(..., _use_new_zipfile_serialization=False)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _pickled_objects(path, e) from None
        except (RuntimeError, EOFError) as e:
            raise _truncated(path, size) from e
    return obj


def _not_a_checkpoint(path: Path, head: bytes) -> ValueError:
    return CheckpointFileError(
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
        raise CheckpointFileError(
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


def _published_urls() -> set[str]:
    return {card.url for card in MODEL_CARDS.values()}


def cache_path(url: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where :func:`download` keeps ``url``.

    The published checkpoints (``mvit_det.models.MODEL_CARDS``) keep torch hub's layout,
    ``<cache>/<file name>``, shared with torch.hub and timm and documented for offline copies. Any other URL gets
    a folder named after a hash of the whole URL, ``<cache>/url-<sha256(url)[:16]>/<file name>``, so that
    ``http://h/a/model_final.pth`` and ``http://h/b/model_final.pth`` never share an entry.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"URL {url!r} does not end in a file name.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if url in _published_urls():
        return cache / name
    return cache / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}" / name


def offline_hint(url: str, dest: Optional[Path] = None,
                 setting: str = "pretrained='/path/to/{name}' in Python, --weights /path/to/{name} on the command "
                                "line") -> str:  # fmt: skip
    """The "download it yourself and pass the file" advice, for every URL the project resolves."""
    name = os.path.basename(urlparse(url).path) or "the file"
    where = f" (or copy it to {dest})" if dest is not None else ""
    return (
        f"If this machine has no internet access, download {url} elsewhere and pass the local file: "
        f"{setting.format(name=name)}{where}."
    )


def _incomplete_reason(path: Path, size: int) -> Optional[str]:
    """Why the downloaded file is not a complete checkpoint (an error page, a cut body), or None if it looks whole.

    Cheap checks of the file's structure, for servers that send neither a Content-Length nor a hash in the name:
    a zip ends with its central directory, a pickle with the STOP opcode, and safetensors' header gives the size.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(max(0, size - 1))
        last = f.read(1)
    if size == 0:
        return "the server sent an empty body"
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else "the zip archive is cut short (its central directory is missing)"
    if len(head) > 8 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        if header + 8 > size:
            return "the safetensors header is cut short"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                entries = json.loads(f.read(header))
            end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "the safetensors header is not valid"
        return None if 8 + header + end == size else f"the safetensors data end at byte {8 + header + end}, not {size}"
    if head[:1] == b"\x80":
        if head.startswith(_TORCH_LEGACY_HEAD):  # legacy torch.save: pickles and raw data, checked when loaded
            return None
        return None if last == b"." else "the pickle is cut short (it does not end with the STOP opcode)"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{"):
        return f"the server sent a text page (it starts with {head!r}), probably an error or login page"
    return f"it is not a checkpoint (it starts with {head!r})"


def download(
    url: str,
    *,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    timeout: float = 10.0,
) -> Path:
    """Download ``url`` into the cache (once) and return the local path (see :func:`cache_path`).

    A cached file is reused without touching the network. When the file name carries a hash prefix
    (``name-<hex>.ext``), the SHA-256 of the download must start with it. Any answer that is not the complete
    file raises ``DownloadError`` and leaves nothing in the cache: an HTTP error status, an HTML/JSON error page,
    a body shorter than its Content-Length, a chunked body cut off, a connection dropped mid-way, or a file whose
    structure is cut short. The file is written to a temporary name in the cache folder and renamed only when
    complete and checked.

    Args:
        timeout: seconds to wait for the server on connect and on every read. Kept short so that a
            machine without internet fails fast.
    """
    dest = cache_path(url, cache_dir)
    name = dest.name
    if dest.is_file() and dest.stat().st_size > 0:
        logger.info("Using cached checkpoint %s", dest)
        return dest
    m = HASH_PREFIX_RE.search(name)
    expected = m.group(1) if m else None
    manual = offline_hint(url, dest)
    try:
        with atomic_path(dest) as tmp:
            sha = hashlib.sha256()
            logger.info("Downloading %s to %s", url, dest)
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "mvit-det"})
                with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
                    status = getattr(resp, "status", 200)
                    if status != 200:
                        raise DownloadError(
                            f"Could not download {url}: the server answered HTTP {status}, not 200. Nothing was cached. "
                            + manual
                        )
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    received = 0
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress) as bar:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            sha.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except urllib.error.HTTPError as e:
                raise DownloadError(f"Could not download {url}: HTTP {e.code} {e.reason}. Nothing was cached. {manual}") from None
            except http.client.IncompleteRead as e:  # Content-Length not reached, or a chunked body cut off
                raise DownloadError(
                    f"Download of {url} was cut off after {len(e.partial)} more bytes ({e}). Nothing was cached; "
                    f"try again. {manual}"
                ) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, DNS, timeout, reset
                reason = getattr(e, "reason", None) or e
                raise DownloadError(f"Could not download {url}: {reason}. Nothing was cached. {manual}") from None
            if total is not None and received != total:
                raise DownloadError(
                    f"Download of {url} stopped after {received} of {total} bytes. Nothing was cached; try again. "
                    + manual
                )
            digest = sha.hexdigest()
            if expected is not None and not digest.startswith(expected):
                raise DownloadError(
                    f"Downloaded {url} but its SHA-256 {digest[:16]}... does not start with {expected!r} (the hash "
                    "in the file name): the file is corrupt or not the published one. Nothing was cached; try "
                    "again. " + manual
                )
            reason = _incomplete_reason(tmp, received)
            if reason is not None:
                raise DownloadError(
                    f"Downloaded {url} ({received} bytes), but it is not a complete checkpoint: {reason}. Nothing "
                    f"was cached. Check the URL (a link to a web page instead of the file?) and try again. {manual}"
                )
    finally:
        with contextlib.suppress(OSError):
            if dest.parent != (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()):
                dest.parent.rmdir()  # the URL's own folder, when the download failed (only removed if empty)
    return dest


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

    The data goes to a temporary file in the destination folder, which is then renamed over ``path``
    (:func:`mvit_det.utils.atomic.atomic_open`), so a crash never leaves a half-written checkpoint under the final
    name, and a process still reading the old file keeps it whole.
    """
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
    with atomic_open(path, "wb") as f:
        torch.save({"model": sd, "meta": full_meta}, f)
    return path
