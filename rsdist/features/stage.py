"""Features stage: tower embeddings and perturbation shift of every sample, one Ray Data pass.

Input: `<run>/shards/part-*.parquet` (canonical schema; reads sample_id, image, text, captions,
label, split).
Output: `<run>/features/<shard name>.parquet`, one file per input shard, rows in the shard's order:
`sample_id, split, label` (string), `image_emb` (fixed_size_list<float32|float16>[image_dim],
image-tower features before the projection head), `text_emb` (fixed_size_list[text_dim], mean of
the L2-normalised tower features of the sample's captions), `shift` (float32, mean of the
per-perturbation shifts) and `shift_<name>` (float32) per configured perturbation; plus
`<run>/features/features_meta.json` (encoder, dims, image_size, perturbations, seed, dtype, vlm).
With `features.vlm` set, also `coincide_emb` and/or `scalselect_emb` (fixed_size_list, same dtype):
the VLM-internal features of rsdist/features/vlm.py, computed in the same actors (vlm_embed.py).

The pass: shards cut, in order, into row slices of one model batch (one block each) -> read through
the run's fsspec filesystem (so any run URI works), fused with the CPU stage (decode, resize, text
perturbations; a quarter CPU per task) -> model actor pool (`EmbedModel`, an elastic ActorPoolStrategy:
it starts at the planned size and shrinks to the nodes left when a node is lost; fractional CPUs,
`gpus_per_actor` GPUs each when `features.device` means GPUs; the image perturbations are made in
the actor on CPU pools, in the CPU stage for GPU actors) -> write step (`write_parts`, tasks of a
quarter CPU): each result block's rows are written, on the worker, as parts named by the rows they
hold, `features/_parts/<shard>/<start>-<stop>.parquet` (temporary name, then rename). The driver
sees one small row per part (shard, start, stop) and keeps, per pending shard, the merged intervals
of rows written; when a shard's rows are all covered it starts a commit task (`commit_shard`) that
merges the parts in row order into `features/<shard name>.parquet` (temporary name, then rename)
and removes them. Rows never pass through the driver; a progress line every ~1/20 of the shards.

Resumable per shard: a shard whose output file exists is not read again (parts of a killed run are
removed at the start and redone). Exactly once: a part's name is fixed by its rows, so a retried
write task (worker or actor death) rewrites the same file or, with other batch bounds, an
overlapping one; the commit takes each row from the first part that covers it and each sample_id
once (first occurrence, as the input shard's order), and renames the output into place only when
every row of the shard is present; the stage fails loudly if a shard comes back incomplete.

Memory: a model actor holds one batch (`features.batch_size` rows, with its 1 + K perturbed
images); a write task one result block (one batch); a commit task one row group of its output
(the whole shard below ROW_GROUP_ROWS rows) plus the shard's sample_id set; the driver one interval list per pending shard. See docs/features.md.

Resources (`plan_pool`): per node, from `ray.nodes()`. `features.device` decides GPUs (cuda asks
for them even before a GPU node exists, so an autoscaler adds one). With GPUs: one actor per
`gpus_per_actor` GPUs of each node. Without: about CPUs / threads_per_actor actors per node, each
asking at most what leaves every node a reserve (half a CPU on small hosts) for reads and decodes,
and a share at which no node can be filled with actors, however Ray places them
(`fill_proof_share`), so a lost node's actors starting again elsewhere never take the reads' room.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsdist.config import VLM_FEATURES, FeaturesConfig
from rsdist.features.embed import EmbedModel
from rsdist.features.preprocess import preprocess_batch, split_perturbations
from rsdist.features.vlm_embed import VlmSpec
from rsdist.core.raycluster import Demand, alive_nodes, check_demand, elastic_actor_pool, ensure_demand, use_gpus
from rsdist.core.rundir import RunDir, compression
from rsdist.stage import Resources, Stage, StageResult

log = logging.getLogger("rsdist")

NAME = "features"
META = "features_meta.json"
CPU_STAGE = Resources(num_cpus=0.25)
WRITE_STAGE = Resources(num_cpus=0.25)
PARTS = "_parts"  # features/_parts/<shard>/<start>-<stop>.parquet: written rows waiting for their shard's commit
ROW = "row"  # a row's position in its input shard, carried through the pass
# Rows per parquet row group of an output file: pyarrow's write_table default, so a shard's file has
# the row groups the in-driver writer gave it (the cluster stage's units are row groups).
ROW_GROUP_ROWS = 1024 * 1024
# Fault injection for tests: when set to a local file path, the first write task that creates the
# file commits one part, leaves a half-written one and kills its own process (then Ray retries it).
CRASH_ONCE_ENV = "RSDIST_FEATURES_CRASH_ONCE"


@dataclass(frozen=True)
class PoolPlan:
    """How many model actors, what each asks Ray for, and how many torch threads each runs."""

    size: int
    resources: Resources
    threads: int
    use_gpu: bool


def read_reserve(cpus: float) -> float:
    """CPUs a node hosting model actors keeps free for the read and decode tasks."""
    return max(0.5, cpus / 8)


def plan_pool(cfg: FeaturesConfig, nodes: list[dict[str, float]], use_gpu: bool) -> PoolPlan:
    """Size the actor pool from each node's resources (never the cluster's totals or the driver's).

    GPU actors: one per `gpus_per_actor` GPUs of each node, with the CPUs that node can spare per
    actor. CPU actors: about CPUs / threads_per_actor per node, each asking the largest share that
    still leaves every node hosting actors room for the read tasks (three 1-CPU nodes: one actor of
    half a CPU each, not one of 0.833, which would leave no node a quarter CPU to read with).
    """
    memory = cfg.memory_per_actor_gb * 1e9
    if use_gpu:
        slots = [(float(n.get("CPU", 0.0)), int(float(n.get("GPU", 0.0)) // cfg.gpus_per_actor + 1e-9)) for n in nodes]
        slots = [(cpus, k) for cpus, k in slots if k > 0]
        size = cfg.num_actors or max(1, sum(k for _, k in slots))
        spare = min(((cpus - 1.0) / k for cpus, k in slots), default=1.0)
        per_cpu = cfg.cpus_per_actor or max(0.25, min(2.0, spare))
        return PoolPlan(size, Resources(num_cpus=round(per_cpu, 3), num_gpus=cfg.gpus_per_actor, memory=memory), threads=2, use_gpu=True)
    threads = cfg.threads_per_actor
    hosts = [float(n.get("CPU", 0.0)) for n in nodes if float(n.get("CPU", 0.0)) >= 1.0] or [max(1.0, sum(float(n.get("CPU", 0.0)) for n in nodes))]
    if cfg.cpus_per_actor:
        per_cpu = max(0.1, math.floor(cfg.cpus_per_actor * 1000) / 1000)
    else:
        planned = min(float(threads), min((c - read_reserve(c)) / max(1, round(c / threads)) for c in hosts))
        per_cpu = fill_proof_share([float(n.get("CPU", 0.0)) for n in nodes] or hosts, planned)
    size = cfg.num_actors or max(1, sum(int((c - read_reserve(c)) / per_cpu + 1e-9) for c in hosts))
    return PoolPlan(size, Resources(num_cpus=per_cpu, memory=memory), threads=threads, use_gpu=False)


def packing_leftover(cpus: float, share: float) -> float:
    """The CPUs a node of `cpus` keeps free when Ray places on it as many actors of `share` as fit."""
    return cpus - math.floor(cpus / share + 1e-9) * share


def fill_proof_share(node_cpus: list[float], most: float) -> float:
    """The largest CPU share per model actor, at most `most` (in thousandths), at which every node
    keeps room for a read task however many actors Ray places on it.

    The plan puts fewer actors on a node than fit, but Ray places an actor wherever it fits: when a
    node is lost, its actors start again on the nodes left (or, planned before the loss was seen,
    start there in the first place). At a share that divides a node's CPUs (0.5 on a 1-CPU node)
    they fill it, no read task can run, no actor gets input, and the pass stops for good.
    """
    read = CPU_STAGE.num_cpus
    sizes = sorted({c for c in node_cpus if c >= read})
    share = math.floor(most * 1000) / 1000
    while share > 0.1 and not all(packing_leftover(c, share) >= read - 1e-9 for c in sizes):
        share = round(share - 0.001, 3)
    return max(0.1, share)


def pool_demand(cfg: FeaturesConfig, use_gpu: bool) -> Demand:
    """What one model actor needs of a node (the pool is elastic: it starts with one), checked
    before any stage runs (`check_resources`) and before the pool is planned (`ensure_demand`)."""
    bundle = {"CPU": cfg.cpus_per_actor or (0.25 if use_gpu else 0.5), "GPU": cfg.gpus_per_actor if use_gpu else 0.0, "memory": cfg.memory_per_actor_gb * 1e9}
    settings = {"CPU": "features.cpus_per_actor", "GPU": "features.device=cuda with features.gpus_per_actor", "memory": "features.memory_per_actor_gb"}
    return Demand(bundle, settings, count=cfg.num_actors or 1, count_setting="features.num_actors", what="model actors", all_at_once=False)


def check_resources(cfg: FeaturesConfig) -> None:
    """Refuse, naming the setting, model actors the cluster can never place."""
    check_demand(pool_demand(cfg, use_gpus(cfg.device)))


def plan_slices(shard_rows: dict[str, int], rows_per_slice: int) -> list[dict]:
    """Cut the shards, in order, into row slices of one model batch each (one Ray Data block each).

    Small blocks are what make the pass stream: an actor's output block is sent when its input
    block is done, so one batch per block means results (and completed shards) reach the driver
    batch by batch and in shard order, instead of in a few bursts, and a kill mid-pass loses little.
    """
    return [
        {"path": path, "start": start, "stop": min(start + rows_per_slice, n)}
        for path, n in shard_rows.items()
        for start in range(0, n, rows_per_slice)
    ]


def perturb_in_cpu_stage(cfg: FeaturesConfig, plan: PoolPlan) -> bool:
    """Whether image perturbations are made in the CPU stage (GPU actors) or in the actor (CPU actors)."""
    if cfg.perturb_in == "auto":
        return plan.use_gpu
    return cfg.perturb_in == "cpu"


def read_shard_slice(batch: dict[str, np.ndarray], run: RunDir) -> pa.Table:
    """Ray Data read step: the model-input columns of one row slice of a shard, plus its `path` and
    each row's position in the shard (`row`, which the write step names its parts by).

    Reading through the run's own fsspec filesystem (shipped as its URI) works for any URI the run
    uses, and asks no whole CPU (Ray's own parquet reader and repartition do, which stalls a
    2-CPU host next to the model actors).
    """
    from rsdist.core.schema import MODEL_INPUT_COLUMNS

    tables = []
    for path, start, stop in zip(batch["path"], batch["start"], batch["stop"]):
        path = str(path)
        with run.fs.open(path, "rb") as fh:
            table = pq.read_table(fh, columns=MODEL_INPUT_COLUMNS).slice(int(start), int(stop) - int(start))
        for i, sid in enumerate(table.column("sample_id").to_pylist()):
            if not sid:
                raise ValueError(f"{path}: row {int(start) + i}: sample_id is empty")
        table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
        tables.append(table.append_column(ROW, pa.array(np.arange(int(start), int(start) + table.num_rows), pa.int64())))
    return pa.concat_tables(tables)


def read_and_preprocess_slice(batch: dict[str, np.ndarray], run: RunDir, image_size: int, perturbations: list[str], seed: int, perturb_images: bool) -> dict[str, np.ndarray]:
    """The CPU stage as one step over one slice: read its rows, then decode and perturb them.

    One function, not a read step fused with a `batch_size=<model batch>` preprocess step: Ray Data
    bundles a fused task's input up to the largest batch size, which counted slices, not rows, and
    put up to a model batch of slices (often the whole input) in one task, so one actor got all the
    work and every result came back in one block at the end.
    """
    table = read_shard_slice(batch, run)
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return preprocess_batch(columns, image_size, perturbations, seed, perturb_images)


def pq_rows(run: RunDir, path: str) -> int:
    with run.fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def vlm_spec(cfg: FeaturesConfig) -> VlmSpec | None:
    """The VLM features the actors compute, or None when `features.vlm` is 'none'."""
    if cfg.vlm == "none":
        return None
    methods = tuple(m for m in VLM_FEATURES if m in cfg.vlm_features)
    return VlmSpec(cfg.vlm, methods, tuple(sorted(set(cfg.coincide_layers))), cfg.scalselect_mass, cfg.vlm_prompt)


def output_schema(image_dim: int, text_dim: int, shift_names: list[str], dtype: str, vlm_dims: dict[str, int] | None = None) -> pa.Schema:
    """The output columns; `vlm_dims` adds one fixed-size-list column per VLM feature (name -> width)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("image_emb", pa.list_(value, image_dim)),
        ("text_emb", pa.list_(value, text_dim)),
        ("shift", pa.float32()),
    ]
    fields += [(f"shift_{n}", pa.float32()) for n in shift_names]
    fields += [(name, pa.list_(value, dim)) for name, dim in (vlm_dims or {}).items()]
    return pa.schema(fields)


def embedding_dims(columns: dict, extra: list[str]) -> tuple[int, int, dict[str, int]]:
    """(image_dim, text_dim, {vlm column: dim}) from a result batch's arrays or a file schema's list types."""
    def width(x) -> int:
        return int(x.shape[1]) if hasattr(x, "shape") else int(x.list_size)

    return width(columns["image_emb"]), width(columns["text_emb"]), {c: width(columns[c]) for c in extra}


def _fixed_list(matrix: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def batch_table(batch: dict[str, np.ndarray], schema: pa.Schema, dtype: str, rows: np.ndarray | None = None) -> pa.Table:
    """The rows `rows` (default: all) of a result batch as a table of `schema` (embeddings in `dtype`)."""
    take = np.arange(len(batch["sample_id"])) if rows is None else rows
    cols = {}
    for f in schema:
        values = batch[f.name][take]
        if pa.types.is_fixed_size_list(f.type):
            cols[f.name] = _fixed_list(np.stack(list(values)) if values.dtype == object else values, dtype)
        elif pa.types.is_floating(f.type):
            cols[f.name] = pa.array(np.asarray(values, dtype=np.float32))
        elif pa.types.is_integer(f.type):
            cols[f.name] = pa.array(np.asarray(values, dtype=np.int64))
        else:
            cols[f.name] = pa.array([None if v is None else str(v) for v in values], type=f.type)
    return pa.table(cols, schema=schema)


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Positions [i, j) of `rows` (row numbers of one shard, in batch order) that hold consecutive
    row numbers: each becomes one part file."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = [0, *breaks.tolist(), len(rows)]
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def parts_folder(shard: str) -> str:
    """`features/_parts/<shard name without .parquet>/`: where a shard's parts wait for its commit."""
    return posixpath.splitext(shard)[0]


def part_name(start: int, stop: int) -> str:
    """A part holds the rows [start, stop) of its shard; the name is fixed by the rows, so a retried
    task rewrites the same file instead of adding one."""
    return f"{start:012d}-{stop:012d}.parquet"


def _crash_once(marker: str | None) -> bool:
    """True exactly once per marker file (fault injection for tests, see CRASH_ONCE_ENV)."""
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def write_parts(batch: dict[str, np.ndarray], run: RunDir, shift_names: list[str], dtype: str, vlm_columns: list[str], crash_marker: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data write step (a task after the actor pool): each run of consecutive rows of one shard
    in this result batch becomes `features/_parts/<shard>/<start>-<stop>.parquet`, written under a
    temporary name and renamed. Returns one small row per part (shard, start, stop): what the
    driver sees of the pass."""
    image_dim, text_dim, vlm_dims = embedding_dims(batch, vlm_columns)
    schema = output_schema(image_dim, text_dim, shift_names, dtype, vlm_dims).append(pa.field(ROW, pa.int64()))
    shards = np.asarray([str(s) for s in batch["shard"]], dtype=object)
    rows = np.asarray(batch[ROW], dtype=np.int64)
    out: dict[str, list] = {"shard": [], "start": [], "stop": []}
    crash = _crash_once(crash_marker)
    for shard in dict.fromkeys(shards.tolist()):
        where = np.flatnonzero(shards == shard)
        for i, j in contiguous_runs(rows[where]):
            take = where[i:j]
            start, stop = int(rows[take[0]]), int(rows[take[-1]]) + 1
            run.write_table(batch_table(batch, schema, dtype, take), NAME, PARTS, parts_folder(shard), part_name(start, stop))
            if crash:  # the process dies after one part is committed and another is half written
                with run.fs.open(run.temp_path(run.path(NAME, PARTS, parts_folder(shard), "partial.parquet")), "wb") as fh:
                    fh.write(b"PAR1")
                os._exit(1)
            out["shard"].append(shard)
            out["start"].append(start)
            out["stop"].append(stop)
    return {"shard": np.asarray(out["shard"], dtype=object), "start": np.asarray(out["start"], dtype=np.int64), "stop": np.asarray(out["stop"], dtype=np.int64)}


def commit_shard(run: RunDir, shard: str, n_rows: int) -> int:
    """Merge a shard's parts into `features/<shard>` (rows in shard order, each sample_id once, the
    first occurrence kept), written under a temporary name and renamed only when every row
    [0, n_rows) was found; then remove the parts. Parts overlap when a task was retried with other
    batch bounds: each row is taken from the first part that covers it. Memory: one row group
    (ROW_GROUP_ROWS rows; a whole shard below that, as the in-driver writer held).
    Returns the rows written."""
    folder = run.path(NAME, PARTS, parts_folder(shard))
    parts = []
    for path in run.fs.ls(folder, detail=False):
        base = posixpath.basename(path)
        if base.startswith(".tmp-") or not base.endswith(".parquet"):
            continue  # a write that died before its rename
        start, stop = (int(x) for x in base[: -len(".parquet")].split("-"))
        parts.append((start, -stop, path))
    cursor, seen, written = 0, set(), 0
    final = run.path(NAME, shard)
    tmp = run.temp_path(final)
    writer, buffered = None, []

    def flush(fh) -> None:
        nonlocal writer, buffered
        table = pa.concat_tables(buffered).combine_chunks()
        buffered = []
        if writer is None:
            writer = pq.ParquetWriter(fh, table.schema, compression=compression(table.schema))
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    try:
        with run.fs.open(tmp, "wb") as fh:
            for start, neg_stop, path in sorted(parts):
                stop = -neg_stop
                if stop <= cursor:
                    continue
                if start > cursor:
                    break
                with run.fs.open(path, "rb") as pf:
                    table = pq.read_table(pf).slice(cursor - start)
                cursor = stop
                ids = table.column("sample_id").to_pylist()
                keep = [i for i, sid in enumerate(ids) if not (sid in seen or seen.add(sid))]
                table = table.drop_columns([ROW])
                buffered.append(table.take(pa.array(keep, pa.int64())) if len(keep) < len(ids) else table)
                written += buffered[-1].num_rows
                if sum(t.num_rows for t in buffered) >= ROW_GROUP_ROWS:
                    flush(fh)
            if buffered:
                flush(fh)
            if writer is not None:
                writer.close()
        if cursor < n_rows or writer is None:
            raise RuntimeError(f"features: {shard}: rows {cursor}..{n_rows} have no part under {run.fs.unstrip_protocol(folder)}")
        run.commit(tmp, final)
    finally:
        if run.fs.exists(tmp):
            run.fs.rm(tmp)
    run.fs.rm(folder, recursive=True)
    return written


def embedded_dataset(run: RunDir, slices: list[dict], cfg: FeaturesConfig, plan: PoolPlan):
    """The lazy Ray Data pipeline over shard slices: read + preprocess (fused tasks) -> actor pool."""
    import ray

    image_names, text_names = split_perturbations(cfg.perturbations)
    ds = ray.data.from_items(slices, override_num_blocks=len(slices))
    ds = ds.map_batches(
        read_and_preprocess_slice,
        batch_size=1,  # one slice per task; see read_and_preprocess_slice
        batch_format="numpy",
        fn_kwargs={
            "run": run,
            "image_size": cfg.image_size,
            "perturbations": list(cfg.perturbations),
            "seed": cfg.seed,
            "perturb_images": perturb_in_cpu_stage(cfg, plan),
        },
        num_cpus=CPU_STAGE.num_cpus,
    )
    return ds.map_batches(
        EmbedModel,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "encoder": cfg.encoder,
            "image_perturbations": image_names,
            "text_perturbations": text_names,
            "threads": plan.threads,
            "use_gpu": plan.use_gpu,
            "max_tokens": cfg.max_text_tokens,
            "seed": cfg.seed,
            "vlm": vlm_spec(cfg),
        },
        compute=elastic_actor_pool(plan.size),
        num_cpus=plan.resources.num_cpus,
        num_gpus=plan.resources.num_gpus or None,
        **({"memory": plan.resources.memory} if plan.resources.memory else {}),
    )


def build_dataset(run: RunDir, slices: list[dict], cfg: FeaturesConfig, plan: PoolPlan):
    """`embedded_dataset` -> write step (tasks that write each result batch's rows as parts and
    return only their bounds)."""
    image_names, text_names = split_perturbations(cfg.perturbations)
    spec = vlm_spec(cfg)
    return embedded_dataset(run, slices, cfg, plan).map_batches(
        write_parts,
        batch_size=None,  # each result block as it comes: no re-batching that would hold rows back
        batch_format="numpy",
        fn_kwargs={
            "run": run,
            "shift_names": image_names + text_names,
            "dtype": cfg.dtype,
            "vlm_columns": spec.columns if spec else [],
            "crash_marker": os.environ.get(CRASH_ONCE_ENV) or None,
        },
        num_cpus=WRITE_STAGE.num_cpus,
    )


class ShardProgress:
    """Which rows of each pending shard have reached a committed part, as merged [start, stop)
    intervals (a handful per shard however many parts): the driver's whole view of the pass."""

    def __init__(self, shard_rows: dict[str, int]):
        self.rows = dict(shard_rows)
        self.covered: dict[str, list[list[int]]] = {name: [] for name in shard_rows}

    def add(self, shard: str, start: int, stop: int) -> bool:
        """Record a part; True when this part completes its shard (once per shard)."""
        spans = self.covered.get(shard)
        if spans is None:
            raise RuntimeError(f"features: part from unexpected shard {shard!r}")
        done_before = self.complete(shard)
        merged: list[list[int]] = []
        for s, e in sorted([*spans, [start, stop]]):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.covered[shard] = merged
        return not done_before and self.complete(shard)

    def complete(self, shard: str) -> bool:
        spans = self.covered[shard]
        return len(spans) == 1 and spans[0][0] == 0 and spans[0][1] >= self.rows[shard]

    def missing(self) -> dict[str, int]:
        return {s: self.rows[s] - sum(e - b for b, e in spans) for s, spans in self.covered.items() if not self.complete(s)}


def _progress(total: int) -> "Iterator":
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="features", unit="row", mininterval=2.0)


def run(run: RunDir, cfg: FeaturesConfig) -> StageResult:
    import ray

    inputs = run.parquet_files("shards")
    if not inputs:
        raise FileNotFoundError(f"features: no parquet shards under {run.url('shards')}")
    out_name = {p: posixpath.basename(p) for p in inputs}
    pending = [p for p in inputs if not run.exists(NAME, out_name[p])]
    rows_in = run.count_rows("shards")
    image_names, text_names = split_perturbations(cfg.perturbations)
    spec = vlm_spec(cfg)
    vlm_columns = spec.columns if spec else []
    use_gpu = use_gpus(cfg.device)
    ensure_demand(pool_demand(cfg, use_gpu))
    plan = plan_pool(cfg, alive_nodes(), use_gpu)
    log.info(
        "features: %d of %d shards to do; %d actor(s) x %s CPU, %s GPU, %d thread(s)",
        len(pending), len(inputs), plan.size, plan.resources.num_cpus, plan.resources.num_gpus, plan.threads,
    )
    done_rows = 0
    first_at = first_shard_at = None
    rows_before_first_shard = None
    seen = first_n = 0  # rows received; rows in the first block (the steady rate starts after it)
    start = time.perf_counter()
    run.remove(NAME, PARTS)  # parts of an earlier, killed run: its shards are redone whole
    shard_rows = {out_name[p]: pq_rows(run, p) for p in pending}
    pending = [p for p in pending if shard_rows[out_name[p]]]  # an empty shard has no output file
    if pending:
        slices = plan_slices({p: shard_rows[out_name[p]] for p in pending}, cfg.batch_size)
        plan = dataclasses.replace(plan, size=min(plan.size, len(slices)))  # no idle actors on small inputs
        progress = ShardProgress({out_name[p]: shard_rows[out_name[p]] for p in pending})
        commit = ray.remote(num_cpus=WRITE_STAGE.num_cpus, max_retries=3)(commit_shard)
        commits: dict = {}  # commit task -> shard
        every = max(1, len(pending) // 20)  # about twenty progress lines per pass
        committed = 0
        bar = _progress(sum(progress.rows.values()))

        def collect(block_until_all: bool) -> None:
            nonlocal done_rows, committed, first_shard_at
            while commits:
                ready, _ = ray.wait(list(commits), num_returns=1, timeout=None if block_until_all else 0)
                if not ready:
                    return
                shard = commits.pop(ready[0])
                done_rows += ray.get(ready[0])
                committed += 1
                if first_shard_at is None:
                    first_shard_at = time.perf_counter()
                if committed % every == 0 or committed == len(pending):
                    log.info("features: %d of %d shards committed (%s last), %d rows", committed, len(pending), shard, done_rows)

        # The driver sees one small row per written part (shard, start, stop), never the features.
        for batch in build_dataset(run, slices, cfg, plan).iter_batches(batch_size=None, batch_format="numpy"):
            n = int(np.sum(batch["stop"] - batch["start"])) if len(batch["shard"]) else 0
            seen += n
            if first_at is None:
                first_at, first_n = time.perf_counter(), n
            for shard, lo, hi in zip(batch["shard"], batch["start"], batch["stop"]):
                if progress.add(str(shard), int(lo), int(hi)):
                    if rows_before_first_shard is None:
                        rows_before_first_shard = seen
                    commits[commit.remote(run, str(shard), progress.rows[str(shard)])] = str(shard)
            collect(block_until_all=False)
            bar.update(n)
        collect(block_until_all=True)
        bar.close()
        missing = {s: n for s, n in progress.missing().items() if n}
        if missing:
            raise RuntimeError(f"features: shards came back incomplete (missing rows per shard): {missing}")
        run.remove(NAME, PARTS)
    seconds = time.perf_counter() - start
    written = run.parquet_files(NAME)
    if not written:
        raise RuntimeError(f"features: no output under {run.url(NAME)} (every input shard is empty)")
    with run.fs.open(written[0], "rb") as fh:
        first = pq.read_schema(fh)
    image_dim, text_dim, vlm_dims = embedding_dims({f.name: f.type for f in first}, vlm_columns)
    meta = {
        "encoder": cfg.encoder,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "image_size": cfg.image_size,
        "perturbations": list(cfg.perturbations),
        "image_perturbations": image_names,
        "text_perturbations": text_names,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "shift": "1 - cos(e(x), e(x~_p)), mean over p",
        "vlm": None if spec is None else {
            "model": spec.model,
            "columns": vlm_dims,
            "coincide_layers": list(spec.coincide_layers) if "coincide" in spec.methods else None,
            "scalselect_mass": spec.mass if "scalselect" in spec.methods else None,
            "prompt": spec.prompt,
        },
    }
    run.write_json(meta, NAME, META)
    rows_out = run.count_rows(NAME)
    rate = done_rows / seconds if done_rows and seconds > 0 else 0.0
    steady = None
    if first_at is not None and seen > first_n and start + seconds > first_at:
        steady = (seen - first_n) / (start + seconds - first_at)
    return StageResult(
        rows_in=rows_in,
        rows_out=rows_out,
        extra={
            "encoder": cfg.encoder,
            "vlm": cfg.vlm,
            "perturbations": list(cfg.perturbations),
            "rows_per_second": round(rate, 2),
            "first_result_seconds": round(first_at - start, 2) if first_at else None,
            "first_shard_seconds": round(first_shard_at - start, 2) if first_shard_at else None,
            "rows_before_first_shard": rows_before_first_shard,
            "steady_rows_per_second": round(steady, 2) if steady else None,
            "actors": plan.size,
            "shards_resumed": len(inputs) - len(pending),
        },
    )


def resources(cfg: FeaturesConfig) -> Resources:
    """What one model actor asks for (the pool is sized from the nodes: plan_pool)."""
    return plan_pool(cfg, alive_nodes(), use_gpus(cfg.device)).resources


STAGE = Stage(name="features", folder="features", reads=("shards",), section="features", resources=resources, run=run, resumable=True, placement=check_resources)
