"""Table helpers every stage shares: embedding columns as matrices, unit rows, the embedding spaces.

Features rows carry `image_emb` and `text_emb` as list-of-float columns. A *space* is which of them
a stage works in: 'image', 'text', or 'joint' (each tower's unit rows side by side, / sqrt 2, so a
joint row has unit length and its cosines average the two towers').
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPACE_COLUMNS = {"joint": ["image_emb", "text_emb"], "image": ["image_emb"], "text": ["text_emb"]}


def embedding_columns(space: str) -> list[str]:
    """The features columns a space is made of; any other name is one '*_emb' column (VLM features)."""
    return list(SPACE_COLUMNS.get(space, [space]))


def embedding_matrix(column: pa.ChunkedArray | pa.Array, name: str, where: str, check_finite: bool = True) -> np.ndarray:
    """A list-of-float column as an (n, d) float32 matrix; nulls, ragged rows and NaNs name the row.
    `check_finite=False` leaves the NaN / infinity check to the caller (`space_vectors` does it on
    the row norms it computes anyway, saving a pass over the matrix)."""
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


def unit_rows(x: np.ndarray, out: np.ndarray | None = None, scale: float = 1.0, norms: np.ndarray | None = None) -> np.ndarray:
    """`scale` x each row / its L2 norm (a zero row stays zero, its cosines 0), written into `out`
    when given; `norms` = the rows' norms when the caller has them. Float32 rows stay float32 (the
    k-means hot path), float64 rows float64."""
    dtype = x.dtype if x.dtype == np.float64 else np.dtype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x)) if norms is None else norms
    inv = (dtype.type(scale) / np.maximum(norms, dtype.type(1e-12))).astype(dtype, copy=False)
    return np.multiply(x, inv[:, None], out=out)


def space_dim(table: pa.Table, space: str, where: str) -> int:
    return sum(embedding_matrix(table.column(c).slice(0, 1), c, where).shape[1] for c in embedding_columns(space))


def space_vectors(table: pa.Table, space: str, where: str, out: np.ndarray | None = None) -> np.ndarray:
    """The rows' vectors in the clustering space: each tower l2-normalised; joint = concat / sqrt(2).
    Written into `out` (rows x dim, float32) when given, without an intermediate copy."""
    columns = embedding_columns(space)
    for name in columns:
        if name not in table.column_names:
            raise ValueError(f"{where}: no column {name!r} (needed by space {space!r})")
    parts = [embedding_matrix(table.column(c), c, where, check_finite=False) for c in columns]
    dim = sum(p.shape[1] for p in parts)
    if out is None:
        out = np.empty((table.num_rows, dim), np.float32)
    elif out.shape != (table.num_rows, dim):
        raise ValueError(f"{where}: vectors of {dim} values in space {space!r}, expected {out.shape[1]}")
    scale = 1.0 / math.sqrt(len(parts))
    col = 0
    for name, p in zip(columns, parts):
        norms = np.sqrt(np.einsum("ij,ij->i", p, p))
        if not np.isfinite(norms).all():  # a NaN or infinity in a row makes its norm non-finite (so does overflow)
            check_finite_rows(p, name, where)
        unit_rows(p, out=out[:, col : col + p.shape[1]], scale=scale, norms=norms)
        col += p.shape[1]
    return out
