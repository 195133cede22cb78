"""The features stage writes its output on the workers: the same table as the in-driver collection
it replaced, exactly once when a write task dies, resumable per committed shard, and the driver
never iterates result rows."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from rsdist.config import FeaturesConfig
from rsdist.core.raycluster import alive_nodes
from rsdist.features import stage as features
from rsdist.features.preprocess import split_perturbations

from .conftest import write_shards


def _cfg(**kw) -> FeaturesConfig:
    base = dict(encoder="tiny", image_size=32, batch_size=4, perturbations=["noise", "rotate", "token_dropout"])
    base.update(kw)
    return FeaturesConfig(**base)


def driver_collected_tables(run, cfg: FeaturesConfig) -> dict[str, pa.Table]:
    """The previous version's output, kept here as the reference: the driver iterates every result
    row of the actor pool, keys the rows by sample_id per shard and builds each shard's table."""
    import ray

    inputs = run.parquet_files("shards")
    shard_rows = {p: features.pq_rows(run, p) for p in inputs}
    slices = features.plan_slices(shard_rows, cfg.batch_size)
    plan = features.plan_pool(cfg, alive_nodes(), use_gpu=False)
    plan = features.dataclasses.replace(plan, size=min(plan.size, len(slices)))
    image_names, text_names = split_perturbations(cfg.perturbations)
    buckets: dict[str, dict[str, dict]] = {}
    schema = None
    for batch in features.embedded_dataset(run, slices, cfg, plan).iter_batches(batch_size=None, batch_format="numpy"):
        if schema is None:
            image_dim, text_dim, _ = features.embedding_dims(batch, [])
            schema = features.output_schema(image_dim, text_dim, image_names + text_names, cfg.dtype)
        for i, shard in enumerate(batch["shard"]):
            bucket = buckets.setdefault(str(shard), {})
            bucket.setdefault(str(batch["sample_id"][i]), {c: batch[c][i] for c in batch})
    tables = {}
    for shard, bucket in buckets.items():
        rows = sorted(bucket.values(), key=lambda r: int(r["row"]))
        cols = {}
        for f in schema:
            values = [r[f.name] for r in rows]
            if pa.types.is_fixed_size_list(f.type):
                m = np.ascontiguousarray(np.stack(values), dtype=np.float16 if cfg.dtype == "float16" else np.float32)
                cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])
            elif pa.types.is_floating(f.type):
                cols[f.name] = pa.array(np.asarray(values, dtype=np.float32))
            else:
                cols[f.name] = pa.array([None if v is None else str(v) for v in values], type=f.type)
        tables[shard] = pa.table(cols, schema=schema)
    return tables


@pytest.fixture(scope="module")
def written(ray_session, tmp_path_factory):
    """Features written on the workers for three shards of whole batches (the same model batches
    both ways), with the driver's loop watched: the columns of every batch it got. The tests below
    read it; the resume test works on a copy."""
    from rsdist.core.rundir import RunDir

    root = tmp_path_factory.mktemp("written") / "run"
    run = RunDir(str(root))
    write_shards(run, n_shards=3, rows_per_shard=8, seed=5)
    cfg = _cfg(dtype="float16")
    seen_columns: set[str] = set()
    real = features.build_dataset

    def spy(*args, **kw):
        ds = real(*args, **kw)
        original = ds.iter_batches

        def iter_batches(*a, **k):
            for batch in original(*a, **k):
                seen_columns.update(batch)
                yield batch

        ds.iter_batches = iter_batches
        return ds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "build_dataset", spy)
        result = features.run(run, cfg)
    return SimpleNamespace(root=root, run=run, cfg=cfg, result=result, seen_columns=seen_columns)


def test_worker_written_output_equals_the_driver_collected_one(written):
    run_dir, cfg, result = written.run, written.cfg, written.result
    assert result.rows_out == result.rows_in == 24
    reference = driver_collected_tables(run_dir, cfg)
    names = [p.rsplit("/", 1)[1] for p in run_dir.parquet_files("features")]
    assert names == sorted(reference) == [f"part-{i:05d}.parquet" for i in range(3)]
    for name in names:
        written_table = run_dir.read_table("features", name)
        assert written_table.schema == reference[name].schema
        assert written_table.equals(reference[name]), name  # same columns, same values, bit for bit
        # one row group per shard, as the in-driver writer made (k-means units are row groups)
        assert features.pq.ParquetFile(run_dir.path("features", name)).metadata.num_row_groups == 1
    assert not run_dir.exists("features", features.PARTS)  # the parts are gone once committed


def test_a_write_task_that_dies_is_retried_exactly_once(ray_session, run_dir, tmp_path, monkeypatch):
    ids = write_shards(run_dir, n_shards=3, rows_per_shard=10, seed=6)  # 10 rows, batches of 4: parts span shards
    marker = tmp_path / "crashed"
    monkeypatch.setenv(features.CRASH_ONCE_ENV, str(marker))
    result = features.run(run_dir, _cfg())
    assert marker.exists(), "no write task died"
    table = run_dir.read_table("features")
    assert table.column("sample_id").to_pylist() == ids  # every row once, in shard order
    assert result.rows_out == result.rows_in == 30
    leftovers = [p for p in run_dir.fs.ls(run_dir.path("features"), detail=False) if p.rsplit("/", 1)[1].startswith((".tmp-", "_"))]
    assert leftovers == []


def test_resume_skips_committed_shards_and_redoes_parts(written, tmp_path):
    from rsdist.core.rundir import RunDir

    shutil.copytree(written.root, tmp_path / "run")  # a finished run (file times kept)
    run_dir, cfg = RunDir(str(tmp_path / "run")), written.cfg
    kept = {n: run_dir.fs.info(run_dir.path("features", n))["mtime"] for n in ("part-00000.parquet", "part-00002.parquet")}
    before = run_dir.read_table("features", "part-00001.parquet")
    run_dir.remove("features", "part-00001.parquet")
    # a killed run left a part of that shard (and a half-written file): they are not trusted
    run_dir.write_table(before.slice(0, 4).append_column("row", pa.array(np.arange(4), pa.int64())), "features", features.PARTS, "part-00001", features.part_name(0, 4))
    result = features.run(run_dir, cfg)
    assert result.extra["shards_resumed"] == 2 and result.rows_out == 24
    assert {n: run_dir.fs.info(run_dir.path("features", n))["mtime"] for n in kept} == kept  # not rewritten
    assert run_dir.read_table("features", "part-00001.parquet").equals(before)


def test_commit_merges_overlapping_parts_and_refuses_gaps(run_dir):
    n = 6
    table = pa.table({"sample_id": [f"s{i}" for i in range(n)], "shift": pa.array(np.arange(n, dtype=np.float32)), "row": pa.array(np.arange(n), pa.int64())})
    # a retried task with other batch bounds wrote [0, 4) and [2, 6) next to [0, 2)
    for lo, hi in ((0, 2), (0, 4), (2, 6)):
        run_dir.write_table(table.slice(lo, hi - lo), "features", features.PARTS, "part-00000", features.part_name(lo, hi))
    assert features.commit_shard(run_dir, "part-00000.parquet", n) == n
    assert run_dir.read_table("features", "part-00000.parquet").equals(table.drop_columns(["row"]))

    run_dir.write_table(table.slice(0, 2), "features", features.PARTS, "part-00001", features.part_name(0, 2))
    run_dir.write_table(table.slice(3, 3), "features", features.PARTS, "part-00001", features.part_name(3, 6))
    with pytest.raises(RuntimeError, match="part-00001.parquet: rows 2..6 have no part"):
        features.commit_shard(run_dir, "part-00001.parquet", n)
    assert not run_dir.exists("features", "part-00001.parquet")


def test_driver_sees_part_bounds_not_rows(written):
    """The driver's loop gets only (shard, start, stop) per part; no features column reaches it."""
    assert written.seen_columns == {"shard", "start", "stop"}


def test_progress_merges_intervals():
    p = features.ShardProgress({"a": 10, "b": 3})
    assert not p.add("a", 4, 8) and not p.add("a", 0, 4)
    assert p.missing() == {"a": 2, "b": 3}
    assert p.add("a", 6, 10)  # overlapping retry bounds still complete it, once
    assert not p.add("a", 0, 10)
    assert p.missing() == {"b": 3}
