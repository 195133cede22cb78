"""The embedding columns a select method reads, and the manifest's schema (shared by the
distributed stage and the in-process reference)."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsdist.config import SelectConfig
from rsdist.core.rundir import RunDir
from rsdist.core.tables import embedding_columns, space_vectors

MANIFEST_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("cluster", pa.int32()), ("score", pa.float32()), ("selected", pa.bool_()), ("reason", pa.string())]
)


def embedding_of(table: pa.Table, space: str, where: str) -> np.ndarray:
    """Unit rows of `space` (rsdist.core.tables.space_vectors)."""
    return space_vectors(table, space, where)


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
