"""The k-means engine on real shard actors: quality against scikit-learn, both update rules,
re-seeding of empty clusters, determinism, k-means||. Spherical mode is covered in test_stage."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from rsdist.bench.kmeans import write_blob_features
from rsdist.cluster.engine import KMeansDriver, _glibc, auto_k, heap_reuse, kmeans_pp, share
from rsdist.cluster.shards import ShardActor, plan_units, split_units
from rsdist.core.tables import space_vectors, unit_rows
from rsdist.config import ClusterConfig, ConfigError
from rsdist.core.rundir import RunDir

K = 8
ROWS = 3000


def start(ray, run: RunDir, metric: str = "euclidean", space: str = "image", actors: int = 2, precision: str = "float32"):
    owners = split_units(plan_units(run), actors)
    remote = ray.remote(ShardActor).options(num_cpus=0.5)
    handles = [remote.remote(run.uri, own, space, metric, "auto", 1 << 20, 1, precision) for own in owners]
    sizes = [i["rows"] for i in ray.get([h.info.remote() for h in handles])]
    return handles, sizes


def all_vectors(run: RunDir, space: str = "image") -> np.ndarray:
    return space_vectors(run.read_table("features"), space, "test")


@pytest.fixture(scope="module")
def blobs(ray_session, tmp_path_factory):
    run = RunDir(str(tmp_path_factory.mktemp("blobs")))
    truth = write_blob_features(run, ROWS, 16, K, seed=3, spread=0.6, shard_rows=700)
    actors, sizes = start(ray_session, run)
    yield run, truth, actors, sizes
    for a in actors:
        ray_session.kill(a)


def labels_of(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


def inertia_of(x: np.ndarray, c: np.ndarray) -> float:
    return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


@pytest.mark.parametrize("mode", ["minibatch", "lloyd"])
def test_matches_sklearn_on_blobs(blobs, mode):
    run, truth, actors, sizes = blobs
    cfg = ClusterConfig(k=K, mode=mode, batch_size=256, max_iter=300 if mode == "minibatch" else 30, seed=1)
    fit = KMeansDriver(actors, sizes, K, cfg).fit()
    x = all_vectors(run)
    ours = labels_of(x, fit.centroids)
    ref = KMeans(n_clusters=K, n_init=3, random_state=0).fit(x)
    assert adjusted_rand_score(truth, ours) > 0.99
    assert adjusted_rand_score(ref.labels_, ours) > 0.99
    assert inertia_of(x, fit.centroids) <= 1.01 * ref.inertia_
    assert fit.iterations < cfg.max_iter  # stopped by its convergence rule, not the cap


@pytest.mark.parametrize("precision,overlap", [("bfloat16", True), ("float32", False)])
def test_minibatch_variants_match_sklearn(blobs, ray_session, precision, overlap):
    """bf16 products (actors and k-means++) with the overlapped loop, and the plain synchronous loop."""
    run, truth, _, _ = blobs
    actors, sizes = start(ray_session, run, precision=precision)
    cfg = ClusterConfig(k=K, batch_size=256, max_iter=300, seed=1, precision=precision, overlap=overlap)
    try:
        fit = KMeansDriver(actors, sizes, K, cfg).fit()
    finally:
        for a in actors:
            ray_session.kill(a)
    x = all_vectors(run)
    ref = KMeans(n_clusters=K, n_init=3, random_state=0).fit(x)
    assert adjusted_rand_score(truth, labels_of(x, fit.centroids)) > 0.99
    assert inertia_of(x, fit.centroids) <= 1.01 * ref.inertia_
    assert fit.iterations < cfg.max_iter


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_heap_reuse_serves_temporaries_without_page_faults():
    import resource

    def faults_of_temporaries() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            a = np.ones((1000, 512))  # 4 MB: above glibc's initial mmap and trim thresholds
            b = a * 2.0
            del a, b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with heap_reuse():
        faults_of_temporaries()  # the first round grows the heap once
        assert faults_of_temporaries() < 200  # 20 rounds of 8 MB freshly faulted would be ~40,000


def test_seeded_runs_are_identical_and_seeds_differ(blobs):
    run, truth, actors, sizes = blobs
    cfg = ClusterConfig(k=K, batch_size=128, max_iter=15, max_no_improvement=0, tol=0.0, seed=5)
    a = KMeansDriver(actors, sizes, K, cfg).fit()
    b = KMeansDriver(actors, sizes, K, cfg).fit()
    c = KMeansDriver(actors, sizes, K, ClusterConfig(**{**cfg.__dict__, "seed": 6})).fit()
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.history == b.history
    assert not np.array_equal(a.centroids, c.centroids)


@pytest.mark.parametrize("mode", ["minibatch", "lloyd"])
def test_empty_clusters_are_reseeded(blobs, mode):
    """Start with half the centroids far from every row: they never win a row until re-seeded."""
    run, truth, actors, sizes = blobs
    x = all_vectors(run)
    init = np.concatenate([x[np.flatnonzero(truth == 0)[:4]], np.full((K - 4, x.shape[1]), 50.0, np.float32)])
    cfg = ClusterConfig(k=K, mode=mode, batch_size=512, max_iter=200 if mode == "minibatch" else 40, seed=2)
    fit = KMeansDriver(actors, sizes, K, cfg).fit(init=init)
    assert fit.reseeded >= K - 4
    counts = np.bincount(labels_of(x, fit.centroids), minlength=K)
    assert (counts > 0).all()
    assert np.abs(fit.centroids).max() < 5  # nothing left out at the far point
    assert adjusted_rand_score(truth, labels_of(x, fit.centroids)) > 0.75  # recovered from an all-in-one-blob start


def test_kmeans_parallel_init(blobs):
    run, truth, actors, sizes = blobs
    cfg = ClusterConfig(k=K, init="k-means||", mode="lloyd", max_iter=20, seed=4)
    fit = KMeansDriver(actors, sizes, K, cfg).fit()
    assert fit.init == "k-means||"
    assert adjusted_rand_score(truth, labels_of(all_vectors(run), fit.centroids)) > 0.99


def test_kmeans_parallel_init_on_a_sample_of_the_pool(blobs, ray_session):
    run, truth, actors, sizes = blobs
    ray_session.get([a.kpar_begin.remote(s, [0, i, 0, 6]) for i, (a, s) in enumerate(zip(actors, share(600, sizes)))])
    counts = sum(ray_session.get([a.nearest_counts.remote(np.zeros((3, 16), dtype=np.float32)) for a in actors]))
    assert counts.sum() == 600  # the weights count the sample's rows, not the pool's
    cfg = ClusterConfig(k=K, init="k-means||", init_pool=600, mode="lloyd", max_iter=20, seed=4)
    fit = KMeansDriver(actors, sizes, K, cfg).fit()
    assert adjusted_rand_score(truth, labels_of(all_vectors(run), fit.centroids)) > 0.99
    with pytest.raises(ConfigError, match="cluster.init_pool: -1 must be >= 0"):
        ClusterConfig(init_pool=-1)


def test_bf16_kmeans_pp_seeds_every_blob_once():
    rng = np.random.default_rng(5)
    centers = unit_rows(rng.standard_normal((40, 32)).astype(np.float32))
    truth = rng.integers(0, 40, 4000)
    x = unit_rows(centers[truth] + rng.standard_normal((4000, 32)).astype(np.float32) * 0.02)
    for metric in ("euclidean", "cosine"):
        for gram_bytes in (0, 1 << 40):  # per-step products, and the Gram matrix computed once
            c = kmeans_pp(x, 40, np.random.default_rng(0), metric, bf16=True, gram_bytes=gram_bytes)
            assert sorted(labels_of(c, centers)) == list(range(40))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_pp_gram_matrix_picks_the_rows_per_step_products_pick(metric):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((900, 24)).astype(np.float32)
    x = unit_rows(x) if metric == "cosine" else x
    weights = rng.random(900) + 0.5
    per_step = kmeans_pp(x, 30, np.random.default_rng(1), metric, weights=weights, gram_bytes=0)
    gram = kmeans_pp(x, 30, np.random.default_rng(1), metric, weights=weights, gram_bytes=1 << 40)
    np.testing.assert_array_equal(per_step, gram)


def test_helpers():
    s = share(10, [5, 0, 15])
    assert s[1] == 0 and sum(s) == 10 and s[2] > s[0]
    assert sum(share(7, [1, 1, 1])) == 7 and share(7, [1, 1, 1]) == [3, 2, 2]
    assert auto_k(1) == 1 and auto_k(3) == 2 and auto_k(20000) == 100
    v = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(v[0], [0.6, 0.8])


def test_merge_sums_equals_dense_sums():
    import torch

    from rsdist.cluster.engine import merge_sums

    rng = np.random.default_rng(0)
    results, dense_s, dense_n = [], np.zeros((50, 6)), np.zeros(50)
    for _ in range(3):  # three actors, each with distinct centroids of its own, overlapping across actors
        idx = np.sort(rng.choice(50, size=20, replace=False))
        sums, counts = rng.standard_normal((20, 6)).astype(np.float32), rng.integers(1, 9, size=20)
        results.append({"idx": idx, "sums": sums, "counts": counts})
        dense_s[idx] += sums
        dense_n[idx] += counts
    acc = torch.full((50, 6), 7.0)  # stale contents are cleared
    touched, s, n = merge_sums(results, acc)
    np.testing.assert_array_equal(touched, np.flatnonzero(dense_n))
    np.testing.assert_allclose(s.numpy(), dense_s[touched], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(n, dense_n[touched])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_sculley_update_moves_each_touched_centroid_by_its_learning_rate(metric):
    rng = np.random.default_rng(1)
    k, d = 12, 5
    c = unit_rows(rng.standard_normal((k, d)).astype(np.float32))
    v = rng.integers(1, 20, k).astype(np.float64)
    idx = np.array([0, 3, 7])
    results = [{"idx": idx, "sums": rng.standard_normal((3, d)).astype(np.float32), "counts": np.array([2, 1, 4])}]
    expect, v_expect = c.astype(np.float64), v.copy()
    v_expect[idx] += results[0]["counts"]
    eta = (results[0]["counts"] / v_expect[idx])[:, None]
    expect[idx] += eta * (results[0]["sums"] / results[0]["counts"][:, None] - expect[idx])
    if metric == "cosine":
        expect[idx] = unit_rows(expect[idx])
    before = c.copy()
    driver = KMeansDriver([], [], k, ClusterConfig(k=k, metric=metric))
    movement = driver._update_sculley(c, v, results)
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c[[1, 2, 4]], before[[1, 2, 4]])  # untouched centroids stay
    np.testing.assert_array_equal(v, v_expect)
    assert movement == pytest.approx(np.linalg.norm(expect - before, axis=1).sum() / k, rel=1e-5)


def test_reseed_candidates_follow_the_starved_count():
    """The actors return as many re-seeding candidates as centroids are starved (none when none is),
    never more than half a batch."""
    driver = KMeansDriver([], [], 6, ClusterConfig(k=6, reassign_ratio=0.1))
    assert driver._reseed_candidates(np.array([50.0, 40, 60, 55, 45, 52]), 100) == 0
    assert driver._reseed_candidates(np.array([50.0, 0, 60, 3, 45, 52]), 100) == 2  # one empty, one below 0.1 x 60
    assert driver._reseed_candidates(np.zeros(6), 4) == 2  # all empty, capped at half the batch


def test_stage_actors_run_without_numpy_huge_pages(blobs, ray_session):
    from rsdist.cluster.shards import disable_numpy_huge_pages
    from rsdist.cluster.stage import actor_resources, start_actors

    run = blobs[0]
    cfg = ClusterConfig(k=K, space="image")
    (actor,) = start_actors(run, [plan_units(run)[:1]], cfg, actor_resources(cfg))
    try:  # the switch returns its previous state: already off in a shard actor
        assert ray_session.get(actor.__ray_call__.remote(lambda self: disable_numpy_huge_pages())) is False
    finally:
        ray_session.kill(actor)


@pytest.mark.parametrize("overlap", [True, False])
def test_shared_memory_exchange_gives_the_object_store_result(blobs, overlap):
    """The same-node exchange moves the same numbers: same seed, bit-identical centroids and
    history; its files are gone after the fit."""
    import glob

    from rsdist.cluster.exchange import SHM_DIR

    run, truth, actors, sizes = blobs
    before = set(glob.glob(f"{SHM_DIR}/rsdist-kmeans-*"))
    cfg = ClusterConfig(k=K, batch_size=256, max_iter=40, max_no_improvement=0, tol=0.0, seed=3, overlap=overlap)
    shared = KMeansDriver(actors, sizes, K, cfg).fit()
    store = KMeansDriver(actors, sizes, K, ClusterConfig(**{**cfg.__dict__, "shared_memory": False})).fit()
    assert shared.exchange == "shared-memory" and store.exchange == "object-store"
    np.testing.assert_array_equal(shared.centroids, store.centroids)
    assert shared.history == store.history and shared.reseeded == store.reseeded
    assert set(glob.glob(f"{SHM_DIR}/rsdist-kmeans-*")) == before


def test_shared_exchange_only_on_one_node_and_when_it_fits(tmp_path):
    from rsdist.cluster.exchange import buffer_bytes, open_shared_exchange

    assert open_shared_exchange(["a", "b"], "a", 10, 4, folder=str(tmp_path)) is None  # an actor on another node
    assert open_shared_exchange([], "a", 10, 4, folder=str(tmp_path)) is None
    assert open_shared_exchange(["a"], "a", 10, 4, folder=str(tmp_path / "missing")) is None
    assert open_shared_exchange(["a"], "a", 10**9, 4096, folder=str(tmp_path)) is None  # larger than a quarter of the free space
    ex = open_shared_exchange(["a", "a"], "a", 10, 4, folder=str(tmp_path))
    try:
        assert sum(os.path.getsize(p) for p in ex.paths) == buffer_bytes(10, 4, 2)
        ex.put_centroids(1, np.ones((10, 4), np.float32))
        assert ex.centroids[1].sum() == 40 and ex.centroids[0].sum() == 0
    finally:
        ex.close()
    assert list(tmp_path.iterdir()) == []


def test_exchange_the_actors_cannot_map_falls_back_to_the_object_store(blobs, monkeypatch, tmp_path):
    """Buffers the actors cannot open (as for a driver that does not share their /dev/shm): the
    fit warns and uses the object store, with the same result."""
    from rsdist.cluster import engine
    from rsdist.cluster.exchange import open_shared_exchange

    def unreachable(*args, **kwargs):
        ex = open_shared_exchange(*args, **kwargs, folder=str(tmp_path))
        ex.close()  # the files are gone before the actors map them
        return ex

    run, truth, actors, sizes = blobs
    cfg = ClusterConfig(k=K, batch_size=256, max_iter=20, max_no_improvement=0, tol=0.0, seed=4)
    store = KMeansDriver(actors, sizes, K, ClusterConfig(**{**cfg.__dict__, "shared_memory": False})).fit()
    monkeypatch.setattr(engine, "open_shared_exchange", unreachable)
    fallback = KMeansDriver(actors, sizes, K, cfg).fit()
    assert fallback.exchange == "object-store"
    np.testing.assert_array_equal(fallback.centroids, store.centroids)
