"""Checking image bytes at ingest: decode, measure, and make every image readable as RGB later.

`inspect_image(data)` fully decodes the bytes (a header alone does not reveal a truncated JPEG),
returns the format, width and height, and the bytes to store. Bytes are stored as found, with
one exception: TIFFs that Pillow cannot turn into RGB (16-bit, float, or more than four bands,
as in Sentinel-2 or multi-band GeoTIFF) are converted once, here, to an 8-bit RGB PNG so that
every later stage can decode any shard row with `PIL.Image.open(...).convert("RGB")`.

The conversion: take the first three bands (a single band is repeated three times); an 8-bit
band is kept as is; any other band is stretched linearly between its 2nd and 98th percentile
(computed over that band's finite pixels) to 0..255 and clipped. A constant band maps to 0.
The original dtype, band count and scaling are recorded in the row's `meta`.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Modes Pillow converts to RGB without loss of meaning; anything else in a TIFF is converted here.
_RGB_READY_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
_TIFF_SCALING = "first 3 bands; 8-bit kept; otherwise per-band linear stretch p2..p98 to 0..255, clipped"


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
            if fmt == "jpeg":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # decodes every byte, at 1/8 scale
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(str(e)) from None
    except UnreadableImage:
        raise
    except Exception as e:  # Pillow raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        if _looks_like_tiff(data):
            return _tiff_to_png(data)
        raise UnreadableImage(re.sub(r"<[^>]* at 0x[0-9a-f]+>", "the bytes", f"{type(e).__name__}: {e}")) from None
    return ImageInfo(data=data, format=fmt or "unknown", width=int(width), height=int(height))


def _looks_like_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_to_png(data: bytes) -> ImageInfo:
    """Convert a TIFF Pillow cannot show as RGB into an 8-bit RGB PNG (scaling in the module doc)."""
    try:
        import tifffile

        arr = tifffile.imread(io.BytesIO(data))
    except Exception as e:
        raise UnreadableImage(f"TIFF: {type(e).__name__}: {e}") from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[0] < min(arr.shape[1], arr.shape[2]) and arr.shape[0] <= 16:
        arr = np.moveaxis(arr, 0, -1)  # planar (bands, H, W) -> (H, W, bands)
    elif arr.ndim != 3:
        raise UnreadableImage(f"TIFF: unsupported array shape {arr.shape}")
    bands, dtype = arr.shape[2], str(arr.dtype)
    arr = arr[:, :, :3]
    if arr.shape[2] < 3:
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    rgb = np.stack([_band_to_uint8(arr[:, :, b]) for b in range(3)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    h, w = rgb.shape[:2]
    meta = {"converted_from": "tiff", "source_dtype": dtype, "source_bands": int(bands), "scaling": _TIFF_SCALING}
    return ImageInfo(data=buf.getvalue(), format="png", width=int(w), height=int(h), meta=meta)


def _band_to_uint8(band: np.ndarray) -> np.ndarray:
    if band.dtype == np.uint8:
        return band
    values = band.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(finite, [2, 98])
    if hi <= lo:
        return np.zeros(band.shape, np.uint8)
    scaled = (np.nan_to_num(values, nan=lo) - lo) / (hi - lo) * 255.0
    return np.clip(scaled, 0, 255).round().astype(np.uint8)
