"""Checking image bytes at ingest: decode, measure, and make every image readable as RGB later.

`inspect_image(data)` fully decodes the bytes (a header alone does not reveal a truncated JPEG),
returns the format, width and height, and the bytes to store. Bytes are stored as found, with
one exception: images Pillow cannot turn into RGB without losing their meaning (16-bit PNG (read
with pypng when in colour: Pillow keeps only the high byte) or TIFF, 32-bit integer or float pixels, TIFFs with more than four bands as in Sentinel-2 or
multi-band GeoTIFF) are converted once, here, to an 8-bit RGB PNG so that every later stage can
decode any shard row with `PIL.Image.open(...).convert("RGB")`. The conversion is
`rsdist.core.images.bands_to_rgb` (first three bands, per-band p2..p98 stretch); the original
format, dtype, band count and scaling are recorded in the row's `meta`.

Pixel limit: every decode path (Pillow's, and tifffile's for TIFFs Pillow cannot read) refuses
an image of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels before decoding it (`ImageTooLarge`), so
a small compressed file cannot expand into gigabytes (a decompression bomb).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from rsdist.core.images import NUMERIC_MODES, SCALING, bands_to_rgb, png16_array

# Modes Pillow converts to RGB without loss of meaning; anything else in a TIFF is converted here.
_RGB_READY_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow (or tifffile, for TIFF) can decode completely."""


class ImageTooLarge(ValueError):
    """The image exceeds the pixel limit (a decompression bomb guard)."""


@dataclass
class ImageInfo:
    data: bytes
    format: str
    width: int
    height: int
    meta: dict = field(default_factory=dict)


def pixel_limit() -> int:
    """The most pixels an image may have (Pillow's `MAX_IMAGE_PIXELS`, about 89 million by default)."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def inspect_image(data: bytes) -> ImageInfo:
    """Decode `data` completely and describe it; raise UnreadableImage or ImageTooLarge."""
    if not data:
        raise UnreadableImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = (img.format or "").lower()
            width, height = img.size
            if fmt == "tiff" and img.mode not in _RGB_READY_MODES:
                return _tiff_to_png(data)
            if fmt == "png":
                wide = png16_array(data)
                if wide is not None:
                    return _to_png(bands_to_rgb(wide), fmt, "uint16", wide.shape[2])
            if img.mode in NUMERIC_MODES:
                img.load()
                arr = np.asarray(img)
                return _to_png(bands_to_rgb(arr), fmt, str(arr.dtype), 1)
            if fmt == "jpeg":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # decodes every byte, at 1/8 scale
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(str(e)) from None
    except (UnreadableImage, ImageTooLarge):
        raise
    except Exception as e:  # Pillow raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        if _looks_like_tiff(data):
            return _tiff_to_png(data)
        raise UnreadableImage(re.sub(r"<[^>]* at 0x[0-9a-f]+>", "the bytes", f"{type(e).__name__}: {e}")) from None
    return ImageInfo(data=data, format=fmt or "unknown", width=int(width), height=int(height))


def _looks_like_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _check_pixels(shape: tuple) -> None:
    """Refuse a raster whose pixel count (all dimensions but the band axis) exceeds the limit."""
    if not shape:
        return
    elements = math.prod(int(s) for s in shape)
    bands = min(int(s) for s in shape) if len(shape) >= 3 else 1
    pixels = elements // max(1, bands)
    if pixels > pixel_limit() or elements > 4 * pixel_limit():
        raise ImageTooLarge(f"TIFF of shape {tuple(int(s) for s in shape)}: {pixels} pixels, over the limit of {pixel_limit()} (a decompression bomb guard)")


def _tiff_to_png(data: bytes) -> ImageInfo:
    """Convert a TIFF Pillow cannot show as RGB into an 8-bit RGB PNG (`bands_to_rgb`)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.series:
                raise UnreadableImage("TIFF: no image in the file")
            series = tif.series[0]
            _check_pixels(series.shape)
            arr = np.asarray(series.asarray())
    except (UnreadableImage, ImageTooLarge):
        raise
    except Exception as e:
        raise UnreadableImage(f"TIFF: {type(e).__name__}: {e}") from None
    if arr.ndim == 3 and arr.shape[0] < min(arr.shape[1], arr.shape[2]) and arr.shape[0] <= 16:
        arr = np.moveaxis(arr, 0, -1)  # planar (bands, H, W) -> (H, W, bands)
    elif arr.ndim not in (2, 3):
        raise UnreadableImage(f"TIFF: unsupported array shape {arr.shape}")
    bands = 1 if arr.ndim == 2 else arr.shape[2]
    return _to_png(bands_to_rgb(arr), "tiff", str(arr.dtype), bands)


def _to_png(rgb, source_format: str, dtype: str, bands: int) -> ImageInfo:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    h, w = rgb.shape[:2]
    meta = {"converted_from": source_format or "unknown", "source_dtype": dtype, "source_bands": int(bands), "scaling": SCALING}
    return ImageInfo(data=buf.getvalue(), format="png", width=int(w), height=int(h), meta=meta)
