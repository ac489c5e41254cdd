"""load_image: every supported pixel format becomes the documented 8-bit RGB, every bad input a clear error."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvit_det.data import ImageNotFoundError, ImageReadError, load_image


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# -- pixel formats -------------------------------------------------------------------------------------
def test_grayscale_png_is_replicated(tmp_path):
    grey = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    path = _save(Image.fromarray(grey, mode="L"), tmp_path / "grey.png")
    out = _rgb(load_image(path))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_la_alpha_is_composited_on_white(tmp_path):
    data = np.zeros((2, 3, 2), dtype=np.uint8)
    data[..., 0] = 40  # grey level
    data[0, :, 1] = [255, 0, 128]  # opaque, transparent, half
    data[1, :, 1] = 255
    path = _save(Image.fromarray(data, mode="LA"), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [40, 40, 40])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    expected_half = 40 * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.all(np.abs(out[0, 2] - expected_half) <= 1)
    np.testing.assert_array_equal(out[1], [[40, 40, 40]] * 3)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 200, 30, 10, 5, 90, 250] + [0] * (256 * 3 - 9))
    image.putpixel((1, 0), 1)
    image.putpixel((2, 1), 2)
    path = _save(image, tmp_path / "palette.png", transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # index 0 is transparent -> white, not black
    np.testing.assert_array_equal(out[0, 1], [200, 30, 10])
    np.testing.assert_array_equal(out[1, 2], [5, 90, 250])


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 7, 8, 9] + [0] * (256 * 3 - 6))
    out = _rgb(load_image(_save(image, tmp_path / "p.png")))
    np.testing.assert_array_equal(out, np.full((2, 2, 3), [7, 8, 9]))


def test_rgba_is_composited_on_white(tmp_path):
    data = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 200, 0, 64]]], dtype=np.uint8)
    path = _save(Image.fromarray(data, mode="RGBA"), tmp_path / "rgba.png")
    out = _rgb(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    a = 64 / 255
    assert np.all(np.abs(out[0, 2] - np.array([255 * (1 - a), 200 * a + 255 * (1 - a), 255 * (1 - a)])) <= 1)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 25700], [32896, 65535, 128]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    out = _rgb(load_image(path))
    # round(v / 257): 25700 -> 100 (clipping, as Image.convert("L") does, would give 255)
    np.testing.assert_array_equal(out[..., 0], [[0, 4, 100], [128, 255, 0]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16bit_in_memory_modes(mode):
    values = np.array([[0, 257 * 7, 65535]], dtype=np.uint16)
    if mode == "I;16B":
        image = Image.fromarray(values.astype(">u2"))
    else:
        image = Image.fromarray(values.astype(np.int32))
    assert image.mode == mode
    np.testing.assert_array_equal(_rgb(load_image(image))[0, :, 1], [0, 7, 255])


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red
    image.paste((255, 0, 255, 0), (8, 0, 16, 8))  # pure green
    path = _save(image, tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    out = _rgb(load_image(path))
    assert np.abs(out[4, 2] - [255, 0, 0]).max() <= 6
    assert np.abs(out[4, 13] - [0, 255, 0]).max() <= 6


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide, 20 high: left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view".
    data = np.zeros((20, 40, 3), dtype=np.uint8)
    data[:, :20] = [255, 0, 0]
    data[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(data), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (40, 20)
    image = load_image(path)
    assert image.size == (20, 40)  # width and height swapped
    out = _rgb(image)
    # Turning clockwise puts the left (red) half on top and the right (blue) half at the bottom.
    assert np.abs(out[5, 10] - [255, 0, 0]).max() <= 10
    assert np.abs(out[35, 10] - [0, 0, 255]).max() <= 10
    # A PIL image opened from the same file gives the same upright result.
    np.testing.assert_array_equal(np.asarray(load_image(Image.open(path))), np.asarray(image))


def test_one_pixel_image_and_min_size(tmp_path):
    path = _save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "dot.png")
    image = load_image(path)
    assert image.size == (1, 1)
    np.testing.assert_array_equal(_rgb(image)[0, 0], [9, 8, 7])
    with pytest.raises(ImageReadError) as info:
        load_image(path, min_size=32)
    assert str(info.value) == (
        f"Cannot use image {path}: it is 1x1 pixels, smaller than the minimum of 32 pixels per side."
    )


def test_pil_input_is_not_modified():
    src = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    out = load_image(src)
    assert src.mode == "RGBA" and out is not src
    np.testing.assert_array_equal(_rgb(out), np.full((3, 3, 3), 255))


# -- numpy input ---------------------------------------------------------------------------------------
def test_numpy_inputs():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    grey = rgb[..., 0]
    for arr in (grey, grey[..., None]):
        np.testing.assert_array_equal(np.asarray(load_image(arr)), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    out = np.asarray(load_image(rgba))
    np.testing.assert_array_equal(out[1:], rgb[1:])
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])


def test_numpy_errors():
    with pytest.raises(ImageReadError, match=re.escape("expected dtype uint8 (0..255), got float32")):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageReadError, match=re.escape("Channel-first (CxHxW) arrays need arr.transpose(1, 2, 0)")):
        load_image(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ImageReadError, match="the array has no pixels"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="load_image expects a file path, a PIL.Image or a numpy uint8"):
        load_image([[0, 0, 0]])


# -- broken files --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageNotFoundError) as info:
        load_image(path)
    assert str(info.value) == f"Cannot read image {path}: no such file."
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_directory(tmp_path):
    with pytest.raises(ImageReadError) as info:
        load_image(tmp_path)
    assert str(info.value) == f"Cannot read image {tmp_path}: it is a directory, not an image file."


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(info.value) == f"Cannot read image {path}: the file is empty (0 bytes)."


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(info.value) == (
        f"Cannot read image {path}: not a recognised image format (Pillow cannot identify it)."
    )


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path, suffix):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(Image.fromarray(noise), tmp_path / f"full{suffix}")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    Image.open(path)  # the header alone is fine: only a full decode finds the damage
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"Cannot read image {path}: the file is truncated or corrupt (")
    assert "truncated" in message.split("(", 1)[1]  # Pillow's own reason is kept
    assert message.count("Cannot read image") == 1  # said once, not wrapped in itself
