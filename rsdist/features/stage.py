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
perturbations; a quarter CPU per task) -> model actor pool (`EmbedModel`, ActorPoolStrategy of fixed
size, fractional CPUs, one GPU each when the cluster has GPUs; the image perturbations are made in
the actor on CPU pools, in the CPU stage for GPU actors) -> the driver takes each output block as it
arrives and writes a shard's output as soon as all its rows are in, so shards land during the pass.

Resumable per shard: a shard whose output file exists is not read again. Exactly once: rows are
keyed by sample_id per shard (a retried block after an actor death cannot add a second copy), and
a shard is only written when every one of its sample_ids is present; the stage fails loudly if a
shard comes back incomplete.

Resources (`plan_pool`): decided from `ray.cluster_resources()`. With GPUs: one actor per GPU
(`num_gpus=1`). Without: about CPUs / threads_per_actor actors sharing CPUs minus a reserve (half a
CPU on small hosts), so reads and decodes always find a slot.
"""

from __future__ import annotations

import dataclasses
import logging
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
from rsdist.core.rundir import RunDir
from rsdist.stage import Resources, Stage, StageResult

log = logging.getLogger("rsdist")

NAME = "features"
META = "features_meta.json"
CPU_STAGE = Resources(num_cpus=0.25)


@dataclass(frozen=True)
class PoolPlan:
    """How many model actors, what each asks Ray for, and how many torch threads each runs."""

    size: int
    resources: Resources
    threads: int
    use_gpu: bool


def plan_pool(cfg: FeaturesConfig, cluster: dict[str, float]) -> PoolPlan:
    """Size the actor pool from the cluster's resources (never from the driver's machine)."""
    cpus = float(cluster.get("CPU", 1.0))
    gpus = int(cluster.get("GPU", 0.0))
    if gpus >= 1:
        size = min(cfg.num_actors or gpus, gpus)
        per_cpu = max(0.25, min(2.0, (cpus - 1.0) / size))
        return PoolPlan(size, Resources(num_cpus=per_cpu, num_gpus=1.0), threads=2, use_gpu=True)
    threads = cfg.threads_per_actor
    size = cfg.num_actors or max(1, int(round(cpus / threads)))
    reserve = max(0.5, cpus / 8)  # kept free for read and decode tasks
    per_cpu = max(0.1, min(float(threads), (cpus - reserve) / size))
    return PoolPlan(size, Resources(num_cpus=round(per_cpu, 3)), threads=threads, use_gpu=False)


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
    """Ray Data read step: the model-input columns of one row slice of a shard, plus its `path`.

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
        tables.append(table.append_column("path", pa.array([path] * table.num_rows, pa.string())))
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


def shard_ids(run: RunDir, path: str) -> list[str]:
    """The unique sample_ids of one input shard, in file order."""
    with run.fs.open(path, "rb") as fh:
        ids = pq.read_table(fh, columns=["sample_id"]).column("sample_id").to_pylist()
    for i, sid in enumerate(ids):
        if not sid:
            raise ValueError(f"{path}: row {i}: sample_id is empty")
    return list(dict.fromkeys(ids))


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


class ShardCollector:
    """Gathers result rows per input shard (keyed by sample_id) and hands back each completed shard."""

    def __init__(self, expected: dict[str, list[str]]):
        self.expected = expected
        self.rows: dict[str, dict[str, dict]] = {name: {} for name in expected}

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Add a result batch; returns the shards that are now complete."""
        done = []
        columns = [c for c in batch if c != "shard"]
        for i, shard in enumerate(batch["shard"]):
            shard = str(shard)
            bucket = self.rows.get(shard)
            if bucket is None:
                raise RuntimeError(f"features: result row from unexpected shard {shard!r}")
            sid = str(batch["sample_id"][i])
            if sid in bucket:
                continue  # a retried block delivered this row again
            bucket[sid] = {c: batch[c][i] for c in columns}
            if len(bucket) == len(self.expected[shard]):
                done.append(shard)
        return done

    def pop_table(self, shard: str, schema: pa.Schema, dtype: str) -> pa.Table:
        bucket = self.rows.pop(shard)
        rows = [bucket[sid] for sid in self.expected[shard]]
        cols = {}
        for f in schema:
            values = [r[f.name] for r in rows]
            if pa.types.is_fixed_size_list(f.type):
                cols[f.name] = _fixed_list(np.stack(values), dtype)
            elif pa.types.is_floating(f.type):
                cols[f.name] = pa.array(np.asarray(values, dtype=np.float32))
            else:
                cols[f.name] = pa.array([None if v is None else str(v) for v in values], type=f.type)
        return pa.table(cols, schema=schema)

    def incomplete(self) -> dict[str, int]:
        return {s: len(self.expected[s]) - len(b) for s, b in self.rows.items()}


def build_dataset(run: RunDir, slices: list[dict], cfg: FeaturesConfig, plan: PoolPlan):
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
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.resources.num_cpus,
        num_gpus=plan.resources.num_gpus or None,
    )


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
    shift_names = image_names + text_names
    spec = vlm_spec(cfg)
    vlm_columns = spec.columns if spec else []
    plan = plan_pool(cfg, ray.cluster_resources())
    log.info(
        "features: %d of %d shards to do; %d actor(s) x %s CPU, %s GPU, %d thread(s)",
        len(pending), len(inputs), plan.size, plan.resources.num_cpus, plan.resources.num_gpus, plan.threads,
    )
    done_rows = 0
    first_at = first_shard_at = None
    rows_before_first_shard = None
    seen = first_n = 0  # rows received; rows in the first block (the steady rate starts after it)
    image_dim = text_dim = None
    vlm_dims: dict[str, int] = {}
    start = time.perf_counter()
    if pending:
        expected = {p: shard_ids(run, p) for p in pending}
        collector = ShardCollector({out_name[p]: ids for p, ids in expected.items()})
        todo = sum(len(v) for v in expected.values())
        slices = plan_slices({p: pq_rows(run, p) for p in pending}, cfg.batch_size)
        plan = dataclasses.replace(plan, size=min(plan.size, len(slices)))  # no idle actors on small inputs
        schema = None
        bar = _progress(todo)
        # batch_size=None: each output block as it arrives, not re-batched (which would hold rows back)
        for batch in build_dataset(run, slices, cfg, plan).iter_batches(batch_size=None, batch_format="numpy"):
            if schema is None:
                image_dim, text_dim, vlm_dims = embedding_dims(batch, vlm_columns)
                schema = output_schema(image_dim, text_dim, shift_names, cfg.dtype, vlm_dims)
            n = len(batch["sample_id"])
            seen += n
            if first_at is None:
                first_at, first_n = time.perf_counter(), n
            for shard in collector.add(batch):
                table = collector.pop_table(shard, schema, cfg.dtype)
                run.write_table(table, NAME, shard)
                done_rows += table.num_rows
                if first_shard_at is None:
                    first_shard_at, rows_before_first_shard = time.perf_counter(), seen
                log.info("features: wrote %s (%d rows)", shard, table.num_rows)
            bar.update(n)
        bar.close()
        missing = {s: n for s, n in collector.incomplete().items() if n}
        if missing:
            raise RuntimeError(f"features: shards came back incomplete (missing rows per shard): {missing}")
    seconds = time.perf_counter() - start
    if image_dim is None:  # everything was already written by an earlier run
        first = pq.read_schema(run.fs.open(run.path(NAME, out_name[inputs[0]]), "rb"))
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
    """What one model actor asks for (the pool is sized from the cluster: plan_pool)."""
    import ray

    return plan_pool(cfg, ray.cluster_resources()).resources


STAGE = Stage(name="features", folder="features", reads=("shards",), section="features", resources=resources, run=run, resumable=True)
