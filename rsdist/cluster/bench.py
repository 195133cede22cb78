"""k-means benchmark: the cluster stage against scikit-learn's MiniBatchKMeans on generated blobs.

`bench(["--rows", "1000000", "--dim", "384", "--k", "1000"])` writes unit-norm Gaussian blobs as a
features folder (image_emb, split = train), runs the cluster stage on Ray (space "image", which
only re-normalises the rows), then fits MiniBatchKMeans with the same batch size, initialisation
sample, re-assignment ratio and stopping rule on the same matrix in memory, and returns wall
times, their ratio, full-data inertias, their ratio and each one's adjusted Rand index against the
true blob labels. `write_blob_features` is also what the tests use to build their input.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from rsdist.io.rundir import RunDir

log = logging.getLogger("rsdist")


def blob_centers(k: int, dim: int, seed: int) -> np.ndarray:
    c = np.random.default_rng([seed, 1]).standard_normal((k, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def write_blob_features(
    run: RunDir,
    rows: int,
    dim: int,
    k: int,
    *,
    seed: int = 0,
    spread: float = 0.5,
    shard_rows: int = 50_000,
    text_dim: int | None = None,
    test_fraction: float = 0.0,
    folder: str = "features",
) -> np.ndarray:
    """Write `rows` samples around k unit-norm centers as `<folder>/part-*.parquet`, one shard at a
    time (never the whole matrix), and return the true blob label of every row (by row index; the
    sample_id is `blob-<index>`). Noise has norm about `spread`; text_emb (when `text_dim`) is an
    independent noisy view of the same blob in its own space; `test_fraction` of rows get split
    "test"."""
    centers = blob_centers(k, dim, seed)
    text_centers = blob_centers(k, text_dim, seed + 1) if text_dim else None
    truth = np.random.default_rng([seed, 2]).integers(0, k, size=rows)
    for part, lo in enumerate(range(0, rows, shard_rows)):
        hi = min(rows, lo + shard_rows)
        rng = np.random.default_rng([seed, 3, part])
        lab = truth[lo:hi]
        x = centers[lab] + rng.standard_normal((hi - lo, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
        cols = {
            "sample_id": pa.array([f"blob-{i:09d}" for i in range(lo, hi)], pa.string()),
            "split": pa.array(np.where(rng.random(hi - lo) < test_fraction, "test", "train"), pa.string()),
            "label": pa.array([f"c{j}" for j in lab], pa.string()),
            "image_emb": fixed_list(x),
        }
        if text_centers is not None:
            t = text_centers[lab] + rng.standard_normal((hi - lo, text_dim), dtype=np.float32) * np.float32(spread / math.sqrt(text_dim))
            cols["text_emb"] = fixed_list(t)
        cols["shift"] = pa.array(rng.random(hi - lo).astype(np.float32), pa.float32())
        run.write_table(pa.table(cols), folder, f"part-{part:05d}.parquet")
    return truth


def stage_labels(run: RunDir, rows: int) -> np.ndarray:
    """The stage's cluster of every row, by row index (-1 where a row has none)."""
    out = np.full(rows, -1, np.int64)
    for b in run.iter_batches("clusters", columns=["sample_id", "cluster"], batch_size=65536):
        idx = np.array([int(s[5:]) for s in b.column(0).to_pylist()])
        out[idx] = b.column(1).to_numpy()
    return out


def read_matrix(run: RunDir) -> np.ndarray:
    from rsdist.cluster.shards import l2_normalise, embedding_matrix

    parts = [embedding_matrix(b.column(0), "image_emb", "bench") for b in run.iter_batches("features", columns=["image_emb"], batch_size=65536)]
    return l2_normalise(np.concatenate(parts))


def bench(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rsdist bench kmeans", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=4096, help="mini-batch rows (both)")
    p.add_argument("--epochs", type=int, default=10, help="at most this many passes' worth of mini-batches (both)")
    p.add_argument("--max-no-improvement", type=int, default=10)
    p.add_argument("--spread", type=float, default=0.5, help="blob noise norm (centers are unit vectors)")
    p.add_argument("--actors", type=int, default=0, help="shard actors; 0 = from the cluster's CPUs")
    p.add_argument("--mode", default="minibatch", choices=["minibatch", "lloyd"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default: a temporary folder)")
    p.add_argument("--skip-sklearn", action="store_true")
    a = p.parse_args(argv)

    from sklearn.metrics import adjusted_rand_score

    from rsdist.cluster.stage import run as cluster_run
    from rsdist.config import ClusterConfig
    from rsdist.raycluster import init_ray

    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="rsdist-kmeans-")
    run = RunDir(a.out or tmp.name)
    t0 = time.perf_counter()
    truth = write_blob_features(run, a.rows, a.dim, a.k, seed=a.seed, spread=a.spread)
    print(f"generated {a.rows} x {a.dim} blobs (k = {a.k}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    init_ray()
    init_sample = max(3 * a.batch, 3 * a.k)
    max_iter = max(1, a.epochs * a.rows // a.batch)
    cfg = ClusterConfig(
        k=a.k, space="image", mode=a.mode, batch_size=a.batch, max_iter=max_iter if a.mode == "minibatch" else a.epochs,
        tol=0.0, max_no_improvement=a.max_no_improvement, init="k-means++", init_sample=init_sample, num_actors=a.actors, seed=a.seed,
    )
    run.remove("clusters")
    run.makedirs("clusters")
    t0 = time.perf_counter()
    res = cluster_run(run, cfg)
    ours_s = time.perf_counter() - t0
    ours_ari = adjusted_rand_score(truth, stage_labels(run, a.rows))
    print(f"rsdist: {ours_s:.1f}s (fit {res.extra['fit_seconds']:.1f}s, {res.extra['iterations']} iterations), inertia {res.extra['inertia']:.6g}, ARI {ours_ari:.4f}", file=sys.stderr)
    out = {
        "rows": a.rows, "dim": a.dim, "k": a.k, "batch": a.batch, "mode": a.mode,
        "rsdist_seconds": round(ours_s, 3), "rsdist_fit_seconds": res.extra["fit_seconds"], "rsdist_iterations": res.extra["iterations"],
        "rsdist_inertia": res.extra["inertia"], "rsdist_ari": round(float(ours_ari), 5), "rsdist_backend": res.extra["backend"],
    }
    if not a.skip_sklearn:
        from sklearn.cluster import MiniBatchKMeans

        x = read_matrix(run)
        km = MiniBatchKMeans(
            n_clusters=a.k, batch_size=a.batch, max_iter=a.epochs, n_init=1, init="k-means++", init_size=init_sample,
            reassignment_ratio=0.01, max_no_improvement=a.max_no_improvement, tol=0.0, random_state=a.seed,
        )
        t0 = time.perf_counter()
        km.fit(x)
        sk_s = time.perf_counter() - t0
        sk_ari = adjusted_rand_score(truth, km.labels_)
        print(f"sklearn: {sk_s:.1f}s ({km.n_steps_} steps), inertia {km.inertia_:.6g}, ARI {sk_ari:.4f}", file=sys.stderr)
        out.update(
            sklearn_seconds=round(sk_s, 3), sklearn_steps=int(km.n_steps_), sklearn_inertia=float(km.inertia_), sklearn_ari=round(float(sk_ari), 5),
            wall_ratio=round(ours_s / sk_s, 4), fit_wall_ratio=round(res.extra["fit_seconds"] / sk_s, 4), inertia_ratio=round(res.extra["inertia"] / float(km.inertia_), 5),
        )
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(bench(sys.argv[1:])))
