"""Moving the pool to the select workers: range buckets, cluster groups, and the manifest writer.

The driver never reads a pool row. It learns the pool's shape from small task results and hands
out file and block numbers:

1. survey (one task per clusters/ file): rows, rows per cluster label, and every `stride`-th
   sorted sample_id. From the samples the driver cuts the sample_id range into B *buckets* of about
   `rows_per_task` rows each (bucket j holds the ids in [boundary j-1, boundary j)).
2. split (one task per clusters/, features/ and, for the caption methods, shards/ file): each row
   goes to its bucket's folder, `rows_per_task` rows at a time.
3. join (one task per bucket): the bucket's pool rows sorted by sample_id, checked for repeated
   and missing ids, numbered (`pos`: the row's place in the pool in sample_id order, from the
   buckets' row counts), and written per *group*: clusters packed in label order into groups of
   about `rows_per_task` rows (a larger cluster is a group of its own). Per bucket and group one
   file, `rows/g-<group>/b-<bucket>.parquet`, so a group's rows read back in bucket order are in
   pool order.
4. The strategy's tasks work per group (rsdist.select.stage); each writes its manifest rows per
   bucket, `out/g-<group>/b-<bucket>.parquet`, and one writer task streams the buckets in order
   (each bucket's rows from every group, sorted by pos) into selection/manifest.parquet, one row
   group per bucket, under a temporary name that is renamed when complete.

Memory of a task: a split or join task holds `rows_per_task` rows of the columns the method reads,
a group task its group (`rows_per_task` rows, or its one larger cluster), the writer one bucket.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsdist.core.rundir import RunDir, compression

SCRATCH = ("selection", "_work")
SAMPLES_PER_BUCKET = 32


class PoolError(ValueError):
    """A problem with the run directory's rows, found by a task and raised in the driver."""


def scratch(*parts: str) -> tuple[str, ...]:
    return (*SCRATCH, *parts)


def bucket_file(kind: str, bucket: int, name: str) -> tuple[str, ...]:
    return scratch("split", kind, f"b-{bucket:05d}", f"{name}.parquet")


def group_file(folder: str, group: int, bucket: int) -> tuple[str, ...]:
    return scratch(folder, f"g-{group:05d}", f"b-{bucket:05d}.parquet")


def _read(run: RunDir, path: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns, filesystem=run.fs)


def read_parts(run: RunDir, parts: tuple[str, ...], columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Every parquet file of a scratch folder, in name order (an empty table when there is none)."""
    files = run.parquet_files(*parts)
    if not files:
        if schema is None:
            raise FileNotFoundError(run.url(*parts))
        return schema.empty_table()
    return pa.concat_tables([_read(run, f, columns) for f in files], promote_options="default")


# -- 1. survey --------------------------------------------------------------------------------------


def count_file(run: RunDir, path: str) -> int:
    with run.fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def survey_file(run: RunDir, path: str, stride: int) -> dict:
    """Rows, rows per cluster label and every `stride`-th sorted sample_id of one clusters/ file."""
    table = _read(run, path, ["sample_id", "cluster"])
    if table.column("sample_id").null_count or table.column("cluster").null_count:
        return {"error": f"{run.fs.unstrip_protocol(path)}: sample_id and cluster must not be null"}
    ids = np.sort(np.asarray(table.column("sample_id").to_numpy(zero_copy_only=False), dtype=str))
    labels, counts = np.unique(table.column("cluster").to_numpy(), return_counts=True)
    return {"rows": len(ids), "labels": labels, "counts": counts, "sample": ids[::stride]}


@dataclass
class Plan:
    """What the driver holds: bucket boundaries and sizes, cluster labels, sizes and groups."""

    boundaries: np.ndarray  # (B - 1,) sample_id strings
    bucket_rows: np.ndarray  # (B,)
    labels: np.ndarray  # (k,) sorted cluster labels
    sizes: np.ndarray  # (k,) rows per cluster
    group_of: np.ndarray  # (k,) each cluster's group
    group_clusters: list[np.ndarray] = field(default_factory=list)  # cluster indices of each group

    @property
    def size(self) -> int:
        return int(self.sizes.sum())

    @property
    def k(self) -> int:
        return len(self.labels)

    @property
    def buckets(self) -> int:
        return len(self.boundaries) + 1

    @property
    def offsets(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.bucket_rows)[:-1]].astype(np.int64)


def cut_buckets(samples: np.ndarray, rows: int, rows_per_task: int) -> np.ndarray:
    """Boundaries that cut the sorted sample into about rows / rows_per_task equal buckets."""
    parts = max(1, int(np.ceil(rows / rows_per_task)))
    if parts == 1 or len(samples) == 0:
        return np.zeros(0, dtype=str)
    samples = np.sort(samples)
    cuts = samples[(np.arange(1, parts) * len(samples)) // parts]
    return np.unique(cuts)


def pack_groups(sizes: np.ndarray, rows_per_task: int) -> np.ndarray:
    """Consecutive clusters packed into groups of at most `rows_per_task` rows (a larger cluster
    alone); each cluster's group index."""
    group_of = np.zeros(len(sizes), dtype=np.int64)
    g, load = 0, 0
    for i, s in enumerate(sizes):
        if load > 0 and load + int(s) > rows_per_task:
            g, load = g + 1, 0
        group_of[i] = g
        load += int(s)
    return group_of


def bucket_of(ids: pa.Array, boundaries: np.ndarray) -> np.ndarray:
    if len(boundaries) == 0:
        return np.zeros(len(ids), dtype=np.int64)
    return np.searchsorted(boundaries, np.asarray(ids.to_numpy(zero_copy_only=False), dtype=str), side="right").astype(np.int64)


# -- 2. split ---------------------------------------------------------------------------------------


def split_file(run: RunDir, kind: str, path: str, name: str, columns: list[str], boundaries: np.ndarray, batch_rows: int) -> np.ndarray:
    """Write the rows of one input file to their buckets' folders; returns the rows per bucket."""
    counts = np.zeros(len(boundaries) + 1, dtype=np.int64)
    writers: dict[int, tuple[pq.ParquetWriter, object, str, str]] = {}
    try:
        with run.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise PoolError(f"{run.fs.unstrip_protocol(path)}: no column {missing[0]!r} (needed by the select method)")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                table = pa.Table.from_batches([batch])
                bucket = bucket_of(table.column("sample_id").combine_chunks(), boundaries)
                order = np.argsort(bucket, kind="stable")
                table, bucket = table.take(pa.array(order)), bucket[order]
                starts = np.r_[0, np.flatnonzero(np.diff(bucket)) + 1, len(bucket)]
                for lo, hi in zip(starts[:-1], starts[1:]):
                    j = int(bucket[lo])
                    piece = table.slice(lo, hi - lo)
                    if j not in writers:
                        final = run.path(*bucket_file(kind, j, name))
                        run.fs.makedirs(posixpath.dirname(final), exist_ok=True)
                        tmp = run._tmp_name(final)
                        f = run.fs.open(tmp, "wb")
                        writers[j] = (pq.ParquetWriter(f, piece.schema, compression=compression(piece.schema)), f, tmp, final)
                    writers[j][0].write_table(piece)
                    counts[j] += hi - lo
    finally:
        for w, f, _, _ in writers.values():
            w.close()
            f.close()
    for _, _, tmp, final in writers.values():
        run._commit(tmp, final)
    return counts


# -- 3. join ----------------------------------------------------------------------------------------


def _first_missing(ids: pa.Array, idx: pa.Array) -> str:
    return ids.filter(pc.is_null(idx))[0].as_py()


def join_bucket(run: RunDir, bucket: int, offset: int, labels: np.ndarray, group_of: np.ndarray, kinds: dict[str, list[str]], draw_seed: int | None) -> dict:
    """The pool rows of one bucket, in sample_id order, with the columns of `kinds` (features:
    [...], shards: [...]), numbered from `offset` and written per cluster group. `draw_seed`: add
    column `draw`, the pool-order draws of numpy's default_rng(draw_seed).random(pool)."""
    ids = read_parts(run, scratch("split", "clusters", f"b-{bucket:05d}"), ["sample_id", "cluster"])
    ids = ids.take(pc.sort_indices(ids, [("sample_id", "ascending")]))
    sid = ids.column("sample_id").combine_chunks()
    if len(sid) > 1:
        same = pc.equal(sid[1:], sid[:-1])
        if pc.any(same).as_py():
            dup = sid[int(np.flatnonzero(same.to_numpy(zero_copy_only=False))[0])].as_py()
            return {"error": f"{run.url('clusters')}: sample_id {dup!r} appears more than once"}
    n = len(sid)
    table = pa.table({"sample_id": sid, "pos": pa.array(np.arange(offset, offset + n, dtype=np.int64)), "cluster": ids.column("cluster").combine_chunks()})
    for kind, columns in kinds.items():
        rows = read_parts(run, scratch("split", kind, f"b-{bucket:05d}"), ["sample_id", *columns]) if run.exists(*scratch("split", kind, f"b-{bucket:05d}")) else None
        if rows is None:
            if n:
                return {"error": f"{run.url(kind)}: no row for sample_id {sid[0].as_py()!r} of the cluster pool"}
            continue
        idx = pc.index_in(sid, value_set=rows.column("sample_id").combine_chunks())
        if idx.null_count:
            return {"error": f"{run.url(kind)}: no row for sample_id {_first_missing(sid, idx)!r} of the cluster pool ({idx.null_count} missing in its sample_id range)"}
        rows = rows.take(idx)
        for c in columns:
            table = table.append_column(c, rows.column(c))
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
        rng.bit_generator.advance(offset)
        table = table.append_column("draw", pa.array(rng.random(n)))
    cluster_index = np.searchsorted(labels, table.column("cluster").to_numpy())
    group = group_of[cluster_index]
    counts = np.bincount(cluster_index, minlength=len(labels))
    order = np.argsort(group, kind="stable")
    table, group = table.take(pa.array(order)), group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1, len(group)] if len(group) else np.zeros(1, dtype=np.int64)
    for lo, hi in zip(starts[:-1], starts[1:]):
        run.write_table(table.slice(lo, hi - lo), *group_file("rows", int(group[lo]), bucket))
    return {"rows": n, "counts": counts}


def read_group(run: RunDir, group: int, columns: list[str] | None = None) -> pa.Table:
    """A group's rows in pool order (bucket files in bucket order, each sorted)."""
    return read_parts(run, scratch("rows", f"g-{group:05d}"), columns)


def write_by_bucket(run: RunDir, folder: str, group: int, table: pa.Table, offsets: np.ndarray) -> None:
    """Rows of one group (with `pos`, in pool order) written per bucket to <folder>/g-<group>/."""
    pos = table.column("pos").to_numpy()
    bucket = np.searchsorted(offsets, pos, side="right") - 1
    starts = np.r_[0, np.flatnonzero(np.diff(bucket)) + 1, len(bucket)] if len(bucket) else np.zeros(1, dtype=np.int64)
    for lo, hi in zip(starts[:-1], starts[1:]):
        run.write_table(table.slice(lo, hi - lo), *group_file(folder, group, int(bucket[lo])))


def read_bucket(run: RunDir, folder: str, bucket: int, groups: int, schema: pa.Schema) -> pa.Table:
    """One bucket's rows of every group from <folder>/g-*/b-<bucket>.parquet, sorted by pos."""
    tables = [_read(run, run.path(*group_file(folder, g, bucket))) for g in range(groups) if run.exists(*group_file(folder, g, bucket))]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.take(pc.sort_indices(table, [("pos", "ascending")]))


def write_manifest(run: RunDir, buckets: int, groups: int, schema: pa.Schema, expected_rows: int) -> dict:
    """Stream the buckets' manifest rows into selection/manifest.parquet (renamed when complete)."""
    final = run.path("selection", "manifest.parquet")
    tmp = run._tmp_name(final)
    rows = selected = 0
    with run.fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema, compression=compression(schema)) as writer:
        for j in range(buckets):
            table = read_bucket(run, "out", j, groups, schema.append(pa.field("pos", pa.int64())))
            pos = table.column("pos").to_numpy()
            if len(pos) and not np.array_equal(pos, np.arange(rows, rows + len(pos))):
                raise RuntimeError(f"select: bucket {j} of the manifest does not hold pool rows {rows}..{rows + len(pos) - 1} once each")
            table = table.select(schema.names).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
            selected += int(pc.sum(table.column("selected")).as_py() or 0)
    if rows != expected_rows:
        run.fs.rm(tmp)
        raise RuntimeError(f"select: the manifest has {rows} rows, the pool {expected_rows}")
    run._commit(tmp, final)
    return {"rows": rows, "selected": selected}


def caption_hash(captions: list[str], parts: int) -> np.ndarray:
    """Stable hash partition of normalised captions (crc32; the same in every process)."""
    return np.array([zlib.crc32(c.encode("utf-8")) % parts for c in captions], dtype=np.int64)
