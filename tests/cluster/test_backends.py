"""The assign interface: chunked torch arithmetic equals a brute-force reference for both metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsdist.cluster.backends import CPU_CHUNK_ROWS, TorchBackend, make_backend, matmul_dtype, rows_per_chunk
from rsdist.bench.kmeans import bench, device_blobs
from rsdist.cluster.shards import full_sums
from rsdist.core.tables import space_vectors, unit_rows


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_assign_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 24)).astype(np.float32)
    c = rng.standard_normal((37, 24)).astype(np.float32)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        ref = 1 - x @ c.T
    else:
        ref = ((x[:, None] - c[None]) ** 2).sum(-1)
    chunk = 8 * 37 * 50  # 50 rows per block
    assert rows_per_chunk(37, chunk) == 50
    assert rows_per_chunk(10, 1 << 30, max_rows=CPU_CHUNK_ROWS) == CPU_CHUNK_ROWS
    labels, dists = TorchBackend(metric, chunk_bytes=chunk).assign(torch.from_numpy(x), torch.from_numpy(c))
    np.testing.assert_array_equal(labels.numpy(), ref.argmin(1))
    np.testing.assert_allclose(dists.numpy(), ref.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_bf16_assign_picks_a_nearest_centroid_and_reports_its_exact_distance(metric):
    """bf16 may swap near-tied centroids, never a clearly farther one; the distance it reports is
    the float32 distance to the centroid it picked."""
    rng = np.random.default_rng(2)
    c = rng.standard_normal((300, 64)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, 300, 5000)] + rng.standard_normal((5000, 64)).astype(np.float32) * 0.06
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = 1 - x @ c.T if metric == "cosine" else ((x[:, None] - c[None]) ** 2).sum(-1)
    backend = TorchBackend(metric, chunk_bytes=8 * 300 * 700, precision="bfloat16")
    assert backend.precision == "bfloat16" and backend.dtype == torch.bfloat16
    labels, dists = backend.assign(torch.from_numpy(x), torch.from_numpy(c))
    labels = labels.numpy()
    picked = ref[np.arange(len(x)), labels]
    np.testing.assert_allclose(dists.numpy(), picked, rtol=1e-4, atol=1e-5)
    assert (labels == ref.argmin(1)).mean() > 0.99
    assert (picked - ref.min(1)).max() < 0.02  # any swap is between near-equal distances
    assert picked.sum() <= ref.min(1).sum() * 1.0005


def test_precision_setting():
    cpu = torch.device("cpu")
    assert matmul_dtype("float32", cpu) == torch.float32 and matmul_dtype("bfloat16", cpu) == torch.bfloat16
    assert matmul_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    assert TorchBackend().precision == "float32"
    with pytest.raises(ValueError, match="cluster.precision: 'fp8' is not one of: auto, float32, bfloat16"):
        TorchBackend(precision="fp8")


def test_gpu_backends_fall_back_without_a_gpu():
    for name in ("auto", "torch", "cupy", "cuml"):
        assert make_backend(name, "euclidean", 1 << 20, has_gpu=False).name == "torch-cpu"
    with pytest.raises(ValueError, match="cluster.backend: 'jax'"):
        make_backend("jax", "euclidean", 1 << 20, has_gpu=False)


def test_space_vectors_write_in_place_and_check_the_width():
    import pyarrow as pa

    from rsdist.bench.kmeans import fixed_list

    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    table = pa.table({"image_emb": fixed_list(img), "text_emb": fixed_list(txt)})
    buf = np.full((7, 7), -1.0, np.float32)
    got = space_vectors(table, "joint", "t.parquet", out=buf[1:6])
    assert np.shares_memory(got, buf)
    want = np.concatenate([unit_rows(img), unit_rows(txt)], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(buf[1:6], want, rtol=1e-6)
    assert (buf[0] == -1).all() and (buf[6] == -1).all()
    with pytest.raises(ValueError, match=r"t.parquet: vectors of 7 values in space 'joint', expected 6"):
        space_vectors(table, "joint", "t.parquet", out=np.empty((5, 6), np.float32))


def test_device_pass_bench_runs_on_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fall-back")
    x = device_blobs(5000, 16, 7, seed=0, spread=0.5, device=torch.device("cpu"), chunk_rows=999)
    assert x.shape == (5000, 16) and torch.isfinite(x).all()
    sums, counts, inertia = full_sums(TorchBackend(), x, x[:7].clone())
    assert int(counts.sum()) == 5000 and inertia > 0
    np.testing.assert_allclose(sums.sum(0).numpy(), x.sum(0).numpy(), rtol=1e-3, atol=1e-3)

    fig = bench(["--device-pass", "--rows", "5000", "--dim", "16", "--k", "7", "--iters", "2", "--backends", "torch,cupy", "--bandwidth-gbs", "10"])
    assert fig["device"] == "cpu" and fig["data_bytes"] == 5000 * 16 * 4
    assert fig["floor_seconds"] == pytest.approx(5000 * 16 * 4 / 10e9, rel=1e-3) and fig["bandwidth_source"] == "flag"
    t = fig["backends"]["torch"]
    assert t["backend"] == "torch-cpu" and t["iters"] == 2 and t["seconds_per_iter"] > 0
    assert t["x_floor"] == pytest.approx(t["seconds_per_iter"] / fig["floor_seconds"], rel=0.05)
    assert "skipped" in fig["backends"]["cupy"]


def test_micro_bench_times_each_change_against_its_baseline():
    fig = bench(["--micro", "--rows", "3000", "--dim", "16", "--k", "20", "--batch", "256", "--repeats", "1", "--units", "2"])
    for name, (base, new) in {
        "assign": ("float32", "bfloat16"), "gather": ("indexing", "index_select"), "kmeans_pp_step": ("float32", "bfloat16"),
        "read_unit": ("zstd", "uncompressed"),
    }.items():
        f = fig[name]
        assert f[f"{base}_ms"] > 0 and f[f"{new}_ms"] > 0
        assert f["ratio"] == pytest.approx(f[f"{base}_ms"] / f[f"{new}_ms"], rel=0.01)
    assert fig["arrow_pages"]["units"] == 2 and fig["arrow_pages"]["reuse_s"] > 0
    assert fig["kmeans_pp"]["sample_rows"] == 768 and fig["kmeans_pp"]["gram_ms"] > 0
    huge = fig["huge_pages"]
    assert huge["rows"] == 2 * 3000 and huge["madvise_s"] > 0 and huge["no_huge_pages_s"] > 0
    assert set(huge["thp"]) == {"enabled", "defrag"}
    from rsdist.cluster.engine import _glibc

    if _glibc() is not None:
        assert fig["heap"]["faults_per_update_inside"] < 50
