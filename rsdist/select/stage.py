"""The select stage: a strategy spends the budget over the training pool and writes a manifest.

Input:
  <run>/clusters/part-*.parquet   sample_id, cluster (the training pool; the test split is not in it)
  <run>/features/part-*.parquet   only the columns the method needs: `shift` (or one `shift_<name>`)
                                  for `shift`; the embedding of `space` for coincide, scalselect,
                                  semdedup, error-driven, typicality-mmd, alignment-mmd and the
                                  near-duplicate filter; alignment-mmd also image_emb and text_emb
  <run>/shards/part-*.parquet     caption-diversity, caption-typicality and typicality-mmd only:
                                  sample_id, captions (text when empty)
  failures parquet                error-driven only (see SelectConfig.failures)
Output:
  <run>/selection/manifest.parquet  one row per pool sample, sorted by sample_id: sample_id string,
                                    cluster int32, score float32, selected bool, reason string
  <run>/selection/selection.json    method, settings, pool, budget, selected count, per-cluster
                                    sizes and quotas, method figures
Budget: see rsdist.select.budget (fraction rounded half up, or a count; exact). Rows are put in
sample_id order before any strategy runs, so the same inputs and seed give the same manifest.

Resources: Ray tasks of select.cpus_per_task CPUs; the driver reads no pool row. The pool is
moved into cluster groups of about select.rows_per_task rows (rsdist.select.blocks), every
strategy runs per group with the per-cluster kernels of rsdist.select.*, and pool-wide quantities
are reductions over the groups that return small results: the Gram matrices of scalselect and of
the alignment's ridge maps (merged in a task), the alignment's held-out error per ridge strength,
the caption words' pool counts (merged in a task), the captions' pool counts (a hash-partitioned
pass), COINCIDE's centroid sums and densities, the global top-B cuts of random, scalselect,
semdedup and the filter's readmission (threshold.py), and error-driven's nearest rows per failure
(merged in one task). The driver holds per-cluster counts and quotas. Workers write the manifest's
rows per bucket and one task streams them into manifest.parquet, renamed when complete; the count
and the budget are checked before the rename. The in-process version this stage replaced is kept
as rsdist.select.inprocess (the tests' reference); docs/select.md lists where the two can differ.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsdist.config import SelectConfig
from rsdist.core.rundir import RunDir
from rsdist.select import blocks, groups
from rsdist.select.alignment import RIDGE_GRID, fit_ridge_map
from rsdist.select.blocks import Plan, PoolError
from rsdist.select.budget import apportion, budget_count
from rsdist.select.coincide import _chunks, cluster_probabilities, sequential_quotas, transferability
from rsdist.select.columns import MANIFEST_SCHEMA, embedding_columns, embedding_of
from rsdist.select.error_driven import load_teacher
from rsdist.select.scalselect import dominant_subspace
from rsdist.select.threshold import BINS, find_cut
from rsdist.stage import Resources, Stage, StageResult

log = logging.getLogger("rsdist")

RESOURCES = Resources(num_cpus=0.5)
DRAW_METHODS = ("random", "cluster-random", "caption-diversity", "caption-typicality")
CAPTION_METHODS = ("caption-diversity", "caption-typicality", "typicality-mmd")


@dataclasses.dataclass
class Job:
    """One select run as the driver sees it: settings, the plan and Ray task handles."""

    run: RunDir
    cfg: SelectConfig
    method: str
    within: bool
    plan: Plan
    budget: int
    remote: Callable[[Callable], Any]

    @property
    def labels(self) -> np.ndarray:
        return self.plan.labels

    @property
    def numbers(self) -> list[int]:
        return list(range(len(self.plan.group_clusters)))

    @property
    def filtered(self) -> bool:
        return self.cfg.dedup_threshold is not None

    def each_group(self, fn: Callable, *args, **kwargs) -> list:
        """fn(run, group, labels, *args) on every group, as Ray tasks; their results in group order."""
        import ray

        task = self.remote(fn)
        labels = ray.put(self.labels)
        return ray.get([task.remote(self.run, n, labels, *args, **kwargs) for n in self.numbers])


def _raise(result: dict) -> dict:
    if isinstance(result, dict) and "error" in result:
        raise PoolError(result["error"])
    return result


# -- moving the pool into groups ------------------------------------------------------------------------


def feature_columns(cfg: SelectConfig, method: str) -> list[str]:
    """The features/ columns the method reads."""
    cols: list[str] = []
    if method == "shift":
        cols.append(cfg.shift_column)
    if method in ("coincide", "scalselect", "semdedup", "error-driven", "typicality-mmd", "alignment-mmd") or cfg.dedup_threshold is not None:
        cols += embedding_columns(cfg.space)
    if method == "alignment-mmd":
        cols += ["image_emb", "text_emb"]
    return list(dict.fromkeys(cols))


def task_rows(rows: int, rows_per_task: int) -> int:
    """Rows per bucket and group: select.rows_per_task, or fewer so that every CPU of the cluster
    gets about two tasks."""
    from rsdist.core.raycluster import cluster_cpus

    return max(1, min(rows_per_task, int(np.ceil(rows / max(1.0, 2 * cluster_cpus())))))


def plan_pool(run: RunDir, cfg: SelectConfig, remote: Callable) -> Plan:
    """Survey clusters/ and cut the pool into buckets and groups (module docstring of blocks)."""
    import ray

    files = run.parquet_files("clusters")
    if not files:
        raise FileNotFoundError(f"no parquet files under {run.url('clusters')}")
    counts = ray.get([remote(blocks.count_file).remote(run, f) for f in files])
    rows = int(sum(counts))
    per_task = task_rows(rows, cfg.rows_per_task)
    stride = max(1, per_task // blocks.SAMPLES_PER_BUCKET)
    surveys = [_raise(s) for s in ray.get([remote(blocks.survey_file).remote(run, f, stride) for f in files])]
    labels = np.unique(np.concatenate([s["labels"] for s in surveys])) if surveys else np.zeros(0, dtype=np.int64)
    sizes = np.zeros(len(labels), dtype=np.int64)
    for s in surveys:
        sizes[np.searchsorted(labels, s["labels"])] += s["counts"]
    boundaries = blocks.cut_buckets(np.concatenate([s["sample"] for s in surveys]) if surveys else np.zeros(0, dtype=str), rows, per_task)
    group_of = blocks.pack_groups(sizes, per_task)
    group_clusters = [np.flatnonzero(group_of == g) for g in range(int(group_of.max()) + 1)] if len(group_of) else []
    return Plan(boundaries, np.zeros(len(boundaries) + 1, dtype=np.int64), labels, sizes, group_of, group_clusters)


def move_pool(job: Job) -> None:
    """split every input file into buckets, then join each bucket into per-group row files."""
    import ray

    run, cfg, plan = job.run, job.cfg, job.plan
    kinds = {"features": feature_columns(cfg, job.method)}
    if job.method in CAPTION_METHODS:
        kinds["shards"] = ["captions", "text"]
    kinds = {k: v for k, v in kinds.items() if v}
    batch = max(1024, task_rows(plan.size, cfg.rows_per_task) // 4)
    boundaries = ray.put(plan.boundaries)
    split = job.remote(blocks.split_file)
    work = [("clusters", f, ["sample_id", "cluster"]) for f in run.parquet_files("clusters")]
    for kind in kinds:
        files = run.parquet_files(kind)
        if not files:
            raise FileNotFoundError(f"no parquet files under {run.url(kind)} (select.method {job.method} reads {', '.join(kinds[kind])})")
        work += [(kind, f, ["sample_id", *kinds[kind]]) for f in files]
    refs = [split.remote(run, kind, f, f"f-{i:05d}", cols, boundaries, batch) for i, (kind, f, cols) in enumerate(work)]
    counts = ray.get(refs)
    plan.bucket_rows = np.sum([c for c, (kind, _, _) in zip(counts, work) if kind == "clusters"], axis=0).astype(np.int64)
    draw_seed = cfg.seed if job.method in DRAW_METHODS and not job.filtered else None
    join = job.remote(blocks.join_bucket)
    labels, group_of = ray.put(plan.labels), ray.put(plan.group_of)
    results = ray.get([join.remote(run, j, int(o), labels, group_of, kinds, draw_seed) for j, o in enumerate(plan.offsets)])
    joined = np.zeros(plan.k, dtype=np.int64)
    for r in results:
        joined += _raise(r)["counts"]
    if not np.array_equal(joined, plan.sizes):
        raise PoolError(f"{run.url('clusters')}: {int(joined.sum())} pool rows joined of {plan.size}")
    run.remove(*blocks.scratch("split"))


# -- what the strategies need of the whole pool ---------------------------------------------------------------


def quotas_of(sizes: np.ndarray, budget: int, rule: str) -> np.ndarray:
    """strategies.cluster_quotas from the cluster sizes."""
    weights = sizes.astype(np.float64) if rule == "proportional" else (sizes > 0).astype(np.float64)
    return apportion(weights, budget, sizes)


def global_cut(job: Job, name: str, count: int):
    """The Cut that keeps the `count` rows of highest key of keys/<name>/ (threshold.py)."""
    import ray

    hist = job.remote(groups.key_histogram)
    chunks = [job.numbers[i:i + 8] for i in range(0, len(job.numbers), 8)]

    def histograms(prefix):
        total = np.zeros(BINS, dtype=np.int64)
        for h in ray.get([hist.remote(job.run, name, c, prefix) for c in chunks]):
            total += h
        return total

    return find_cut(count, histograms)


def scalselect_spec(job: Job, spec: dict, eligible_budget: int) -> None:
    import ray

    cols = embedding_columns(job.cfg.space)
    accs = [job.remote(groups.gram_phase).remote(job.run, n, job.labels, job.cfg.space, cols) for n in job.numbers]
    acc = job.remote(groups.merge_grams).remote(*accs)
    sub = job.remote(dominant_subspace).remote(acc, job.cfg.energy)
    k, energy = ray.get(job.remote(_rank_and_energy).remote(sub))
    log.info("scalselect: rank %d holds %.3f of the energy", k, energy)
    spec.update(subspace=sub, within=job.within, space=job.cfg.space)
    if not job.within:
        job.each_group(groups.key_phase, {**{k_: v for k_, v in spec.items() if k_ != "subspace"}, "method": "scalselect", "columns": cols}, sub)
        spec["cut"] = global_cut(job, "main", eligible_budget)


def _rank_and_energy(sub) -> tuple[int, float]:
    return sub.k, sub.energy


def fit_ridges(acc, dx: int, direction: str) -> list:
    image, text = slice(0, dx), slice(dx, acc.dim)
    ridges = [("image", "text", fit_ridge_map(acc, image, text))]
    if direction == "both":
        ridges.append(("text", "image", fit_ridge_map(acc, text, image)))
    return ridges


def alignment_spec(job: Job, spec: dict) -> None:
    import ray

    cfg = job.cfg
    accs = [job.remote(groups.gram_phase).remote(job.run, n, job.labels, None, ["image_emb", "text_emb"]) for n in job.numbers]
    acc = job.remote(groups.merge_grams).remote(*accs)
    dx = ray.get(job.remote(_image_dim).remote(job.run, job.labels))
    ridges = job.remote(fit_ridges).remote(acc, dx, cfg.alignment_direction)
    errors = job.each_group(groups.alignment_errors, ridges)
    sums = [np.sum([e[i] for e in errors], axis=0) for i in range(len(errors[0]))]
    best = [int(np.argmin(s / job.plan.size)) for s in sums]
    log.info("alignment-mmd (%s, %s): ridge strength %s x the mean eigenvalue (least held-out error of %s)", cfg.alignment_direction, cfg.alignment_score, " / ".join(f"{RIDGE_GRID[j]:g}" for j in best), RIDGE_GRID)
    states = {}
    if cfg.alignment_score == "contrastive" and cfg.mmd_block_rows > 0:
        rng = np.random.default_rng(cfg.seed)  # the draws contrastive_scores makes, cluster by cluster
        for c, m in enumerate(job.plan.sizes):
            if m > cfg.mmd_block_rows:
                states[c] = rng.bit_generator.state
                rng.permutation(int(m))
    spec.update(ridges=ridges, best=best, score=cfg.alignment_score, temperature=cfg.alignment_temperature, rng_states=states, space=cfg.space)


def _image_dim(run: RunDir, labels: np.ndarray) -> int:
    for n in range(10**9):
        if not run.exists(*blocks.scratch("rows", f"g-{n:05d}")):
            break
        t = blocks.read_group(run, n, ["sample_id", "pos", "cluster", "image_emb"])
        if t.num_rows:
            return embedding_of(t.slice(0, 1), "image", "features").shape[1]
    raise PoolError("select: the pool is empty")


def caption_spec(job: Job, spec: dict) -> None:
    import ray

    if job.method == "caption-diversity":
        parts = max(1, len(job.numbers))
        job.each_group(groups.caption_split, parts)
        ray.get([job.remote(groups.caption_df).remote(job.run, q) for q in range(parts)])
    else:
        counts = [job.remote(groups.word_counts).remote(job.run, n, job.labels) for n in job.numbers]
        spec.update(in_pool=job.remote(groups.merge_counters).remote(*counts), pool_rows=job.plan.size)


def coincide_spec(job: Job, spec: dict, sizes: np.ndarray, budget: int) -> None:
    from rsdist.core.raycluster import cluster_cpus

    cfg = job.cfg
    parts = cfg.num_tasks or max(1, int(2 * cluster_cpus()))
    seeds = np.zeros(job.plan.k, dtype=np.int64)
    for chunk in _chunks(sizes, parts):
        for i, c in enumerate(chunk):
            seeds[c] = cfg.seed + i
    stats: dict[int, tuple] = {}
    for part in job.each_group(groups.coincide_stats, cfg.space, cfg.dedup_threshold, cfg.density_rows, seeds):
        stats.update(part)
    dim = len(next(iter(stats.values()))[0])
    sums = np.zeros((job.plan.k, dim))
    dens = np.zeros(job.plan.k)
    for c, (s, d) in stats.items():
        sums[c], dens[c] = s, d
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    p = cluster_probabilities(transferability(sums / np.where(norms > 0, norms, 1.0), cfg.max_cosine), dens, cfg.tau)
    if job.within:
        quotas, visit = quotas_of(sizes, budget, cfg.quota), np.arange(job.plan.k)
    else:
        quotas, visit = sequential_quotas(p, sizes, budget)
    visit_pos = np.empty(job.plan.k, dtype=np.int64)
    visit_pos[visit] = np.arange(job.plan.k)
    log.info("coincide: %d clusters, %d take a share, P max %.3g", job.plan.k, int((quotas > 0).sum()), float(p.max()))
    spec.update(p=p, visit_pos=visit_pos, sizes=sizes, given=job.within, quotas=quotas, space=cfg.space)
    spec["coincide_info"] = {"tau": cfg.tau, "mmd_width": cfg.mmd_width, "mmd_block_rows": cfg.mmd_block_rows, "clusters_used": int((quotas > 0).sum()), "quotas_from": "select.quota" if job.within else "cluster probabilities"}


# -- error-driven ------------------------------------------------------------------------------------------


def failure_rows(run: RunDir, cfg: SelectConfig) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(embeddings, ids, weights) of the failing validation samples; embeddings missing from the
    failures file are looked up in features/ one file at a time (only the failures' rows)."""
    uri = cfg.failures or run.url("eval", "failures.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise ValueError(f"select.failures: {uri} does not exist (error-driven needs the failing validation samples)")
    table = pq.read_table(path, filesystem=fs)
    if "sample_id" not in table.column_names:
        raise ValueError(f"{uri}: no sample_id column")
    ids = table.column("sample_id").to_pylist()
    weights = table.column("weight").to_numpy().astype(np.float64) if "weight" in table.column_names else None
    cols = embedding_columns(cfg.space)
    if all(c in table.column_names for c in cols):
        return embedding_of(table, cfg.space, uri), ids, weights
    want = table.column("sample_id").combine_chunks()
    found = []
    for f in run.parquet_files("features"):
        t = pq.read_table(f, columns=["sample_id", *cols], filesystem=run.fs)
        found.append(t.filter(pc.is_in(t.column("sample_id"), value_set=want)))
    feats = pa.concat_tables(found)
    idx = pc.index_in(want, value_set=feats.column("sample_id").combine_chunks())
    if idx.null_count:
        raise ValueError(f"{uri}: has no {'/'.join(cols)} columns and {idx.null_count} sample_ids are not in {run.url('features')}")
    return embedding_of(feats.take(idx), cfg.space, uri), ids, weights


def error_driven_picks(run: RunDir, numbers: list[int], labels: np.ndarray, spec: dict, quotas: np.ndarray, eligible: int) -> tuple[np.ndarray, np.ndarray]:
    """error_driven.nearest_to_failures over every group, in one task: each failure's candidate list
    (its 4 x quota + 32 nearest eligible rows, ties to the lower pos) merged over the groups, then
    the round-robin. Returns (pos, query) of the picks sorted by pos."""

    def ranked(lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        best = [(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)) for _ in lengths]
        for n in numbers:
            for f, (sims, pos) in enumerate(groups.nearest_candidates(run, n, labels, spec, lengths)):
                s, p = np.concatenate([best[f][0], sims]), np.concatenate([best[f][1], pos])
                top = np.lexsort((p, -s))[: int(lengths[f])]
                best[f] = (s[top], p[top])
        return [(s, p) for s, p in best]

    lengths = np.minimum(eligible, 4 * quotas.astype(np.int64) + 32)
    lists = [p for _, p in ranked(lengths)]
    taken: set[int] = set()
    at = np.zeros(len(quotas), dtype=np.int64)
    left = quotas.astype(np.int64).copy()
    rows, by = [], []
    while left.sum() > 0:
        for f in np.flatnonzero(left > 0):
            cand = lists[f]
            while at[f] < len(cand) and int(cand[at[f]]) in taken:
                at[f] += 1
            if at[f] == len(cand):
                if len(cand) == eligible:
                    left[f] = 0
                    continue
                full = np.zeros(len(quotas), dtype=np.int64)
                full[f] = eligible
                lists[f] = ranked(full)[f][1]
                continue
            r = int(cand[at[f]])
            taken.add(r)
            rows.append(r)
            by.append(int(f))
            left[f] -= 1
    order = np.argsort(rows)
    return np.asarray(rows, dtype=np.int64)[order], np.asarray(by, dtype=np.int64)[order]


def error_driven_spec(job: Job, spec: dict, budget: int, eligible: int) -> None:
    import ray

    cfg = job.cfg
    fx, fids, fw = failure_rows(job.run, cfg)
    queries = np.asarray(fx, dtype=np.float32)
    if cfg.teacher:
        queries, fw = load_teacher(cfg.teacher)(queries, fids)
        queries = np.asarray(queries, dtype=np.float32)
        fids = [f"query {i}" for i in range(len(queries))]
    if len(queries) == 0:
        raise ValueError("error-driven selection needs at least one failure")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    queries = queries / np.where(norms > 0, norms, 1.0)
    w = np.ones(len(queries)) if fw is None else np.asarray(fw, dtype=np.float64)
    quotas_f = apportion(w, budget, np.full(len(queries), eligible))
    spec.update(queries=queries, failure_names=list(fids), space=cfg.space)
    spec["picks"] = job.remote(error_driven_picks).remote(job.run, job.numbers, job.labels, spec, quotas_f, eligible)
    spec["error_info"] = {"failures": len(queries), "per_failure_quota_max": int(quotas_f.max())}
    dim = ray.get(job.remote(_space_dim).remote(job.run, cfg.space))
    if queries.shape[1] != dim:
        raise ValueError(f"select.failures: embeddings have {queries.shape[1]} dims, the pool's {cfg.space} has {dim}")


def _space_dim(run: RunDir, space: str) -> int:
    for n in range(10**9):
        if not run.exists(*blocks.scratch("rows", f"g-{n:05d}")):
            break
        t = blocks.read_group(run, n)
        if t.num_rows:
            return embedding_of(t.slice(0, 1), space, "features").shape[1]
    raise PoolError("select: the pool is empty")


# -- the stage ----------------------------------------------------------------------------------------------


def decide_all(job: Job, spec: dict) -> tuple[np.ndarray, dict]:
    """Run decide on every group; (selected rows per cluster, merged method figures)."""
    import ray

    shared = {k: v for k, v in spec.items() if isinstance(v, ray.ObjectRef)}
    plain = {k: v for k, v in spec.items() if k not in shared}
    task = job.remote(_decide)
    labels, offsets, plain_ref = ray.put(job.labels), ray.put(job.plan.offsets), ray.put(plain)
    results = ray.get([task.remote(job.run, n, labels, offsets, plain_ref, list(shared), *shared.values()) for n in job.numbers])
    taken = np.sum([r["taken"] for r in results], axis=0) if results else np.zeros(job.plan.k, dtype=np.int64)
    info: dict[str, Any] = {}
    for r in results:
        for key, v in r["info"].items():
            if key in ("distinct_captions_pool", "distinct_captions_selected"):
                info[key] = info.get(key, 0) + v
            elif key == "cosine_cut":
                info[key] = max(info.get(key, -1.0), v)
            else:
                info[key] = v
    return taken, info


def _decide(run: RunDir, number: int, labels: np.ndarray, offsets: np.ndarray, plain: dict, names: list[str], *values) -> dict:
    return groups.decide(run, number, labels, offsets, {**plain, **dict(zip(names, values))})


def select_pool(job: Job, lap: Callable[[str], None] = lambda name: None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the method; (quotas per cluster as the manifest reports them, selected per cluster, info)."""
    cfg, method = job.cfg, job.method
    spec: dict[str, Any] = {"method": method, "seed": cfg.seed, "keep": cfg.keep, "quota": cfg.quota, "budget": job.budget, "columns": feature_columns(cfg, method) + (["captions", "text"] if method in CAPTION_METHODS else [])}
    spec["columns"] += ["draw"] if method in DRAW_METHODS and not job.filtered else []
    spec.update(candidates=cfg.candidates, mmd_width=cfg.mmd_width, mmd_block_rows=cfg.mmd_block_rows, space=cfg.space, shift_column=cfg.shift_column)
    sizes, budget, filter_info = job.plan.sizes, job.budget, {}
    if job.filtered or method == "semdedup":
        reds = job.each_group(groups.redundancy_phase, job.plan.offsets, cfg.space, cfg.dedup_keep, cfg.dedup_threshold)
        if job.filtered:
            sizes = np.sum([r["eligible"] for r in reds], axis=0)
            budget = min(job.budget, int(sizes.sum()))
            spec["threshold"] = cfg.dedup_threshold
            short = job.budget - budget
            if short > 0:
                job.each_group(groups.key_phase, {"method": "readmit", "threshold": cfg.dedup_threshold})
                spec["readmit_cut"] = global_cut(job, "readmit", short)
            filter_info = {"dedup_threshold": cfg.dedup_threshold, "near_duplicates": int(sum(r["duplicates"] for r in reds)), "readmitted": max(short, 0)}
            if method in DRAW_METHODS:
                import ray

                per_bucket = np.sum([r["per_bucket"] for r in reds], axis=0)
                offsets = np.r_[0, np.cumsum(per_bucket)[:-1]]
                task = job.remote(groups.survivor_draws)
                ray.get([task.remote(job.run, j, len(job.numbers), int(o), cfg.dedup_threshold, cfg.seed) for j, o in enumerate(offsets)])
    eligible = int(sizes.sum())
    quotas = None
    if method in ("cluster-random", "shift", "caption-diversity", "caption-typicality", "typicality-mmd", "alignment-mmd") or (method == "scalselect" and job.within):
        quotas = quotas_of(sizes, budget, cfg.quota)
        spec["quotas"] = quotas
    if method == "shift":
        spec["columns"] = [cfg.shift_column]
    if method in ("random", "semdedup"):
        job.each_group(groups.key_phase, spec)
        spec["cut"] = global_cut(job, "main", budget)
    elif method == "scalselect":
        scalselect_spec(job, spec, budget)
    elif method == "alignment-mmd":
        alignment_spec(job, spec)
    elif method in CAPTION_METHODS:
        caption_spec(job, spec)
    elif method == "coincide":
        coincide_spec(job, spec, sizes, budget)
        quotas = spec["quotas"]
    elif method == "error-driven":
        error_driven_spec(job, spec, budget, eligible)
    coincide_info = spec.pop("coincide_info", None)
    error_info = spec.pop("error_info", None)
    lap("statistics")
    taken, info = decide_all(job, spec)
    lap("decide")
    if method in ("typicality-mmd", "alignment-mmd"):
        info = {"candidates": cfg.candidates, "mmd_width": cfg.mmd_width, "mmd_block_rows": cfg.mmd_block_rows}
    if method == "semdedup":
        info = {"cosine_cut": round(info.get("cosine_cut", -1.0), 6)}
    info.update(coincide_info or {})
    info.update(error_info or {})
    if filter_info:
        info.update(filter_info)
        quotas = None
    return (taken if quotas is None else quotas), taken, info


def write_summary(job: Job, quotas: np.ndarray, taken: np.ndarray, info: dict, selected: int) -> None:
    job.run.write_json(
        {
            "method": job.cfg.method,
            "settings": dataclasses.asdict(job.cfg),
            "pool": job.plan.size,
            "budget": job.budget,
            "selected": selected,
            "clusters": {str(int(lab)): {"size": int(s), "quota": int(q), "selected": int(t)} for lab, s, q, t in zip(job.labels, job.plan.sizes, quotas, taken)},
            "info": info,
        },
        "selection",
        "selection.json",
    )


def run(run: RunDir, cfg: SelectConfig) -> StageResult:
    """Select `cfg.budget` of the cluster pool with `cfg.method` and write the manifest."""
    import ray

    from rsdist.core.raycluster import init_ray

    init_ray()
    remote = lambda fn: ray.remote(num_cpus=cfg.cpus_per_task, max_retries=1)(fn)  # noqa: E731
    method, within = ("coincide", True) if cfg.method == "coincide-within" else (cfg.method, cfg.within_clusters)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[f"{name}_seconds"] = round(now - clock, 3)
        clock = now

    try:
        plan = plan_pool(run, cfg, remote)
        job = Job(run, cfg, method, within, plan, budget_count(cfg.budget, plan.size), remote)
        log.info("select: %s keeps %d of %d (budget %s) over %d clusters in %d groups and %d buckets", cfg.method, job.budget, plan.size, cfg.budget, plan.k, len(plan.group_clusters), plan.buckets)
        lap("plan")
        move_pool(job)
        lap("move")
        quotas, taken, info = select_pool(job, lap)
        if int(taken.sum()) != job.budget:
            raise RuntimeError(f"select.{cfg.method}: selected {int(taken.sum())} rows, the budget is {job.budget}")
        written = ray.get(remote(blocks.write_manifest).remote(run, plan.buckets, len(plan.group_clusters), MANIFEST_SCHEMA, plan.size))
        lap("manifest")
        if written["selected"] != job.budget:
            raise RuntimeError(f"select.{cfg.method}: the manifest selects {written['selected']} rows, the budget is {job.budget}")
        write_summary(job, quotas, taken, info, written["selected"])
    finally:
        run.remove(*blocks.SCRATCH)
    extra = {"method": cfg.method, "budget": cfg.budget, "budget_count": job.budget, "selected": written["selected"], "pool": plan.size, "groups": len(plan.group_clusters), "buckets": plan.buckets, **seconds}
    return StageResult(rows_in=plan.size, rows_out=written["selected"], extra=extra)



STAGE = Stage(name="select", folder="selection", reads=("features", "clusters", "shards"), section="select", resources=lambda cfg: Resources(num_cpus=cfg.cpus_per_task), run=run)
