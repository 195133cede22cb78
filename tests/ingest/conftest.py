"""Fixture data the ingest tests write themselves: real image bytes in every supported format."""

from __future__ import annotations

import io
import json
import posixpath

import fsspec
import numpy as np
import pytest
from PIL import Image


def image_bytes(fmt: str = "PNG", color=(10, 120, 200), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(color, np.uint8)
    arr[::3, ::2] = 255 - arr[::3, ::2]  # some texture, so codecs have something to encode
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def geotiff_bytes(bands: int = 4, size=(20, 12), dtype=np.uint16) -> bytes:
    import tifffile

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4000, size=(bands, size[1], size[0])).astype(dtype)
    buf = io.BytesIO()
    if bands == 1:
        tifffile.imwrite(buf, arr[0], photometric="minisblack")
    else:
        tifffile.imwrite(buf, arr, photometric="minisblack", planarconfig="separate")
    return buf.getvalue()


def put(url: str, data: bytes | str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_captions_txt(root: str, n_per_class: int = 3, classes=("Forest", "Harbor"), per_image: int = 5, broken: bool = False) -> dict:
    """A captions-txt source (`images/<Class>/<name>.png` + train files); with `broken`, one bad record of each kind."""
    names, caps = [], []
    for ci, cls in enumerate(classes):
        for i in range(n_per_class):
            name = f"{cls.lower()}_{i}.png"
            put(f"{root}/images/{cls}/{name}", image_bytes("PNG", color=(40 * ci, 10 * i, 90)))
            names.append(name)
            caps += [f"a {cls.lower()} scene number {i}"] * per_image
    expected = {"written": len(names), "bad": {}}
    if broken:
        good_jpeg = image_bytes("JPEG")
        put(f"{root}/images/Forest/truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
        put(f"{root}/images/Forest/zero.png", b"")
        put(f"{root}/images/Forest/notimage.png", b"this is not an image at all")
        put(f"{root}/images/Harbor/emptycap.png", image_bytes())
        for name in ("truncated.jpg", "zero.png", "notimage.png", "missing.png", "emptycap.png", names[0]):
            names.append(name)
            caps += [""] * per_image if name == "emptycap.png" else [f"caption of {name}"] * per_image
        expected["bad"] = {"unreadable-image": 3, "missing-image": 1, "empty-text": 1, "duplicate-key": 1}
    put(f"{root}/captions/train_filename.txt", "\n".join(names) + "\n")
    put(f"{root}/captions/train_caps.txt", "\n".join(caps) + "\n")
    return expected


@pytest.fixture
def memory_root(request):
    """A unique memory:// folder, removed after the test."""
    safe = "".join(c if c.isalnum() else "-" for c in request.node.name)
    root = f"memory://ingest-{safe}"
    yield root
    fs = fsspec.filesystem("memory")
    path = fsspec.core.url_to_fs(root)[1]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json(url: str, obj) -> None:
    put(url, json.dumps(obj))
