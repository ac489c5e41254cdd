"""Read any image a user is likely to hand us as an 8-bit RGB ``PIL.Image``.

``load_image`` is the single entry point used by classification inference, the detection predictor and
the evaluation tools, so that every part of the project accepts the same inputs and fails with the same
clear messages.

Conversions (all to 8-bit ``RGB``):

- EXIF orientation is applied first (``ImageOps.exif_transpose``), so phone photos come out upright.
- ``1`` / ``L`` / ``P`` (no transparency) / ``CMYK`` / ``YCbCr`` / ``LAB`` / ``HSV``: Pillow's own conversion.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a ``transparency`` entry, premultiplied
  ``RGBa``/``La``): alpha-composited **onto white**. Transparent pixels therefore read as white, which is
  what an image viewer shows and what ImageNet-style photos look like around a cut-out object.
- 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer ``I`` (how Pillow opens many
  16-bit files): the range 0..65535 is **scaled** to 0..255 (``round(v / 257)``); Pillow's own
  ``convert("L")`` would clip everything above 255 to white. ``I`` values outside 0..65535 are clipped.
- 32-bit float ``F`` images have no agreed range and are refused.

Numpy input must be an ``HxWx3`` RGB ``uint8`` array; ``HxW`` / ``HxWx1`` (grey) and ``HxWx4`` (RGBA,
composited onto white) are converted too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "ImageNotFoundError", "ImageSource", "load_image"]

#: file suffixes that the folder-walking tools (classification and detection) treat as images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageReadError(ValueError):
    """An input could not be turned into an RGB image. The message names the source and the reason."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The image path does not exist (also a ``FileNotFoundError``)."""


def load_image(src: ImageSource, *, min_size: Optional[int] = None) -> Image.Image:
    """Load ``src`` as an upright 8-bit RGB image.

    Args:
        src: a file path (``str`` / ``os.PathLike``), a ``PIL.Image`` or a numpy ``uint8`` array in
            RGB order, shape (H, W, 3) (also (H, W), (H, W, 1) grey and (H, W, 4) RGBA).
        min_size: if given, refuse images whose shorter side is below this many pixels.

    Returns:
        A fully decoded ``PIL.Image`` in mode ``RGB``. A PIL input is never modified in place.

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageReadError: the file is empty, is a directory, is not an image, is truncated or corrupt,
            has an unsupported pixel format, or is smaller than ``min_size``.
        TypeError: ``src`` is none of the accepted types.
    """
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        image = _read_file(Path(src))
    elif isinstance(src, Image.Image):
        name = _describe_pil(src)
        image = _to_upright_rgb(_decode(src, name), name)
    elif isinstance(src, np.ndarray):
        name = f"numpy array of shape {src.shape}"
        image = _to_upright_rgb(_from_array(src, name), name)
    else:
        raise TypeError(
            f"load_image expects a file path, a PIL.Image or a numpy uint8 HxWx3 RGB array, "
            f"got {type(src).__name__}."
        )

    if min_size is not None and min(image.size) < min_size:
        w, h = image.size
        raise ImageReadError(
            f"Cannot use image {name}: it is {w}x{h} pixels, smaller than the minimum of {min_size} "
            f"pixels per side."
        )
    return image


def _describe_pil(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return str(filename) if filename else f"PIL.Image ({image.mode}, {image.size[0]}x{image.size[1]})"


def _read_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageNotFoundError(f"Cannot read image {path}: no such file.")
    if path.is_dir():
        raise ImageReadError(f"Cannot read image {path}: it is a directory, not an image file.")
    if path.stat().st_size == 0:
        raise ImageReadError(f"Cannot read image {path}: the file is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            # Decode every byte now, so truncated or corrupt data fails here (with the file name) rather
            # than later inside a transform. The result is a new image: closing the file destroys `image`.
            return _to_upright_rgb(_decode(image, str(path)), str(path))
    except UnidentifiedImageError:
        raise ImageReadError(
            f"Cannot read image {path}: not a recognised image format (Pillow cannot identify it)."
        ) from None
    except Image.DecompressionBombError as e:  # raised by Image.open from the header alone
        raise ImageReadError(
            f"Cannot read image {path}: {e} Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file."
        ) from None
    except PermissionError as e:
        raise ImageReadError(f"Cannot read image {path}: permission denied ({e.strerror}).") from None
    except ImageReadError:  # from _decode, already naming the file and the reason (it is a ValueError too)
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a header cut short fails in Image.open already
        raise ImageReadError(f"Cannot read image {path}: the file is truncated or corrupt ({e}).") from None


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Force a full decode (Pillow opens files lazily)."""
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"Cannot read image {name}: {e} Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncation as OSError("image file is truncated ...") and bad chunks / headers
        # as SyntaxError or ValueError depending on the plugin.
        raise ImageReadError(f"Cannot read image {name}: the file is truncated or corrupt ({e}).") from None
    return image


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageReadError(
            f"Cannot read image from {name}: expected dtype uint8 (0..255), got {arr.dtype}. "
            "Convert first, e.g. (arr * 255).round().astype(np.uint8) for floats in [0, 1]."
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
    else:
        raise ImageReadError(
            f"Cannot read image from {name}: expected an HxWx3 RGB array (or HxW / HxWx1 grey, HxWx4 RGBA). "
            "Channel-first (CxHxW) arrays need arr.transpose(1, 2, 0)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"Cannot read image from {name}: the array has no pixels.")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _to_upright_rgb(image: Image.Image, name: str) -> Image.Image:
    """EXIF rotation, then 8-bit RGB. Always returns a new image (the input is left untouched)."""
    try:
        image = ImageOps.exif_transpose(image)  # a transposed image or a copy
    except Exception:  # malformed EXIF must not make an otherwise good photo unreadable
        image = image.copy()
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise ImageReadError(
            f"Cannot read image {name}: 32-bit float pixels (mode 'F') have no standard range; "
            "convert it to 8-bit first."
        )
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageReadError(f"Cannot read image {name}: unsupported pixel mode {mode!r} ({e}).") from None
