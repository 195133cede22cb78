"""Cluster stage: distributed k-means over the training rows' embeddings.

Input:  `<run>/features/part-*.parquet` with sample_id (string), split (string), image_emb and
        text_emb (lists of float32). Only rows with split == "train" are clustered or labelled.
        Space per `cluster.space`: "joint" = concat(l2norm(image_emb), l2norm(text_emb)) / sqrt(2),
        "image" or "text" (l2-normalised).
Output: `<run>/clusters/part-*.parquet` (sample_id string, cluster int32, dist float32: Euclidean
        distance to its centroid, or 1 - cos in spherical mode), one file per input unit;
        `centroids.npy` (k x d float32); `sizes.json` (cluster id -> rows, plus k, inertia,
        iterations, backend, precision, init, mode, metric); `fit.json` (the fitted run's record).
Resources: `num_actors` ShardActors (0 = as many as fit, node by node) with `cpus_per_actor` CPUs
        (fractional, 0.5 by default, so a 2-CPU local Ray keeps running) and, when `cluster.device`
        means GPUs, `gpus_per_actor` GPUs each.
Resume: call through `run_stage(..., resumable=True)`. Centroids are saved before labelling; a
        resumed run with the same fingerprint reuses them and labels only the missing units.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from rsdist.cluster.engine import FitResult, KMeansDriver, auto_k
from rsdist.cluster.shards import ShardActor, Unit, plan_units, split_units
from rsdist.config import ClusterConfig
from rsdist.core.rundir import RunDir
from rsdist.stage import Resources, Stage, StageResult

if TYPE_CHECKING:
    from rsdist.core.raycluster import Demand

log = logging.getLogger("rsdist")

NAME = "clusters"


def actor_resources(cfg: ClusterConfig) -> Resources:
    """Per-actor resources: `gpus_per_actor` GPUs (one when -1) when `cluster.device` means GPUs
    (cuda, or auto on a cluster that has or can add GPU nodes), else none."""
    from rsdist.core.raycluster import use_gpus

    gpus = (1.0 if cfg.gpus_per_actor < 0 else cfg.gpus_per_actor) if use_gpus(cfg.device) else 0.0
    return Resources(num_cpus=cfg.cpus_per_actor, num_gpus=gpus, memory=cfg.memory_per_actor_gb * 1e9)


def check_resources(cfg: ClusterConfig) -> None:
    """Refuse, naming the setting, shard actors the cluster can never place."""
    from rsdist.core.raycluster import check_demand

    check_demand(actor_demand(cfg, actor_resources(cfg)))


def actor_demand(cfg: ClusterConfig, res: Resources) -> Demand:
    """The shard actors' demand: `num_actors` of them (one when decided from the nodes), all
    started before the fit begins."""
    from rsdist.core.raycluster import Demand

    settings = {"CPU": "cluster.cpus_per_actor", "GPU": "cluster.device / cluster.gpus_per_actor", "memory": "cluster.memory_per_actor_gb"}
    return Demand(res.bundle(), settings, count=cfg.num_actors or 1, count_setting="cluster.num_actors", what="shard actors")


def actor_count(cfg: ClusterConfig, res: Resources, units: int, nodes: list[dict[str, float]]) -> int:
    """`num_actors`, or node by node: one actor per GPU share with GPUs, else one per CPU (each
    asking `cpus_per_actor`, half a CPU by default, so the rest of the node stays free)."""
    if cfg.num_actors:
        n = cfg.num_actors
    else:
        bundle = res.bundle()
        per_node = {"GPU": res.num_gpus} if res.num_gpus > 0 else {"CPU": max(1.0, res.num_cpus)}
        n = sum(int(min(float(node.get(k, 0.0)) / v for k, v in {**bundle, **per_node}.items()) + 1e-9) for node in nodes)
    return max(1, min(n, units))


def start_actors(run: RunDir, owners: list[list[Unit]], cfg: ClusterConfig, res: Resources) -> list:
    """One ShardActor per owner list; each reads its own units' training rows."""
    import ray

    # an actor lost with its node is started again elsewhere (it reads its own units again) and
    # the call it was serving is retried, so the fit goes on
    remote = ray.remote(ShardActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=3, max_task_retries=3, **({"memory": res.memory} if res.memory else {}))
    threads = max(1, math.ceil(res.num_cpus))
    log.info("cluster: %d shard actors (%s CPU, %s GPU each) over %d units", len(owners), res.num_cpus, res.num_gpus, sum(map(len, owners)))
    return [remote.remote(run.uri, own, cfg.space, cfg.metric, cfg.backend, cfg.chunk_mb << 20, threads, cfg.precision) for own in owners]


def save_fit(run: RunDir, fit: FitResult, k: int, backend: str, precision: str) -> dict:
    buf = io.BytesIO()
    np.save(buf, fit.centroids.astype(np.float32))
    run.write_bytes(buf.getvalue(), NAME, "centroids.npy")
    record = {
        "k": k, "iterations": fit.iterations, "fit_inertia": fit.inertia, "reseeded": fit.reseeded, "init": fit.init, "backend": backend,
        "precision": precision, "exchange": fit.exchange,
        "fit_seconds": round(fit.seconds, 3), "init_seconds": round(fit.init_seconds, 3), "iterate_seconds": round(fit.seconds - fit.init_seconds, 3),
    }
    run.write_json(record, NAME, "fit.json")
    return record


def load_centroids(run: RunDir) -> np.ndarray:
    with run.fs.open(run.path(NAME, "centroids.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()))


def label_all(run: RunDir, actors: list, owners: list[list[Unit]], centroids: np.ndarray) -> dict:
    """Every actor labels its own units, one call per unit (progress per unit); merged stats back."""
    import ray
    from tqdm import tqdm

    ref = ray.put(centroids)
    pending = [a.label_unit.remote(u, ref, NAME) for a, own in zip(actors, owners) for u in own]
    counts = np.zeros(len(centroids), np.int64)
    rows, inertia, skipped = 0, 0.0, 0
    with tqdm(total=len(pending), desc="cluster labels", unit="unit", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            r = ray.get(done[0])
            counts += r["counts"]
            rows += r["rows"]
            inertia += r["inertia"]
            skipped += r["skipped"]
            bar.update(1)
    return {"rows": rows, "counts": counts, "inertia": inertia, "skipped_units": skipped}


def run(run: RunDir, cfg: ClusterConfig) -> StageResult:
    import ray

    units = plan_units(run, "features")
    from rsdist.core.raycluster import alive_nodes, ensure_demand

    res = actor_resources(cfg)
    ensure_demand(actor_demand(cfg, res))
    owners = split_units(units, actor_count(cfg, res, len(units), alive_nodes()))
    t0 = time.perf_counter()
    actors = start_actors(run, owners, cfg, res)
    try:
        infos = ray.get([a.info.remote() for a in actors])
        read_seconds = time.perf_counter() - t0
        sizes = [i["rows"] for i in infos]
        n = sum(sizes)
        if n == 0:
            raise ValueError(f"{run.url('features')}: no rows with split == 'train' to cluster")
        k = cfg.k if cfg.k else auto_k(n)
        if k > n:
            log.warning("cluster.k = %d is more than the %d training rows; using k = %d", k, n, n)
            k = n
        backend = ",".join(sorted({i["backend"] for i in infos}))
        precision = ",".join(sorted({i["precision"] for i in infos}))
        if run.exists(NAME, "fit.json") and run.exists(NAME, "centroids.npy"):
            record = run.read_json(NAME, "fit.json")
            centroids = load_centroids(run)
            log.info("cluster: reusing the centroids of the interrupted run (k = %d)", len(centroids))
        else:
            fit = KMeansDriver(actors, sizes, k, cfg).fit()
            record = save_fit(run, fit, k, backend, precision)
            centroids = fit.centroids
        t0 = time.perf_counter()
        labels = label_all(run, actors, owners, centroids)
        label_seconds = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)
    summary = {
        "k": int(record["k"]),
        "inertia": labels["inertia"],
        "iterations": int(record["iterations"]),
        "backend": record["backend"],
        "precision": record.get("precision", "float32"),
        "exchange": record.get("exchange", "object-store"),
        "init": record["init"],
        "mode": cfg.mode,
        "metric": cfg.metric,
        "reseeded": int(record["reseeded"]),
        "fit_seconds": record["fit_seconds"],
        "empty_clusters": int((labels["counts"] == 0).sum()),
    }
    # where this run's wall time went (in the StageResult only, so sizes.json stays the same on a
    # resumed run): actors started and read their rows (the slowest actor's read alone in
    # read_only_seconds), initialisation, iterations (a resumed run's are the interrupted run's), labelling
    timings = {
        "read_seconds": round(read_seconds, 3),
        "read_only_seconds": round(max(i["load_seconds"] for i in infos), 3),
        "init_seconds": record.get("init_seconds", 0.0),
        "iterate_seconds": record.get("iterate_seconds", record["fit_seconds"]),
        "label_seconds": round(label_seconds, 3),
    }
    run.write_json({**{str(c): int(v) for c, v in enumerate(labels["counts"])}, **summary}, NAME, "sizes.json")
    return StageResult(rows_in=n, rows_out=labels["rows"], extra={**summary, **timings, "resumed_units": labels["skipped_units"]})


STAGE = Stage(name="cluster", folder=NAME, reads=("features",), section="cluster", resources=actor_resources, run=run, resumable=True, placement=check_resources)
