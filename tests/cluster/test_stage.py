"""The cluster stage's contract on a small features folder: train rows only, output files and
their columns, spherical distances, sizes, and a resumed labelling pass that redoes only what is
missing."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import adjusted_rand_score

from rsdist.cluster import run as cluster_run
from rsdist.bench.kmeans import write_blob_features
from rsdist.cluster.shards import train_rows
from rsdist.core.tables import embedding_matrix, space_vectors
from rsdist.config import ClusterConfig, ConfigError
from rsdist.stage import MARKER, fingerprint, run_stage


def stage(run, cfg):
    return run_stage(run, "clusters", fingerprint(cfg), lambda: cluster_run(run, cfg), resumable=True)


def test_contract_spherical_and_resume(ray_session, run_dir):
    truth = write_blob_features(run_dir, 1200, 12, 4, seed=1, spread=0.7, shard_rows=400, text_dim=10, test_fraction=0.2)
    cfg = ClusterConfig(k=4, space="joint", metric="cosine", batch_size=256, max_iter=100, num_actors=2, seed=0)
    rec = stage(run_dir, cfg)

    features = run_dir.read_table("features")
    train = train_rows(features, "features")
    n = train.num_rows
    assert 0 < n < features.num_rows  # some rows are test rows
    assert rec["rows_in"] == n and rec["rows_out"] == n
    assert rec["k"] == 4 and rec["backend"] == "torch-cpu" and rec["iterations"] >= 1
    assert rec["precision"] in ("float32", "bfloat16")  # what `auto` chose on this machine, recorded

    out = run_dir.read_table("clusters")
    assert out.schema.field("sample_id").type == pa.string()
    assert out.schema.field("cluster").type == pa.int32()
    assert out.schema.field("dist").type == pa.float32()
    assert sorted(out.column("sample_id").to_pylist()) == sorted(train.column("sample_id").to_pylist())
    assert len(run_dir.parquet_files("clusters")) == 3  # one per input unit

    centroids = np.load(run_dir.path("clusters", "centroids.npy"))
    assert centroids.shape == (4, 22)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)

    # spherical: dist = 1 - cos to the assigned (and nearest) centroid in the joint space
    by_id = {s: i for i, s in enumerate(train.column("sample_id").to_pylist())}
    order = [by_id[s] for s in out.column("sample_id").to_pylist()]
    x = space_vectors(train, "joint", "features")[order]
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    cos = x @ centroids.T
    labels = out.column("cluster").to_numpy()
    np.testing.assert_array_equal(labels, cos.argmax(1))
    np.testing.assert_allclose(out.column("dist").to_numpy(), 1 - cos[np.arange(n), labels], atol=1e-5)
    true = truth[[int(s[5:]) for s in out.column("sample_id").to_pylist()]]
    assert adjusted_rand_score(true, labels) > 0.99

    sizes = run_dir.read_json("clusters", "sizes.json")
    assert sum(sizes[str(c)] for c in range(4)) == n
    timings = ("read_seconds", "read_only_seconds", "init_seconds", "iterate_seconds", "label_seconds")
    assert all(rec[t] >= 0 for t in timings) and rec["read_only_seconds"] <= rec["read_seconds"]
    assert rec["init_seconds"] + rec["iterate_seconds"] == pytest.approx(rec["fit_seconds"], abs=0.01)
    assert not set(timings) & set(sizes)  # the run's timings stay out of sizes.json, which a resumed run reproduces
    assert sizes["k"] == 4 and sizes["backend"] == "torch-cpu" and sizes["iterations"] == rec["iterations"]
    assert sizes["inertia"] == pytest.approx(float((1 - cos[np.arange(n), labels]).sum()), rel=1e-4)

    # the same settings again: skipped
    assert stage(run_dir, cfg)["skipped"] is True

    # a run killed during labelling: the marker and two of three parts are gone
    parts = run_dir.parquet_files("clusters")
    kept = parts[1]
    kept_mtime = os.stat(kept).st_mtime_ns
    before = out.sort_by("sample_id")
    run_dir.fs.rm(run_dir.path("clusters", MARKER))
    for p in (parts[0], parts[2]):
        run_dir.fs.rm(p)
    again = stage(run_dir, cfg)
    assert again["skipped"] is False and again["resumed_units"] == 1
    assert again["rows_out"] == n and again["iterations"] == rec["iterations"]
    assert os.stat(kept).st_mtime_ns == kept_mtime  # not rewritten
    assert run_dir.read_table("clusters").sort_by("sample_id").equals(before)
    assert run_dir.read_json("clusters", "sizes.json") == sizes


def test_bad_embeddings_name_the_row():
    where = "features/part-00000.parquet"
    null = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2))
    with pytest.raises(ValueError, match=r"part-00000.parquet: column image_emb is null in row 1"):
        embedding_matrix(null, "image_emb", where)
    ragged = pa.array([[1.0, 2.0], [1.0], [3.0, 4.0]], pa.list_(pa.float32()))
    with pytest.raises(ValueError, match=r"column text_emb row 1 has 1 values, expected 2"):
        embedding_matrix(ragged, "text_emb", where)
    nan = pa.array([[1.0, 2.0], [3.0, float("nan")]], pa.list_(pa.float32(), 2))
    with pytest.raises(ValueError, match=r"row 1 holds a NaN"):
        embedding_matrix(nan, "image_emb", where)
    with pytest.raises(ValueError, match=r"column 'split' is missing"):
        train_rows(pa.table({"sample_id": ["a"]}), where)


@pytest.mark.parametrize("setting,message", [
    ({"metric": "manhattan"}, r"cluster.metric: 'manhattan' is not one of: euclidean, cosine"),
    ({"mode": "full"}, r"cluster.mode"),
    ({"backend": "jax"}, r"cluster.backend"),
    ({"reassign_ratio": 1.5}, r"cluster.reassign_ratio"),
    ({"precision": "fp16"}, r"cluster.precision: 'fp16' is not one of: auto, float32, bfloat16"),
    ({"overlap": "yes"}, r"cluster.overlap: 'yes' must be true or false"),
    ({"shared_memory": 1}, r"cluster.shared_memory: 1 must be true or false"),
])
def test_config_errors_name_the_field(setting, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**setting)