"""Image checks at ingest: every supported encoding decodes, broken bytes are named as such."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rsdist.ingest.images import UnreadableImage, inspect_image
from tests.ingest.conftest import geotiff_bytes, image_bytes


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_common_formats_are_kept_as_found(fmt):
    data = image_bytes(fmt)
    info = inspect_image(data)
    assert info.data is data and info.format == fmt.lower() and (info.width, info.height) == (24, 16)


def test_multiband_16bit_geotiff_becomes_8bit_rgb_png():
    info = inspect_image(geotiff_bytes(bands=4))
    assert info.format == "png" and (info.width, info.height) == (20, 12)
    assert info.meta["source_dtype"] == "uint16" and info.meta["source_bands"] == 4
    rgb = np.asarray(Image.open(io.BytesIO(info.data)))
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8 and rgb.max() == 255 and rgb.min() == 0


def test_single_band_16bit_tiff_is_grey_rgb():
    info = inspect_image(geotiff_bytes(bands=1))
    rgb = np.asarray(Image.open(io.BytesIO(info.data)))
    assert rgb.shape == (12, 20, 3) and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("data,match", [(b"", "zero-byte"), (b"GIF89 nonsense", "UnidentifiedImageError"), (image_bytes("JPEG")[:200], "truncated|broken|OSError")])
def test_broken_bytes_are_unreadable(data, match):
    with pytest.raises(UnreadableImage, match=match):
        inspect_image(data)
