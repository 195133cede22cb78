"""Table helpers every stage shares: embedding columns as matrices, unit rows, the embedding spaces.

Features rows carry `image_emb` and `text_emb` as list-of-float columns. A *space* is which of them
a stage works in: 'image', 'text', or 'joint' (each tower's unit rows side by side, / sqrt 2, so a
joint row has unit length and its cosines average the two towers').
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPACE_COLUMNS = {"joint": ["image_emb", "text_emb"], "image": ["image_emb"], "text": ["text_emb"]}


def embedding_columns(space: str) -> list[str]:
    """The features columns a space is made of; any other name is one '*_emb' column (VLM features)."""
    return list(SPACE_COLUMNS.get(space, [space]))


def embedding_matrix(column: pa.ChunkedArray | pa.Array, name: str, where: str, check_finite: bool = True) -> np.ndarray:
    """A list-of-float column as an (n, d) float32 matrix; nulls, ragged rows and NaNs name the row.
    `check_finite=False` leaves the NaN / infinity check to the caller."""
    if isinstance(column, pa.ChunkedArray):
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        arr = column
    if arr.null_count:
        row = int(pc.index(pc.is_null(arr), True).as_py())
        raise ValueError(f"{where}: column {name} is null in row {row}")
    if not (pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise ValueError(f"{where}: column {name} has type {arr.type}, expected a list of floats")
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if n else 0
        if n and (lengths != dim).any():
            row = int(np.argmax(lengths != dim))
            raise ValueError(f"{where}: column {name} row {row} has {lengths[row]} values, expected {dim}")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
    if check_finite:
        check_finite_rows(values, name, where)
    return values


def check_finite_rows(values: np.ndarray, name: str, where: str) -> None:
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        raise ValueError(f"{where}: column {name} row {int(np.argmax(bad))} holds a NaN or infinite value")


def unit_rows(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Each row / its L2 norm, in the rows' own dtype (a zero row stays zero: its cosines are 0);
    written into `out` when given."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, np.where(norms > 0, norms, 1.0), out=out)


def space_dim(table: pa.Table, space: str, where: str) -> int:
    return sum(embedding_matrix(table.column(c).slice(0, 1), c, where).shape[1] for c in embedding_columns(space))


def space_vectors(table: pa.Table, space: str, where: str, out: np.ndarray | None = None) -> np.ndarray:
    """The rows' vectors in `space`: each tower's unit rows; 'joint' = both side by side / sqrt 2
    (float64, as the select methods compute in). Copied into `out` (rows x dim) when given."""
    columns = embedding_columns(space)
    for name in columns:
        if name not in table.column_names:
            raise ValueError(f"{where}: no column {name!r} (needed by space {space!r})")
    parts = [unit_rows(embedding_matrix(table.column(c), c, where)) for c in columns]
    vectors = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1) / np.sqrt(float(len(parts)))
    if out is None:
        return vectors
    if out.shape != vectors.shape:
        raise ValueError(f"{where}: vectors of {vectors.shape[1]} values in space {space!r}, expected {out.shape[1]}")
    out[...] = vectors
    return out
