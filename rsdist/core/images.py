"""Turning any decoded image into 8-bit RGB the same way, at ingest and when features are computed.

Images whose pixels are not 8-bit (16-bit or 32-bit integers, floats) or that have more than four
bands (Sentinel-2, multi-band GeoTIFF) cannot go through Pillow's `convert("RGB")` without losing
their meaning (a 16-bit band clips to white). They are converted here instead: take the first
three bands (a single band is repeated three times); an 8-bit band is kept as is; any other band
is stretched linearly between its 2nd and 98th percentile (computed over that band's finite
pixels) to 0..255 and clipped. A constant band maps to 0.

Pillow opens a 16-bit colour PNG as 8-bit RGB keeping only each sample's high byte (12-bit
imagery in a 16-bit PNG comes out nearly black), so `png16_array` reads those with pypng.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

SCALING = "first 3 bands; 8-bit kept; otherwise per-band linear stretch p2..p98 to 0..255, clipped"

# Pillow modes whose pixels are not 8-bit: 16/32-bit integers and 32-bit floats.
NUMERIC_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32S", "F;32"}


def band_to_uint8(band: np.ndarray) -> np.ndarray:
    """One band -> uint8: kept when already 8-bit, else the p2..p98 stretch of the module doc."""
    if band.dtype == np.uint8:
        return band
    values = band.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(finite, [2, 98])
    if hi <= lo:
        return np.zeros(band.shape, np.uint8)
    scaled = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo) * 255.0
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def bands_to_rgb(arr: np.ndarray) -> np.ndarray:
    """An (H, W) or (H, W, bands) array of any dtype -> uint8 (H, W, 3)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :3]
    if arr.shape[2] < 3:
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    return np.stack([band_to_uint8(arr[:, :, b]) for b in range(3)], axis=-1)


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded Pillow image -> RGB; non-8-bit modes by `bands_to_rgb`, the others by Pillow."""
    if img.mode in NUMERIC_MODES:
        return Image.fromarray(bands_to_rgb(np.asarray(img)), "RGB")
    return img.convert("RGB")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png16_array(data: bytes) -> Optional[np.ndarray]:
    """The uint16 (H, W, bands) pixels of a 16-bit colour PNG (RGB, RGBA or grey + alpha), else None.

    Pillow reads 16-bit grey PNGs in full (mode I;16, handled by `to_rgb`) but colour ones as 8 bits.
    """
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24] != 16 or data[25] not in (2, 4, 6):
        return None
    import png

    width, height, rows, info = png.Reader(bytes=data).asDirect()
    return np.vstack([np.asarray(row, np.uint16) for row in rows]).reshape(height, width, info["planes"])


def decode_rgb(data: bytes, draft_size: Optional[int] = None) -> Image.Image:
    """Encoded bytes -> an RGB Pillow image, non-8-bit pixels converted by `bands_to_rgb`.

    `draft_size`: a JPEG is decoded at reduced scale, no smaller than this side.
    """
    wide = png16_array(data)
    if wide is not None:
        return Image.fromarray(bands_to_rgb(wide), "RGB")
    import io

    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and draft_size:
        img.draft("RGB", (draft_size, draft_size))
    return to_rgb(img)
