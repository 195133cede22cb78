"""Benchmark of the pool-sized stages at scale: generate, cluster and select N rows on Ray workers.

`rsdist bench scale --rows N [--dim D] [--k K] [--methods a,b] [--budget B] [--shard-rows S]
[--rows-per-task R] [--mmd-block-rows M] [--init-pool P] [--select distributed|inprocess] [--baseline-rows N0 [--baseline-select
distributed|inprocess]] [--out DIR] [--keep]`

1. generate: Ray tasks write N rows of synthetic features (features/: sample_id, split, image_emb
   and text_emb of D float32 each, shift) and shard columns (shards/: sample_id, captions, text)
   in the run directory's schema, S rows per file; the driver only hands out file numbers.
2. cluster: the cluster stage (k-means on shard actors) with k = K.
3. select: each method of --methods (default: the default method and every method with a
   pool-wide statistic), through the stage runner, writing selection/manifest.parquet.
   `--select inprocess` runs the single-process select of rsdist.select.inprocess instead (the
   version that reads the pool into the driver), to measure it on the same pool.

4. with --baseline-rows, steps 1-3 run first on a pool of N0 rows (in a temporary directory,
   removed afterwards) with the select of --baseline-select, and the figures add each stage's
   seconds per row over the baseline's (`<stage>:per_row_vs_baseline`): ratios measured in one
   process, minutes apart, which is what a shared machine allows to compare.

Memory is sampled every 0.1 s during the run: the driver's RSS (and its peak from getrusage) and
the largest RSS of a Ray worker process (the descendants of the driver named `ray::...`, which is
every task and actor process of the local Ray the bench starts). Per stage: seconds, rows per
second, the driver's and the largest worker's peak RSS. One JSON object on the last line.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

from rsdist.config import ClusterConfig, SelectConfig
from rsdist.core.rundir import RunDir

DEFAULT_METHODS = ("alignment-mmd", "scalselect", "caption-diversity", "caption-typicality", "semdedup")
TOPICS = ("airport", "beach", "bridge", "farmland", "forest", "harbor", "meadow", "mountain", "parking", "port", "railway", "river", "school", "square", "stadium", "storage", "viaduct", "church", "desert", "pond")
WORDS = ("many", "several", "green", "white", "large", "small", "trees", "buildings", "cars", "roads", "boats", "planes", "houses", "fields", "lines", "some", "two", "three", "dense", "sparse")


def _say(msg: str) -> None:
    print(f"[bench scale] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _emb(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel(), type=pa.float32()), m.shape[1])


def synthetic_part(run: RunDir, part: int, start: int, stop: int, dim: int, topics: int, seed: int) -> int:
    """Rows [start, stop) of the synthetic pool as features/part-<part> and shards/part-<part>:
    a Gaussian mixture of `topics` components (5% exact duplicates), text = image + noise, and
    captions built from the component's topic word (a third of them one generic sentence)."""
    centres = np.random.default_rng(seed).normal(size=(topics, dim)).astype(np.float32) * 2
    rng = np.random.default_rng([seed, part])
    n = stop - start
    topic = rng.integers(0, topics, n)
    img = centres[topic] + rng.normal(size=(n, dim)).astype(np.float32)
    dup = np.flatnonzero(rng.random(n) < 0.05)
    img[dup] = img[0]
    txt = img + 0.5 * rng.normal(size=img.shape).astype(np.float32)
    ids = [f"s{i:010d}" for i in range(start, stop)]
    words = rng.integers(0, len(WORDS), (n, 2))
    generic = rng.random(n) < 1 / 3
    captions = [
        ["a generic scene ."] if g else [f"a {TOPICS[t % len(TOPICS)]} with {WORDS[a]} {WORDS[b]}", f"{WORDS[b]} near the {TOPICS[t % len(TOPICS)]} {i % 97}"]
        for i, t, (a, b), g in zip(range(start, stop), topic, words, generic)
    ]
    feats = pa.table({"sample_id": ids, "split": ["train"] * n, "image_emb": _emb(img), "text_emb": _emb(txt), "shift": rng.random(n).astype(np.float32)})
    run.write_table(feats, "features", f"part-{part:05d}.parquet")
    run.write_table(pa.table({"sample_id": ids, "captions": pa.array(captions, type=pa.list_(pa.string())), "text": [c[0] for c in captions]}), "shards", f"part-{part:05d}.parquet")
    return n


def generate(run: RunDir, rows: int, dim: int, shard_rows: int, seed: int) -> int:
    import ray

    task = ray.remote(num_cpus=0.5)(synthetic_part)
    parts = [(p, s, min(rows, s + shard_rows)) for p, s in enumerate(range(0, rows, shard_rows))]
    pending = [task.remote(run, p, s, e, dim, 20, seed) for p, s, e in parts]
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=min(len(pending), max(1, len(parts) // 10)))
        done += sum(ray.get(ready))
        _say(f"generated {done:,} of {rows:,} rows")
    return done


class MemorySampler:
    """Samples the driver's RSS and its Ray worker processes' RSS while a stage runs."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.every = every
        self.stage = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _workers(self) -> list:
        out = []
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::") or " ".join(p.cmdline()[:1]).startswith("ray::"):
                    out.append(p)
            except Exception:
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            peak = self.peaks.setdefault(self.stage, {"driver": 0, "worker": 0})
            peak["driver"] = max(peak["driver"], self.me.memory_info().rss)
            for p in self._workers():
                try:
                    peak["worker"] = max(peak["worker"], p.memory_info().rss)
                except Exception:
                    continue
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _mb(b: float) -> float:
    return round(b / 2**20, 1)


def measure(root: str, rows: int, dim: int, k: int, methods: list[str], select_path: str, budget: float, shard_rows: int, rows_per_task: int, mmd_block_rows: int, seed: int, init_pool: int = 0) -> dict:
    """Generate `rows` rows under `root`, cluster them and run each select method; the figures."""
    from rsdist.cluster import stage as cluster_stage
    from rsdist.stage import fingerprint, run_stage

    run = RunDir(root)
    figures: dict = {"rows": rows, "dim": dim, "select_path": select_path}
    seconds: dict[str, float] = {}
    with MemorySampler() as mem:
        mem.stage = "generate"
        t0 = time.perf_counter()
        generate(run, rows, dim, shard_rows, seed)
        seconds["generate"] = time.perf_counter() - t0
        mem.stage = "cluster"
        _say(f"cluster {rows:,} rows")
        t0 = time.perf_counter()
        res = run_stage(run, "clusters", fingerprint("bench", rows, k), lambda: cluster_stage.run(run, ClusterConfig(k=k, seed=seed, init_pool=init_pool)), force=True)
        seconds["cluster"] = time.perf_counter() - t0
        figures["k"] = res.get("k")
        figures.update({"cluster:init": res.get("init"), "cluster:init_seconds": res.get("init_seconds"), "cluster:inertia": res.get("inertia")})
        for method in methods:
            stage = f"select:{method}"
            mem.stage = stage
            _say(f"{stage} ({select_path}, {rows:,} rows)")
            extra = {"rows_per_task": rows_per_task} if rows_per_task else {}
            extra.update({"mmd_block_rows": mmd_block_rows} if mmd_block_rows >= 0 else {})
            cfg = SelectConfig(method=method, budget=budget, seed=seed, **extra)
            if select_path == "inprocess":
                from rsdist.select import inprocess as select_stage
            else:
                from rsdist.select import stage as select_stage
            t0 = time.perf_counter()
            out = run_stage(run, "selection", fingerprint(stage), lambda: select_stage.run(run, cfg), force=True)
            seconds[stage] = time.perf_counter() - t0
            figures[f"{stage}:selected"] = out["rows_out"]
            figures[f"{stage}:phases"] = {k_: v for k_, v in out.items() if k_.endswith("_seconds") and k_ != "seconds"}
            _say(f"{stage}: {seconds[stage]:.1f} s")
    for stage, s in seconds.items():
        figures[f"{stage}:seconds"] = round(s, 2)
        figures[f"{stage}:rows_per_s"] = round(rows / max(s, 1e-9), 1)
        peak = mem.peaks.get(stage, {})
        figures[f"{stage}:driver_rss_mb"] = _mb(peak.get("driver", 0))
        figures[f"{stage}:worker_rss_mb"] = _mb(peak.get("worker", 0))
    select_seconds = [s for k_, s in seconds.items() if k_.startswith("select:")]
    figures["select_seconds_per_method"] = round(sum(select_seconds) / max(1, len(select_seconds)), 2)
    figures["worker_peak_rss_mb"] = _mb(max((p["worker"] for p in mem.peaks.values()), default=0))
    figures["total_seconds"] = round(sum(seconds.values()), 2)
    figures["seconds_per_million_rows"] = round(sum(seconds.values()) / rows * 1e6, 2)
    return figures


def per_row_ratios(main: dict, baseline: dict) -> dict:
    """Seconds per row of the main run over those of the baseline run, per stage and in all
    (1.0: the same time per row; below 1: faster per row than the baseline)."""
    def ratio(secs: float, base_secs: float) -> float:
        return round((secs / main["rows"]) / max(base_secs / baseline["rows"], 1e-12), 3)

    out = {}
    for key, secs in main.items():
        if key.endswith(":seconds") and key in baseline:
            out[f"{key[: -len(':seconds')]}:per_row_vs_baseline"] = ratio(secs, baseline[key])
        if key.endswith(":phases") and key in baseline:
            for phase in main[key].keys() & baseline[key].keys():
                out[f"{key[: -len(':phases')]}:{phase[: -len('_seconds')]}:per_row_vs_baseline"] = ratio(main[key][phase], baseline[key][phase])
    out["total:per_row_vs_baseline"] = round(main["seconds_per_million_rows"] / max(baseline["seconds_per_million_rows"], 1e-12), 3)
    return out


def bench(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="rsdist bench scale")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128, help="dims of image_emb and of text_emb")
    ap.add_argument("--k", type=int, default=0, help="clusters; 0 = the cluster stage's rule, about sqrt(N / 2)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--budget", type=float, default=1 / 3)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--rows-per-task", type=int, default=0, help="select.rows_per_task; 0 = its default")
    ap.add_argument("--mmd-block-rows", type=int, default=-1, help="select.mmd_block_rows; -1 = its default")
    ap.add_argument("--init-pool", type=int, default=0, help="cluster.init_pool (rows k-means|| initialises on, above k = 1000); 0 = its default")
    ap.add_argument("--select", choices=("distributed", "inprocess"), default="distributed")
    ap.add_argument("--baseline-rows", type=int, default=0, help="also run a baseline pool of this many rows first, in the same process, and report per-row time ratios against it (0 = no baseline)")
    ap.add_argument("--baseline-select", choices=("distributed", "inprocess"), default="inprocess", help="the select path of the baseline run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args(argv)

    from rsdist.core.raycluster import init_ray

    init_ray()
    root = args.out or tempfile.mkdtemp(prefix="rsdist-scale-")
    methods = [m for m in args.methods.split(",") if m]
    common = dict(dim=args.dim, k=args.k, methods=methods, budget=args.budget, shard_rows=args.shard_rows, rows_per_task=args.rows_per_task, mmd_block_rows=args.mmd_block_rows, seed=args.seed, init_pool=args.init_pool)
    figures: dict = {"date": time.strftime("%Y-%m-%d")}
    try:
        if args.baseline_rows:
            base_root = os.path.join(tempfile.mkdtemp(prefix="rsdist-scale-base-"), "run")
            try:
                baseline = measure(base_root, args.baseline_rows, select_path=args.baseline_select, **common)
            finally:
                shutil.rmtree(os.path.dirname(base_root), ignore_errors=True)
            figures.update({f"baseline:{k_}": v for k_, v in baseline.items()})
        main = measure(root, args.rows, select_path=args.select, **common)
        figures.update(main)
        if args.baseline_rows:
            figures.update(per_row_ratios(main, baseline))
        figures["driver_peak_rss_mb"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.keep or args.out:
        figures["run_dir"] = os.path.abspath(root) if "://" not in root else root
    return figures
