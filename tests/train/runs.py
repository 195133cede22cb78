"""Small run directories with the upstream outputs training and evaluation read.

Writes `shards/` (canonical schema), `features/` (tower features of the tiny encoder's size: each
class has its own direction plus noise, so a model can learn to match images to their class
captions) and `selection/manifest.parquet`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rsdist.core.schema import CANONICAL_SCHEMA, empty_row, make_sample_id

CLASSES = ["DenseResidential", "Forest", "Airport", "BareLand"]
WORDS = {
    "DenseResidential": ["many houses are packed closely together", "a dense residential area with buildings", "rows of houses and roads"],
    "Forest": ["green trees cover the forest", "a dense forest of dark green trees", "many trees and no buildings"],
    "Airport": ["an airport with a runway and planes", "several planes parked near a terminal", "a long runway beside the terminal"],
    "BareLand": ["a piece of bare brown land", "bare land with no plants", "sandy empty land with some tracks"],
}


def features_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("image_emb", pa.list_(pa.float32(), dim)),
        ("text_emb", pa.list_(pa.float32(), dim)),
        ("shift", pa.float32()),
    ])


def make_run(run, n_train: int = 40, n_test: int = 12, select: int = 24, dim: int = 32, seed: int = 0, parts: int = 2, n_val: int = 0) -> dict:
    """Write shards, features and a manifest selecting `select` of the train rows; return the ids.
    Rows come as n_train 'train', n_test 'test', then n_val 'val'."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(CLASSES), dim)).astype(np.float32) * 3
    rows, feats = [], []
    for i in range(n_train + n_test + n_val):
        label = CLASSES[i % len(CLASSES)]
        split = "train" if i < n_train else "test" if i < n_train + n_test else "val"
        row = empty_row()
        sid = make_sample_id("constructed", f"img{i}")
        caps = list(WORDS[label])
        row.update(sample_id=sid, image=b"", image_format="jpeg", width=8, height=8, text=caps[0], captions=caps, label=label, split=split, source="constructed")
        rows.append(row)
        emb = np.abs(directions[CLASSES.index(label)] + rng.normal(scale=0.5, size=dim)).astype(np.float32)
        feats.append({"sample_id": sid, "split": split, "label": label, "image_emb": emb.tolist(), "text_emb": rng.normal(size=dim).astype(np.float32).tolist(), "shift": float(rng.random())})
    chunk = (len(rows) + parts - 1) // parts
    for p in range(parts):
        run.write_table(pa.Table.from_pylist(rows[p * chunk:(p + 1) * chunk], schema=CANONICAL_SCHEMA), "shards", f"part-{p:05d}.parquet")
        run.write_table(pa.Table.from_pylist(feats[p * chunk:(p + 1) * chunk], schema=features_schema(dim)), "features", f"part-{p:05d}.parquet")
    train_ids = [r["sample_id"] for r in rows[:n_train]]
    chosen = set(train_ids[:select])
    manifest = pa.table({
        "sample_id": train_ids,
        "cluster": [i % 3 for i in range(n_train)],
        "score": [float(i) for i in range(n_train)],
        "selected": [s in chosen for s in train_ids],
        "reason": ["constructed" for _ in train_ids],
    })
    run.write_table(manifest, "selection", "manifest.parquet")
    run.write_json({"encoder": "tiny", "embed_dim": dim}, "features", "features_meta.json")
    return {"train": train_ids, "selected": sorted(chosen), "test": [r["sample_id"] for r in rows[n_train:n_train + n_test]],
            "val": [r["sample_id"] for r in rows[n_train + n_test:]]}
