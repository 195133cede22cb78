"""`rsdist bench kmeans --micro`: the per-change figures of docs/cluster.md, each against its baseline.

Every pair is timed in the same run, on one torch thread (what a shard actor has), best of
`repeats`:
- assign: `TorchBackend.assign` of a `batch` x `dim` block against k centroids, float32 vs bf16;
- gather: a mini-batch of random rows of a `rows` x `dim` matrix, `x[idx]` vs `index_select`;
- k-means++ step: one greedy step (8 candidates) over a 3 x batch sample, float32 vs bf16 copy
  (the per-step products);
- k-means++: the whole bf16 initialisation of k centroids on the stage's default sample
  (max(3 x batch, 3k) rows), per-step products vs the sample's Gram matrix computed once;
- read: one `rows` x `dim` parquet unit, zstd vs the uncompressed embeddings `RunDir.write_table`
  writes;
- heap: page faults and ms of the driver's centroid update, in a fresh process, before and
  inside `heap_reuse`;
- arrow pages: reading `units` parquet units in a fresh process with pyarrow's default jemalloc
  decay vs `reuse_arrow_pages`;
- huge pages: a `ShardActor` loading the same `units` units (its whole start: read, normalise,
  fill its matrix) in a fresh process, with numpy's default madvise of huge pages vs
  `disable_numpy_huge_pages`. This one depends on the host (its THP setting and how fragmented its
  memory is); the JSON records the THP settings it ran under.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * min(times), 3)


def pair(name_a: str, a: float, name_b: str, b: float) -> dict:
    return {f"{name_a}_ms": a, f"{name_b}_ms": b, "ratio": round(a / max(b, 1e-9), 3)}


def unit_table(rows: int, dim: int, seed: int) -> pa.Table:
    x = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    return pa.table({
        "sample_id": pa.array([f"s{i:09d}" for i in range(rows)]),
        "split": pa.array(["train"] * rows),
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
    })


def update_faults(k: int, dim: int, batch: int) -> dict:
    """In a fresh process: minor page faults and ms of one driver centroid update, before and inside heap_reuse."""
    from rsdist.cluster.engine import KMeansDriver, heap_reuse

    class Cfg:
        metric, seed, precision = "euclidean", 0, "float32"

    driver = KMeansDriver([], [], k, Cfg)
    rng = np.random.default_rng(0)
    results = [{"idx": np.sort(rng.choice(k, size=min(k, batch // 2), replace=False)), "sums": rng.standard_normal((min(k, batch // 2), dim), dtype=np.float32), "counts": np.ones(min(k, batch // 2))} for _ in range(2)]
    c, v = rng.standard_normal((k, dim), dtype=np.float32), np.ones(k)

    def measure() -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(20):
            driver._update_sculley(c, v, results)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20, 1000 * (time.perf_counter() - t0) / 20

    faults_before, ms_before = measure()
    with heap_reuse():
        measure()
        faults_inside, ms_inside = measure()
    return {"faults_per_update_before": faults_before, "faults_per_update_inside": faults_inside, "update_ms_before": round(ms_before, 3), "update_ms_inside": round(ms_inside, 3)}


def read_units(paths: list[str], reuse: bool) -> float:
    """In a fresh process: seconds to read every unit's columns, with or without arrow page reuse."""
    from rsdist.cluster.shards import reuse_arrow_pages

    if reuse:
        reuse_arrow_pages()
    t0 = time.perf_counter()
    for p in paths:
        pq.ParquetFile(p, memory_map=True).read_row_group(0, columns=["sample_id", "split", "image_emb"], use_threads=False)
    return time.perf_counter() - t0


def in_fresh_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def load_shard(run_uri: str, huge_pages: bool) -> float:
    """In a fresh process: seconds for a ShardActor to load every unit of `run_uri`'s features;
    `huge_pages`: as before `disable_numpy_huge_pages` (the baseline)."""
    from rsdist.cluster import shards
    from rsdist.cluster.shards import ShardActor, plan_units
    from rsdist.core.rundir import RunDir

    if huge_pages:
        shards.disable_numpy_huge_pages = lambda: False

    units = plan_units(RunDir(run_uri), "features")
    t0 = time.perf_counter()
    ShardActor(run_uri, units, "image", "euclidean", "torch", 64 << 20, 1, "float32")
    return time.perf_counter() - t0


def thp_settings() -> dict:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as fh:
                out[name] = fh.read().strip()
        except OSError:
            out[name] = "unknown"
    return out


def micro_bench(a: argparse.Namespace) -> dict:
    from rsdist.cluster.backends import TorchBackend
    from rsdist.cluster.engine import kmeans_pp, torch_threads
    from rsdist.core.rundir import compression

    rng = np.random.default_rng(a.seed)
    out = {"rows": a.rows, "dim": a.dim, "k": a.k, "batch": a.batch, "repeats": a.repeats, "timed": "best of repeats, one torch thread"}
    with torch_threads(1):
        x = torch.from_numpy(rng.standard_normal((a.rows, a.dim), dtype=np.float32))
        c = x[: a.k].clone()
        xb = x[: a.batch]
        f32, bf16 = TorchBackend("euclidean", precision="float32"), TorchBackend("euclidean", precision="bfloat16")
        out["assign"] = pair("float32", best_ms(lambda: f32.assign(xb, c), a.repeats), "bfloat16", best_ms(lambda: bf16.assign(xb, c), a.repeats))
        idx = torch.from_numpy(rng.integers(0, a.rows, a.batch))
        out["gather"] = pair("indexing", best_ms(lambda: x[idx], a.repeats), "index_select", best_ms(lambda: x.index_select(0, idx), a.repeats))
        sample = x[: min(a.rows, 3 * a.batch)].numpy()
        steps = 50  # k-means++ with k = steps: one step = one candidate round over the sample

        def pp_step_ms(bf16_copy: bool) -> float:
            return round(best_ms(lambda: kmeans_pp(sample, steps, np.random.default_rng(0), "euclidean", trials=8, bf16=bf16_copy, gram_bytes=0), a.repeats) / steps, 3)

        out["kmeans_pp_step"] = pair("float32", pp_step_ms(False), "bfloat16", pp_step_ms(True))
        pp_sample = x[: min(a.rows, max(3 * a.batch, 3 * a.k))].numpy()  # the stage's default init sample

        def pp_ms(gram_bytes: int) -> float:
            return best_ms(lambda: kmeans_pp(pp_sample, a.k, np.random.default_rng(0), "euclidean", bf16=True, gram_bytes=gram_bytes), max(1, a.repeats // 5))

        out["kmeans_pp"] = {"sample_rows": len(pp_sample), **pair("per_step_products", pp_ms(0), "gram", pp_ms(1 << 62))}
    with tempfile.TemporaryDirectory(prefix="rsdist-micro-") as tmp:
        table = unit_table(a.rows, a.dim, a.seed)
        zstd, plain = os.path.join(tmp, "zstd.parquet"), os.path.join(tmp, "plain.parquet")
        pq.write_table(table, zstd, compression="zstd")
        pq.write_table(table, plain, compression=compression(table.schema))

        def read(path: str):
            return pq.ParquetFile(path, memory_map=True).read_row_group(0, columns=["sample_id", "split", "image_emb"], use_threads=False)

        out["read_unit"] = pair("zstd", best_ms(lambda: read(zstd), a.repeats), "uncompressed", best_ms(lambda: read(plain), a.repeats))
        os.makedirs(os.path.join(tmp, "features"))
        paths = []
        for i in range(a.units):
            paths.append(os.path.join(tmp, "features", f"part-{i:05d}.parquet"))
            pq.write_table(unit_table(a.rows, a.dim, a.seed + 1 + i), paths[-1], compression=compression(table.schema))
        default_s = in_fresh_process(read_units, paths, False)
        reuse_s = in_fresh_process(read_units, paths, True)
        out["arrow_pages"] = {"units": a.units, "default_decay_s": round(default_s, 3), "reuse_s": round(reuse_s, 3), "ratio": round(default_s / max(reuse_s, 1e-9), 3)}
        huge_s = in_fresh_process(load_shard, tmp, True)
        plain_s = in_fresh_process(load_shard, tmp, False)
        out["huge_pages"] = {"rows": a.units * a.rows, "madvise_s": round(huge_s, 3), "no_huge_pages_s": round(plain_s, 3), "ratio": round(huge_s / max(plain_s, 1e-9), 3), "thp": thp_settings()}
    out["heap"] = in_fresh_process(update_faults, a.k, a.dim, a.batch)
    return out
