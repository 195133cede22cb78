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
Resources: the driver process; `coincide` spreads its clusters over Ray tasks of 0.5 CPU each
(`typicality-mmd` and `alignment-mmd` run the same greedy MMD in the driver); greedy MMD holds an
m x m kernel for a cluster of m rows, or for blocks of select.mmd_block_rows rows when a cluster
is larger;
`scalselect` streams the features twice and holds only a d x d matrix and one score per row;
`alignment-mmd` reads its columns once (the MMD needs the rows in memory) and fits its ridge map
in chunks.
"""

from __future__ import annotations

import dataclasses
import logging

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsdist.config import SelectConfig
from rsdist.core.rundir import RunDir
from rsdist.select.budget import budget_count
from rsdist.select.alignment import RIDGE_GRID, pair_alignment
from rsdist.core.tables import embedding_columns, space_vectors
from rsdist.select.captions import caption_information, caption_select, caption_typicality
from rsdist.select.coincide import coincide_select, mmd_among_top
from rsdist.select.error_driven import error_driven_select, load_teacher
from rsdist.select.scalselect import GramAccumulator, dominant_subspace, leverage_scores, scalselect_select
from rsdist.select.semdedup import redundancy, semdedup_select, with_dedup_filter
from rsdist.select.strategies import Selection, cluster_quotas, cluster_random_select, group_index, random_select, shift_select
from rsdist.stage import Resources, Stage, StageResult
from rsdist.core.rows import caption_rows

log = logging.getLogger("rsdist")

RESOURCES = Resources(num_cpus=0.5)
MANIFEST_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("cluster", pa.int32()), ("score", pa.float32()), ("selected", pa.bool_()), ("reason", pa.string())]
)


@dataclasses.dataclass
class Pool:
    """The training pool in sample_id order."""

    ids: pa.Array  # string
    labels: np.ndarray  # distinct cluster labels
    groups: np.ndarray  # each row's index into labels

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return len(self.labels)


def read_pool(run: RunDir) -> Pool:
    """The clusters table, sorted by sample_id; a repeated or missing id is an error."""
    table = run.read_table("clusters", columns=["sample_id", "cluster"])
    if table.column("sample_id").null_count or table.column("cluster").null_count:
        raise ValueError(f"{run.url('clusters')}: sample_id and cluster must not be null")
    table = table.take(pc.sort_indices(table, [("sample_id", "ascending")]))
    ids = table.column("sample_id").combine_chunks()
    if len(ids) > 1:
        same = pc.equal(ids[1:], ids[:-1])
        if pc.any(same).as_py():
            dup = ids[int(np.flatnonzero(same.to_numpy(zero_copy_only=False))[0])].as_py()
            raise ValueError(f"{run.url('clusters')}: sample_id {dup!r} appears more than once")
    labels, groups = group_index(table.column("cluster").to_numpy())
    return Pool(ids, labels, groups)


def embedding_of(table: pa.Table, space: str, where: str) -> np.ndarray:
    """Unit rows of `space` (rsdist.core.tables.space_vectors)."""
    return space_vectors(table, space, where)


def _positions(pool: Pool, ids: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `ids` that are in the pool, their positions in the pool)."""
    idx = pc.index_in(ids, value_set=pool.ids)
    rows = np.flatnonzero(pc.is_valid(idx).to_numpy(zero_copy_only=False))
    return rows, idx.fill_null(-1).to_numpy(zero_copy_only=False)[rows].astype(np.int64)


def read_pool_columns(run: RunDir, pool: Pool, columns: list[str]) -> pa.Table:
    """The features rows of the pool, in pool order, with only `columns`."""
    where = run.url("features")
    table = run.read_table("features", columns=["sample_id", *columns])
    rows, pos = _positions(pool, table.column("sample_id").combine_chunks(), where)
    table = table.take(pa.array(rows))
    found = np.zeros(pool.size, dtype=bool)
    found[pos] = True
    if not found.all():
        missing = pool.ids[int(np.flatnonzero(~found)[0])].as_py()
        raise ValueError(f"{where}: no row for sample_id {missing!r} of the cluster pool ({int((~found).sum())} missing)")
    order = np.empty(pool.size, dtype=np.int64)
    order[pos] = np.arange(pool.size)
    return table.take(pa.array(order))


def pool_embeddings(run: RunDir, pool: Pool, space: str) -> np.ndarray:
    table = read_pool_columns(run, pool, embedding_columns(space))
    return embedding_of(table, space, run.url("features"))


def streamed_leverage(run: RunDir, pool: Pool, space: str, energy: float, batch_size: int = 4096):
    """ScalSelect's two passes over features/: accumulate the Gram, then score each pool row."""
    where = run.url("features")
    columns = ["sample_id", *embedding_columns(space)]
    acc = None
    for batch in run.iter_batches("features", columns=columns, batch_size=batch_size):
        rows, _ = _positions(pool, batch.column(0), where)
        if len(rows) == 0:
            continue
        x = embedding_of(pa.Table.from_batches([batch]).take(pa.array(rows)), space, where)
        if acc is None:
            acc = GramAccumulator(x.shape[1])
        acc.add(x)
    if acc is None or acc.n != pool.size:
        raise ValueError(f"{where}: holds {0 if acc is None else acc.n} of the {pool.size} pool rows")
    sub = dominant_subspace(acc, energy)
    log.info("scalselect: rank %d holds %.3f of the energy (d=%d)", sub.k, sub.energy, acc.dim)
    scores = np.full(pool.size, np.nan)
    for batch in run.iter_batches("features", columns=columns, batch_size=batch_size):
        rows, pos = _positions(pool, batch.column(0), where)
        if len(rows):
            scores[pos] = leverage_scores(embedding_of(pa.Table.from_batches([batch]).take(pa.array(rows)), space, where), sub)
    return scores, sub


def embeddings_and_alignment(run: RunDir, pool: Pool, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """alignment-mmd's one read of features/: the unit rows of `cfg.space` (for its greedy MMD) and
    each pool row's image-text alignment (rsdist.select.alignment)."""
    where = run.url("features")
    table = read_pool_columns(run, pool, list(dict.fromkeys([*embedding_columns(cfg.space), "image_emb", "text_emb"])))
    alignment, strengths = pair_alignment(
        embedding_of(table, "image", where),
        embedding_of(table, "text", where),
        direction=cfg.alignment_direction,
        score=cfg.alignment_score,
        groups=pool.groups,
        temperature=cfg.alignment_temperature,
        block_rows=cfg.mmd_block_rows,
        seed=cfg.seed,
    )
    log.info("alignment-mmd (%s, %s): ridge strength %s x the mean eigenvalue (least held-out error of %s)", cfg.alignment_direction, cfg.alignment_score, " / ".join(f"{s:g}" for s in strengths), RIDGE_GRID)
    return embedding_of(table, cfg.space, where), alignment


def pool_captions(run: RunDir, pool: Pool) -> list[list[str]]:
    """Every pool row's captions (its `text` when the list is empty), in pool order."""
    table = caption_rows(run, pool.ids)
    rows, pos = _positions(pool, table.column("sample_id").combine_chunks(), run.url("shards"))
    if len(rows) < pool.size:
        found = np.zeros(pool.size, dtype=bool)
        found[pos] = True
        missing = pool.ids[int(np.flatnonzero(~found)[0])].as_py()
        raise ValueError(f"{run.url('shards')}: no row for sample_id {missing!r} of the cluster pool ({pool.size - len(rows)} missing)")
    captions = table.column("captions").to_pylist()
    ordered: list[list[str]] = [None] * pool.size  # every position is filled: a missing one raised above
    for r, p in zip(rows, pos):
        ordered[p] = captions[r]
    return ordered


def read_failures(run: RunDir, cfg: SelectConfig) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(embeddings, ids, weights) of the failing validation samples for error-driven selection."""
    uri = cfg.failures or run.url("eval", "failures.parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise ValueError(f"select.failures: {uri} does not exist (error-driven needs the failing validation samples)")
    table = pq.read_table(path, filesystem=fs)
    if "sample_id" not in table.column_names:
        raise ValueError(f"{uri}: no sample_id column")
    ids = table.column("sample_id").to_pylist()
    weights = table.column("weight").to_numpy().astype(np.float64) if "weight" in table.column_names else None
    if all(c in table.column_names for c in embedding_columns(cfg.space)):
        return embedding_of(table, cfg.space, uri), ids, weights
    feats = run.read_table("features", columns=["sample_id", *embedding_columns(cfg.space)])
    idx = pc.index_in(table.column("sample_id").combine_chunks(), value_set=feats.column("sample_id").combine_chunks())
    if idx.null_count:
        raise ValueError(f"{uri}: has no {'/'.join(embedding_columns(cfg.space))} columns and {idx.null_count} sample_ids are not in {run.url('features')}")
    return embedding_of(feats.take(idx), cfg.space, uri), ids, weights


def choose(run: RunDir, pool: Pool, cfg: SelectConfig, budget: int) -> Selection:
    """Run the configured method (behind the near-duplicate filter when one is set)."""
    method, within_clusters = ("coincide", True) if cfg.method == "coincide-within" else (cfg.method, cfg.within_clusters)
    ids = np.asarray(pool.ids.to_pylist(), dtype=object)
    needs_x = method in ("coincide", "semdedup", "error-driven", "typicality-mmd") or cfg.dedup_threshold is not None
    if method == "alignment-mmd":  # one read gives its MMD rows (and the filter's) and the alignment
        x, alignment = embeddings_and_alignment(run, pool, cfg)
    else:
        x = pool_embeddings(run, pool, cfg.space) if needs_x else None
    shift = None
    if method == "shift":
        col = read_pool_columns(run, pool, [cfg.shift_column]).column(cfg.shift_column)
        shift = col.to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isnan(shift).any():
            log.warning("select: %d pool rows have no %s; they are taken last", int(np.isnan(shift).sum()), cfg.shift_column)
    if method == "scalselect":
        lev_scores, sub = streamed_leverage(run, pool, cfg.space, cfg.energy)
    if method == "caption-diversity":
        information, distinct = caption_information(pool_captions(run, pool))
    if method in ("caption-typicality", "typicality-mmd"):
        typicality = caption_typicality(pool_captions(run, pool), pool.groups, pool.k)
    red = redundancy(x, pool.groups, cfg.dedup_keep) if (method == "semdedup" or cfg.dedup_threshold is not None) else None

    def strategy(rows: np.ndarray, b: int) -> Selection:
        k, g = pool.k, pool.groups[rows]
        if method == "random":
            return random_select(len(rows), k, g, b, cfg.seed)
        if method == "cluster-random":
            return cluster_random_select(k, g, b, cfg.quota, cfg.seed)
        if method == "shift":
            return shift_select(k, g, shift[rows], b, cfg.quota, cfg.keep)
        if method == "scalselect":
            return scalselect_select(k, g, lev_scores[rows], b, sub, cluster_quotas(g, k, b, cfg.quota) if within_clusters else None)
        if method == "caption-diversity":
            sel = caption_select(k, g, information[rows], b, cfg.quota, cfg.seed, cfg.keep)
            sel.info.update(distinct_captions_pool=int(distinct[rows].sum()), distinct_captions_selected=int(distinct[rows][sel.selected].sum()))
            return sel
        if method == "caption-typicality":
            return caption_select(k, g, typicality[rows], b, cfg.quota, cfg.seed, cfg.keep, what="caption typicality")
        if method == "typicality-mmd":
            return mmd_among_top(x[rows], g, k, typicality[rows], b, cfg.quota, cfg.candidates, cfg.mmd_width, cfg.mmd_block_rows, cfg.seed, "caption typicality")
        if method == "alignment-mmd":
            return mmd_among_top(x[rows], g, k, alignment[rows], b, cfg.quota, cfg.candidates, cfg.mmd_width, cfg.mmd_block_rows, cfg.seed, "image-text alignment")
        if method == "semdedup":
            sub_red = type(red)(red.max_cos[rows], red.duplicate_of[rows])
            return semdedup_select(k, g, sub_red, b, ids)
        if method == "coincide":
            from rsdist.core.raycluster import cluster_cpus, init_ray

            init_ray()
            parts = cfg.num_tasks or max(1, int(2 * cluster_cpus()))
            quotas = cluster_quotas(g, k, b, cfg.quota) if within_clusters else None
            return coincide_select(
                x[rows], g, k, b, cfg.tau, cfg.max_cosine, cfg.density_rows, cfg.seed, use_ray=True, parts=parts, quotas=quotas, mmd_width=cfg.mmd_width, mmd_block_rows=cfg.mmd_block_rows
            )
        if method == "error-driven":
            fx, fids, fw = read_failures(run, cfg)
            if fx.shape[1] != x.shape[1]:
                raise ValueError(f"select.failures: embeddings have {fx.shape[1]} dims, the pool's {cfg.space} has {x.shape[1]}")
            teacher = load_teacher(cfg.teacher) if cfg.teacher else None
            return error_driven_select(x[rows], g, k, fx, b, fids, fw, teacher)
        raise ValueError(f"select.method: {method!r} is not implemented")

    if cfg.dedup_threshold is None:
        return strategy(np.arange(pool.size), budget)
    return with_dedup_filter(pool.k, pool.groups, red, cfg.dedup_threshold, budget, strategy, ids)


def write_outputs(run: RunDir, pool: Pool, cfg: SelectConfig, budget: int, sel: Selection) -> None:
    manifest = pa.table(
        {
            "sample_id": pool.ids,
            "cluster": pa.array(pool.labels[pool.groups].astype(np.int32)),
            "score": pa.array(np.asarray(sel.score, dtype=np.float32)),
            "selected": pa.array(np.asarray(sel.selected, dtype=bool)),
            "reason": pa.array([str(r) for r in sel.reason], type=pa.string()),
        },
        schema=MANIFEST_SCHEMA,
    )
    run.write_table(manifest, "selection", "manifest.parquet")
    sizes = np.bincount(pool.groups, minlength=pool.k)
    taken = np.bincount(pool.groups[sel.selected], minlength=pool.k)
    run.write_json(
        {
            "method": cfg.method,
            "settings": dataclasses.asdict(cfg),
            "pool": pool.size,
            "budget": budget,
            "selected": sel.count,
            "clusters": {
                str(int(lab)): {"size": int(s), "quota": int(q), "selected": int(t)}
                for lab, s, q, t in zip(pool.labels, sizes, sel.quotas, taken)
            },
            "info": sel.info,
        },
        "selection",
        "selection.json",
    )


def run(run: RunDir, cfg: SelectConfig) -> StageResult:
    """Select `cfg.budget` of the cluster pool with `cfg.method` and write the manifest."""
    pool = read_pool(run)
    budget = budget_count(cfg.budget, pool.size)
    log.info("select: %s keeps %d of %d (budget %s) over %d clusters", cfg.method, budget, pool.size, cfg.budget, pool.k)
    sel = choose(run, pool, cfg, budget)
    if sel.count != budget:
        raise RuntimeError(f"select.{cfg.method}: selected {sel.count} rows, the budget is {budget}")
    write_outputs(run, pool, cfg, budget, sel)
    extra = {"method": cfg.method, "budget": cfg.budget, "budget_count": budget, "selected": sel.count, "pool": pool.size}
    return StageResult(rows_in=pool.size, rows_out=sel.count, extra=extra)


STAGE = Stage(name="select", folder="selection", reads=("features", "clusters", "shards"), section="select", resources=lambda cfg: RESOURCES, run=run)
