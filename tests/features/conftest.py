"""Canonical shards built in the run directory for the features tests."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rsdist.core.schema import CANONICAL_SCHEMA, empty_row, make_sample_id

WORDS = "many green trees are around a white building near a parking lot with cars and a road".split()


def scene_jpeg(rng: np.random.Generator, size: int = 48) -> bytes:
    """A small scene-like JPEG: a colour gradient, a bright square and noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x], axis=-1) * rng.uniform(80, 200, size=3)
    top, left = rng.integers(0, size // 2, size=2)
    base[top : top + size // 3, left : left + size // 3] += 60
    img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(run, n_shards: int, rows_per_shard: int, seed: int = 0, with_captions: bool = True) -> list[str]:
    """Write canonical shards `shards/part-0000i.parquet`; returns all sample_ids in order."""
    rng = np.random.default_rng(seed)
    ids = []
    for s in range(n_shards):
        rows = []
        for r in range(rows_per_shard):
            row = empty_row()
            key = f"{s}-{r}"
            row.update(
                sample_id=make_sample_id("test", key),
                image=scene_jpeg(rng),
                image_format="jpeg",
                width=48,
                height=48,
                label=f"class{r % 3}",
                split="test" if r % 5 == 0 else "train",
                source="test",
            )
            caps = [" ".join(rng.choice(WORDS, size=8)) for _ in range(5 if with_captions else 0)]
            row["text"] = caps[0] if caps else " ".join(rng.choice(WORDS, size=6))
            row["captions"] = caps or None
            rows.append(row)
            ids.append(row["sample_id"])
        run.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), "shards", f"part-{s:05d}.parquet")
    return ids


@pytest.fixture
def shards():
    return write_shards
