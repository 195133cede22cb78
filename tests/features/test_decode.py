"""The features pass decodes 16-bit and float images the way ingest converts them, not clipped to white."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rsdist.core.images import bands_to_rgb
from rsdist.features.preprocess import decode_resized


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("dtype,fmt", [(np.uint16, "PNG"), (np.float32, "TIFF"), (np.int32, "TIFF")])
def test_non_8bit_images_decode_with_the_ingest_stretch(dtype, fmt):
    arr = (np.arange(32 * 32).reshape(32, 32) * 60).astype(dtype)  # up to 61,380: all above 255 but the first row
    pixels = decode_resized(_encoded(arr, fmt), 32)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert (pixels == bands_to_rgb(arr)).all() and pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.05  # Pillow's convert("RGB") would clip almost every pixel to white


def test_16bit_colour_png_keeps_its_low_bits():
    import png

    arr = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 4096).astype(np.uint16)  # 12-bit data
    buf = io.BytesIO()
    png.Writer(32, 32, greyscale=False, bitdepth=16).write(buf, arr.reshape(32, -1).tolist())
    pixels = decode_resized(buf.getvalue(), 32)
    assert (pixels == bands_to_rgb(arr)).all() and pixels.max() == 255  # Pillow alone: the high byte, at most 15
