"""The embedding columns a select method reads, and the manifest's schema (shared by the
distributed stage and the in-process reference)."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsdist.config import SelectConfig
from rsdist.io.rundir import RunDir
from rsdist.select.alignment import unit_rows

MANIFEST_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("cluster", pa.int32()), ("score", pa.float32()), ("selected", pa.bool_()), ("reason", pa.string())]
)


def embedding_columns(space: str) -> list[str]:
    return {"joint": ["image_emb", "text_emb"], "image": ["image_emb"], "text": ["text_emb"]}.get(space, [space])


def _matrix(col: pa.ChunkedArray | pa.Array, name: str, where: str) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise ValueError(f"{where}: column {name} has {arr.null_count} null rows")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy()
        dim = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and np.any(lengths != dim):
            raise ValueError(f"{where}: column {name} has rows of different lengths")
    else:
        raise ValueError(f"{where}: column {name} is {arr.type}, not a list of floats")
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), dim)


def embedding_of(table: pa.Table, space: str, where: str) -> np.ndarray:
    """Unit rows of `space`: 'joint' concatenates the unit image and text embeddings (/ sqrt 2)."""
    for name in embedding_columns(space):
        if name not in table.column_names:
            raise ValueError(f"{where}: no column {name!r} (needed by select.space={space!r})")
    if space == "joint":
        img = unit_rows(_matrix(table.column("image_emb"), "image_emb", where))
        txt = unit_rows(_matrix(table.column("text_emb"), "text_emb", where))
        return np.concatenate([img, txt], axis=1) / np.sqrt(2.0)
    name = embedding_columns(space)[0]
    return unit_rows(_matrix(table.column(name), name, where))


def read_failures(run: RunDir, cfg: SelectConfig) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(embeddings, ids, weights) of the failing validation samples for error-driven selection."""
    uri = cfg.failures or run.url("eval", "failures.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise ValueError(f"select.failures: {uri} does not exist (error-driven needs the failing validation samples)")
    table = pq.read_table(path, filesystem=fs)
    if "sample_id" not in table.column_names:
        raise ValueError(f"{uri}: no sample_id column")
    ids = table.column("sample_id").to_pylist()
    weights = table.column("weight").to_numpy().astype(np.float64) if "weight" in table.column_names else None
    if all(c in table.column_names for c in embedding_columns(cfg.space)):
        return embedding_of(table, cfg.space, uri), ids, weights
    feats = run.read_table("features", columns=["sample_id", *embedding_columns(cfg.space)])
    idx = pc.index_in(table.column("sample_id").combine_chunks(), value_set=feats.column("sample_id").combine_chunks())
    if idx.null_count:
        raise ValueError(f"{uri}: has no {'/'.join(embedding_columns(cfg.space))} columns and {idx.null_count} sample_ids are not in {run.url('features')}")
    return embedding_of(feats.take(idx), cfg.space, uri), ids, weights
