"""Benchmark of the select stage: seconds per method on a constructed pool, random as the baseline,
and the streamed leverage against a dense SVD (time and largest difference).

`rsdist bench select [--rows N] [--dim D] [--clusters K] [--budget B] [--methods a,b] [--out DIR]
[--mmd-rows M] [--mmd-block-rows B]`; the greedy MMD check times one cluster of M rows picked
whole and in blocks of at most B rows, and measures each pick's MMD to the cluster (a random pick
of the same size is the yardstick).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from rsdist.config import SELECT_METHODS, SelectConfig
from rsdist.core.rundir import RunDir

log = logging.getLogger("rsdist")


def _say(msg: str) -> None:
    print(f"[bench select] {msg}", file=sys.stderr, flush=True)


def _emb(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel(), type=pa.float32()), m.shape[1])


def write_pool(run: RunDir, rows: int, dim: int, clusters: int, seed: int, shard_rows: int = 8192) -> np.ndarray:
    """A Gaussian-mixture pool with 5% exact duplicates, as clusters/ and features/ shards."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 2
    sizes = rng.dirichlet(np.ones(clusters) * 2) * rows
    cluster = np.minimum(np.searchsorted(np.cumsum(sizes), np.arange(rows) + 0.5), clusters - 1).astype(np.int32)
    ids = np.array([f"s{i:09d}" for i in range(rows)], dtype=object)
    for part, start in enumerate(range(0, rows, shard_rows)):
        stop = min(rows, start + shard_rows)
        c = cluster[start:stop]
        img = centres[c] + rng.normal(size=(stop - start, dim)).astype(np.float32)
        dup = rng.random(stop - start) < 0.05
        img[dup] = img[0]
        txt = img + 0.2 * rng.normal(size=img.shape).astype(np.float32)
        feats = pa.table({"sample_id": ids[start:stop].tolist(), "split": ["train"] * (stop - start),
                          "image_emb": _emb(img), "text_emb": _emb(txt),
                          "shift": rng.random(stop - start).astype(np.float32)})
        run.write_table(feats, "features", f"part-{part:05d}.parquet")
        run.write_table(pa.table({"sample_id": ids[start:stop].tolist(), "cluster": pa.array(c),
                                  "dist": pa.array(np.zeros(stop - start, np.float32))}), "clusters", f"part-{part:05d}.parquet")
    return cluster


def leverage_check(rows: int, dim: int, seed: int) -> dict:
    """Streamed Gram leverage vs dense SVD leverage on the same matrix."""
    from rsdist.select.scalselect import GramAccumulator, dominant_subspace, leverage_scores

    x = np.random.default_rng(seed).normal(size=(rows, dim)) @ np.diag(np.linspace(3, 0.1, dim)) + 1.0
    t0 = time.perf_counter()
    acc = GramAccumulator(dim)
    for i in range(0, rows, 4096):
        acc.add(x[i:i + 4096])
    sub = dominant_subspace(acc, 0.9)
    streamed = np.concatenate([leverage_scores(x[i:i + 4096], sub) for i in range(0, rows, 4096)])
    t_stream = time.perf_counter() - t0
    t0 = time.perf_counter()
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    dense = (u[:, :sub.k] ** 2).sum(1)
    t_dense = time.perf_counter() - t0
    return {"leverage_rows": rows, "leverage_dim": dim, "leverage_rank_k": sub.k,
            "leverage_streamed_s": round(t_stream, 3), "leverage_dense_svd_s": round(t_dense, 3),
            "leverage_dense_over_streamed": round(t_dense / max(t_stream, 1e-9), 2),
            "leverage_max_abs_diff": float(np.abs(streamed - dense).max())}


def mmd_to(x: np.ndarray, picks: np.ndarray, chunk: int = 2048) -> float:
    """MMD^2 (RBF, width 1) between the rows `picks` of `x` and all of `x`, in row chunks (no m x m kernel)."""
    from rsdist.select.coincide import _sq_dists

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        return sum(float(np.exp(-_sq_dists(a[i:i + chunk], b) / 2.0).sum()) for i in range(0, len(a), chunk)) / (len(a) * len(b))

    s = x[picks]
    return kernel_mean(s, s) - 2.0 * kernel_mean(s, x) + kernel_mean(x, x)


def mmd_check(rows: int, dim: int, budget: float, block_rows: int, seed: int) -> dict:
    """Greedy MMD over one cluster of `rows` unit rows (20 sub-modes), whole and in blocks: seconds,
    kernel memory and the MMD^2 of each pick to the cluster, with a random pick as the yardstick."""
    from rsdist.select.budget import budget_count
    from rsdist.select.coincide import blocked_greedy_mmd, greedy_mmd

    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(20, dim))
    x = modes[rng.integers(0, 20, rows)] + 1.5 * rng.normal(size=(rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = budget_count(budget, rows)
    t0 = time.perf_counter()
    whole = greedy_mmd(x, n)
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    blocked = blocked_greedy_mmd(x, n, block_rows=block_rows, seed=seed)
    t_blocked = time.perf_counter() - t0
    mmd = {name: mmd_to(x, p) for name, p in (("whole", whole), ("blocked", blocked), ("random", rng.choice(rows, n, replace=False)))}
    return {"mmd_rows": rows, "mmd_dim": dim, "mmd_picks": n, "mmd_block_rows": block_rows,
            "mmd_whole_s": round(t_whole, 3), "mmd_blocked_s": round(t_blocked, 3),
            "mmd_blocked_over_whole": round(t_blocked / max(t_whole, 1e-9), 3),
            "mmd_whole_kernel_mb": round(rows * rows * 8 / 2**20, 1),
            "mmd_blocked_kernel_mb": round(min(rows, block_rows) ** 2 * 8 / 2**20, 1),
            "mmd2_whole": mmd["whole"], "mmd2_blocked": mmd["blocked"], "mmd2_random": mmd["random"]}


def bench(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rsdist bench select", description=__doc__)
    p.add_argument("--rows", type=int, default=20000, help="pool rows")
    p.add_argument("--dim", type=int, default=256, help="embedding size of each tower")
    p.add_argument("--clusters", type=int, default=100, help="clusters in the pool")
    p.add_argument("--budget", type=float, default=1 / 3, help="fraction or count")
    p.add_argument("--methods", default="random,cluster-random,shift,scalselect,semdedup,coincide",
                   help=f"comma-separated, from {SELECT_METHODS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory to build the pool in (default: a temporary one)")
    p.add_argument("--mmd-rows", type=int, default=8000, help="rows of the one cluster of the greedy MMD check (0: skip the check)")
    p.add_argument("--mmd-block-rows", type=int, default=1024, help="block size of the blocked side of the greedy MMD check")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if "random" not in methods:
        methods.insert(0, "random")  # the baseline is always measured in the same run

    from rsdist.core.raycluster import init_ray
    from rsdist.select import stage as select

    init_ray()
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="rsdist-bench-select-")
    run = RunDir(args.out or tmp.name)
    _say(f"writing a pool of {args.rows} rows, {args.clusters} clusters, 2 x {args.dim}-d embeddings")
    write_pool(run, args.rows, args.dim, args.clusters, args.seed)
    out: dict = {"rows": args.rows, "dim": args.dim, "clusters": args.clusters, "budget": args.budget}
    for method in methods:
        _say(f"method {method}")
        t0 = time.perf_counter()
        result = select.run(run, SelectConfig(method=method, budget=args.budget, seed=args.seed))
        out[f"{method}_s"] = round(time.perf_counter() - t0, 3)
        out[f"{method}_selected"] = result.rows_out
    for method in methods:
        if method != "random":
            out[f"{method}_over_random"] = round(out[f"{method}_s"] / max(out["random_s"], 1e-9), 2)
    _say("streamed leverage vs dense SVD")
    out.update(leverage_check(args.rows, 2 * args.dim, args.seed))
    if args.mmd_rows > 0:
        _say(f"greedy MMD on one cluster of {args.mmd_rows} rows: whole vs blocks of {args.mmd_block_rows}")
        out.update(mmd_check(args.mmd_rows, 2 * args.dim, args.budget, args.mmd_block_rows, args.seed))
    if tmp is not None:
        tmp.cleanup()
    return out
