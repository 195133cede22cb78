"""k-means benchmark: the cluster stage against scikit-learn's MiniBatchKMeans on generated blobs.

`bench(["--rows", "1000000", "--dim", "384", "--k", "1000"])` writes unit-norm Gaussian blobs as a
features folder (image_emb, split = train), runs the cluster stage on Ray (space "image", which
only re-normalises the rows), then fits MiniBatchKMeans with the same batch size, initialisation
sample, re-assignment ratio and stopping rule on the same matrix in memory, and returns wall
times, their ratio, full-data inertias, their ratio and each one's adjusted Rand index against the
true blob labels. `write_blob_features` is also what the tests use to build their input.

What is timed (`timed` in the figures): for rsdist the whole stage, i.e. starting the shard
actors, reading and normalising the features parquet, initialisation, iterations, and the
labelling pass that writes sample_id / cluster / dist parquet, split into those parts; for
scikit-learn `fit` on the matrix already in memory, which includes its final labels_ / inertia_
pass over every row. Generating the blobs and writing them to parquet is timed on neither side;
Ray is shut down before scikit-learn runs, so its idle processes do not share its cores.

`--device-pass` times the backends instead (no Ray, no parquet): blobs are generated on the
device in chunks (never as one host array), and each backend runs `--iters` full Lloyd passes;
the figures are seconds per pass against the memory-bandwidth floor of reading the data once
(bytes / bandwidth, the bandwidth from `--bandwidth-gbs` or measured with a device copy).
Without CUDA it runs torch on the CPU and reports the GPU-only backends as skipped.
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

from rsdist.core.rundir import RunDir

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
    truth = blob_truth(rows, k, seed)
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
    from rsdist.core.tables import embedding_matrix, unit_rows

    parts = [embedding_matrix(b.column(0), "image_emb", "bench") for b in run.iter_batches("features", columns=["image_emb"], batch_size=65536)]
    return unit_rows(np.concatenate(parts))


BLOB_FORMAT = 2  # 2: embeddings stored uncompressed (RunDir.write_table); older folders are rewritten


def blob_truth(rows: int, k: int, seed: int) -> np.ndarray:
    """The true blob of every row of `write_blob_features(..., rows, k, seed=seed)`."""
    return np.random.default_rng([seed, 2]).integers(0, k, size=rows)


def blob_features(run: RunDir, a: argparse.Namespace) -> np.ndarray:
    """Write the blobs unless `run` already holds the same ones (so a benchmark can be repeated on
    one generated folder); return the true labels."""
    spec = {"rows": a.rows, "dim": a.dim, "k": a.k, "seed": a.seed, "spread": a.spread, "format": BLOB_FORMAT}
    if run.exists("features", "blobs.json") and run.read_json("features", "blobs.json") == spec:
        print(f"reusing {a.rows} x {a.dim} blobs (k = {a.k}) in {run.url('features')}", file=sys.stderr)
        return blob_truth(a.rows, a.k, a.seed)
    run.remove("features")
    t0 = time.perf_counter()
    truth = write_blob_features(run, a.rows, a.dim, a.k, seed=a.seed, spread=a.spread)
    run.write_json(spec, "features", "blobs.json")
    print(f"generated {a.rows} x {a.dim} blobs (k = {a.k}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return truth


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsdist bench kmeans", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=4096, help="mini-batch rows (both)")
    p.add_argument("--epochs", type=int, default=10, help="at most this many passes' worth of mini-batches (both)")
    p.add_argument("--max-no-improvement", type=int, default=10)
    p.add_argument("--spread", type=float, default=0.5, help="blob noise norm (centers are unit vectors)")
    p.add_argument("--actors", type=int, default=0, help="shard actors; 0 = from the cluster's CPUs")
    p.add_argument("--cpus-per-actor", type=float, default=0.5, help="CPUs per shard actor (its torch threads: this, rounded up)")
    p.add_argument("--mode", default="minibatch", choices=["minibatch", "lloyd"])
    p.add_argument("--no-overlap", action="store_true", help="cluster.overlap = false: the synchronous mini-batch loop")
    p.add_argument("--no-shared-memory", action="store_true", help="cluster.shared_memory = false: centroids and sums through Ray's object store")
    p.add_argument("--precision", default=None, choices=["auto", "float32", "bfloat16"], help="cluster.precision of the torch backend (default: auto for the stage, float32 for --device-pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default: a temporary folder); blobs already there with the same flags are reused")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="time each side this many times, alternating which goes first; figures from each side's median round")
    m = p.add_argument_group("--micro: the per-change figures of docs/cluster.md (rsdist/cluster/micro.py)")
    m.add_argument("--micro", action="store_true", help="time each change against its baseline instead of the stage against scikit-learn")
    m.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (the best is kept)")
    m.add_argument("--units", type=int, default=10, help="parquet units read for the arrow-pages figure")
    g = p.add_argument_group("--device-pass: the backends' full passes on one device (no Ray, no parquet)")
    g.add_argument("--device-pass", action="store_true", help="time backends on the device instead of the stage against scikit-learn")
    g.add_argument("--backends", default="torch,cupy", help="comma-separated backends to time (torch, cupy, cuml)")
    g.add_argument("--iters", type=int, default=3, help="timed full passes per backend (after one untimed warm-up pass)")
    g.add_argument("--bandwidth-gbs", type=float, default=0.0, help="device memory bandwidth in GB/s for the floor; 0 = measure with a device copy")
    g.add_argument("--chunk-mb", type=int, default=1024, help="memory bound of one rows-by-k distance block")
    g.add_argument("--gen-rows", type=int, default=1 << 20, help="rows generated per chunk on the device")
    return p.parse_args(argv)


def bench(argv: list[str]) -> dict:
    a = parse(argv)
    if a.micro:
        from rsdist.bench.kmeans_micro import micro_bench

        return micro_bench(a)
    return device_pass_bench(a) if a.device_pass else stage_bench(a)


def stage_bench(a: argparse.Namespace) -> dict:
    """The cluster stage against scikit-learn on the same blobs; with `--rounds N`, N timings of each
    side, alternating which goes first, and the ratio of the medians (one run's ratio moves with
    whatever else the machine is doing)."""
    import ray

    from rsdist.core.raycluster import init_ray

    if a.rounds < 1:
        raise SystemExit(f"rsdist bench kmeans: --rounds {a.rounds}: must be at least 1")
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="rsdist-kmeans-")
    run = RunDir(a.out or tmp.name)
    truth = blob_features(run, a)
    own_ray = not ray.is_initialized()  # a Ray this bench starts is shut down while scikit-learn runs
    init_sample = max(3 * a.batch, 3 * a.k)
    x_in_memory = None if a.skip_sklearn else read_matrix(run)
    ours, theirs = [], []
    for r in range(a.rounds):
        sides = ["rsdist", "sklearn"] if r % 2 == 0 else ["sklearn", "rsdist"]
        for side in sides:
            if side == "rsdist":
                init_ray()
                ours.append(rsdist_figures(run, a, truth, init_sample))
            elif x_in_memory is not None:
                if own_ray:
                    ray.shutdown()
                theirs.append(sklearn_figures(a, x_in_memory, truth, init_sample))
    if own_ray and ray.is_initialized():
        ray.shutdown()
    out = {
        "rows": a.rows, "dim": a.dim, "k": a.k, "batch": a.batch, "mode": a.mode, "actors": a.actors, "cpus_per_actor": a.cpus_per_actor,
        "timed": {
            "rsdist": "whole cluster stage: actor start-up + parquet read (read), k-means++ on the sample (init), iterations (iterate), labelling pass writing parquet (label)",
            "sklearn": "MiniBatchKMeans.fit on the in-memory matrix, including its final labels_/inertia_ pass; the parquet read is not timed",
        },
        **median_round(ours, "rsdist_seconds"),
    }
    if theirs:
        out.update(median_round(theirs, "sklearn_seconds"))
        out.update(
            wall_ratio=round(out["rsdist_seconds"] / out["sklearn_seconds"], 4),
            fit_wall_ratio=round(out["rsdist_fit_seconds"] / out["sklearn_seconds"], 4),
            inertia_ratio=round(out["rsdist_inertia"] / out["sklearn_inertia"], 5),
        )
        if a.rounds > 1:
            out["rounds"] = a.rounds
            out["round_wall_ratios"] = [round(o["rsdist_seconds"] / t["sklearn_seconds"], 4) for o, t in zip(ours, theirs)]
    if tmp is not None:
        tmp.cleanup()
    return out


def median_round(rounds: list[dict], key: str) -> dict:
    """One side's figures from the round with its median `key` (wall seconds), plus every round's."""
    times = [r[key] for r in rounds]
    middle = sorted(rounds, key=lambda r: r[key])[(len(rounds) - 1) // 2]
    return {**middle, f"{key.split('_')[0]}_round_seconds": times} if len(rounds) > 1 else middle


def rsdist_figures(run: RunDir, a: argparse.Namespace, truth: np.ndarray, init_sample: int) -> dict:
    """One timed run of the whole cluster stage on the blobs in `run`."""
    from sklearn.metrics import adjusted_rand_score

    from rsdist.cluster.stage import run as cluster_run
    from rsdist.config import ClusterConfig

    max_iter = max(1, a.epochs * a.rows // a.batch)
    cfg = ClusterConfig(
        k=a.k, space="image", mode=a.mode, batch_size=a.batch, max_iter=max_iter if a.mode == "minibatch" else a.epochs,
        tol=0.0, max_no_improvement=a.max_no_improvement, init="k-means++", init_sample=init_sample, num_actors=a.actors,
        cpus_per_actor=a.cpus_per_actor, seed=a.seed, precision=a.precision or "auto", overlap=not a.no_overlap,
        shared_memory=not a.no_shared_memory,
    )
    run.remove("clusters")
    run.makedirs("clusters")
    t0 = time.perf_counter()
    res = cluster_run(run, cfg)
    ours_s = time.perf_counter() - t0
    x = res.extra
    ours_ari = adjusted_rand_score(truth, stage_labels(run, a.rows))
    split = {p: x[f"{p}_seconds"] for p in ("read", "init", "iterate", "label")}
    print(f"rsdist: {ours_s:.1f}s ({', '.join(f'{p} {v:.1f}s' for p, v in split.items())}; {x['iterations']} iterations), inertia {x['inertia']:.6g}, ARI {ours_ari:.4f}", file=sys.stderr)
    return {
        "rsdist_seconds": round(ours_s, 3), "rsdist_split_seconds": split, "rsdist_read_only_seconds": x["read_only_seconds"],
        "rsdist_fit_seconds": x["fit_seconds"], "rsdist_iterations": x["iterations"],
        "rsdist_inertia": x["inertia"], "rsdist_ari": round(float(ours_ari), 5), "rsdist_backend": x["backend"], "rsdist_precision": x["precision"], "rsdist_overlap": not a.no_overlap,
        "rsdist_exchange": x.get("exchange", "object-store"),
    }


def sklearn_figures(a: argparse.Namespace, x: np.ndarray, truth: np.ndarray, init_sample: int) -> dict:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import adjusted_rand_score

    km = MiniBatchKMeans(
        n_clusters=a.k, batch_size=a.batch, max_iter=a.epochs, n_init=1, init="k-means++", init_size=init_sample,
        reassignment_ratio=0.01, max_no_improvement=a.max_no_improvement, tol=0.0, random_state=a.seed,
    )
    t0 = time.perf_counter()
    km.fit(x)
    sk_s = time.perf_counter() - t0
    sk_ari = adjusted_rand_score(truth, km.labels_)
    print(f"sklearn: {sk_s:.1f}s ({km.n_steps_} steps), inertia {km.inertia_:.6g}, ARI {sk_ari:.4f}", file=sys.stderr)
    return {"sklearn_seconds": round(sk_s, 3), "sklearn_steps": int(km.n_steps_), "sklearn_inertia": float(km.inertia_), "sklearn_ari": round(float(sk_ari), 5)}


# ----- --device-pass ----------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_blobs(rows: int, dim: int, k: int, seed: int, spread: float, device, chunk_rows: int):
    """Blobs as one (rows, dim) float32 tensor generated on `device` chunk by chunk, with the same
    geometry as `write_blob_features` (unit-norm centers, noise of norm about `spread`)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(k, dim, generator=gen, device=device)
    centers /= torch.linalg.vector_norm(centers, dim=1, keepdim=True)
    x = torch.empty(rows, dim, device=device)
    for lo in range(0, rows, chunk_rows):
        block = x[lo : lo + chunk_rows]
        lab = torch.randint(0, k, (block.shape[0],), generator=gen, device=device)
        block.normal_(0.0, spread / math.sqrt(dim), generator=gen).add_(centers[lab])
    return x


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (counting the read and the write), best of 3."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def time_passes(backend, x, c, iters: int) -> list[float]:
    """Seconds of each of `iters` full Lloyd passes (assign + per-centroid sums), after a warm-up."""
    from rsdist.cluster.shards import full_sums

    times = []
    for i in range(iters + 1):
        sync(x.device)
        t0 = time.perf_counter()
        full_sums(backend, x, c)
        sync(x.device)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def device_pass_bench(a: argparse.Namespace) -> dict:
    import torch

    from rsdist.cluster.backends import make_backend

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    t0 = time.perf_counter()
    x = device_blobs(a.rows, a.dim, a.k, a.seed, a.spread, device, a.gen_rows)
    c = x[torch.randperm(a.rows, generator=torch.Generator().manual_seed(a.seed))[: a.k].to(device)].clone()
    sync(device)
    print(f"generated {a.rows} x {a.dim} blobs on {device} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    data_bytes = a.rows * a.dim * 4
    bandwidth = a.bandwidth_gbs * 1e9 if a.bandwidth_gbs > 0 else copy_bandwidth(device, min(1 << 30, max(64 << 20, data_bytes)))
    floor = data_bytes / bandwidth
    out = {
        "rows": a.rows, "dim": a.dim, "k": a.k, "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "timed": "one full Lloyd pass (assign every row + per-centroid sums) on data already on the device",
        "data_bytes": data_bytes, "bandwidth_gbs": round(bandwidth / 1e9, 1), "bandwidth_source": "flag" if a.bandwidth_gbs > 0 else "device copy",
        "floor_seconds": round(floor, 6), "backends": {},
    }
    for name in [b.strip() for b in a.backends.split(",") if b.strip()]:
        backend = make_backend(name, "euclidean", a.chunk_mb << 20, has_gpu=gpu, precision=a.precision or "float32")
        if not backend_is(backend, name):
            out["backends"][name] = {"skipped": f"needs CUDA and rsdist[gpu]; got {backend.name}"}
            continue
        times = time_passes(backend, x, c, a.iters)
        per_pass = float(np.median(times))
        out["backends"][name] = {
            "backend": backend.name, "seconds_per_iter": round(per_pass, 6), "iters": len(times),
            "x_floor": round(per_pass / floor, 2), "tflops": round(2 * a.rows * a.k * a.dim / per_pass / 1e12, 2),
        }
        print(f"{backend.name}: {per_pass:.4f}s per pass, {per_pass / floor:.1f} x the bandwidth floor {floor:.4f}s", file=sys.stderr)
    return out


def backend_is(backend, name: str) -> bool:
    """Whether `make_backend` gave the backend asked for (it falls back to torch without a GPU)."""
    return backend.name.startswith("torch") if name in ("auto", "torch") else backend.name == name


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(json.dumps(bench(sys.argv[1:])))
