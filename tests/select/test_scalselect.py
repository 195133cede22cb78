"""Streamed leverage equals a dense SVD's; a leverage outlier is kept."""

import numpy as np

from rsdist.select.scalselect import GramAccumulator, dominant_subspace, leverage_scores, scalselect_select


def dense_leverage(x, energy):
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(cum, energy - 1e-12) + 1)
    return (u[:, :k] ** 2).sum(axis=1), k


def streamed(x, energy, batch):
    acc = GramAccumulator(x.shape[1])
    for i in range(0, len(x), batch):
        acc.add(x[i:i + batch])
    sub = dominant_subspace(acc, energy)
    return np.concatenate([leverage_scores(x[i:i + batch], sub) for i in range(0, len(x), batch)]), sub


def test_streamed_leverage_equals_dense_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 5.0  # a large common offset
    for energy in (0.5, 0.9, 1.0):
        want, k = dense_leverage(x, energy)
        got, sub = streamed(x, energy, batch=37)
        assert sub.k == k
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_merged_accumulators_equal_one_pass():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 6)) + 3.0
    one = GramAccumulator(6)
    one.add(x)
    a, b = GramAccumulator(6), GramAccumulator(6)
    a.add(x[:30])
    b.add(x[30:] * 1.0)
    a.merge(b)
    np.testing.assert_allclose(a.centred_gram(), one.centred_gram(), atol=1e-8)
    np.testing.assert_allclose(a.mean(), one.mean(), atol=1e-12)


def test_rank_deficient_data_uses_only_real_directions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 10))  # rank 3 in 10 dims
    got, sub = streamed(x, 1.0, batch=16)
    assert sub.k == 3
    np.testing.assert_allclose(got.sum(), 3.0, rtol=1e-6)  # leverages of a rank-k projection sum to k


def test_leverage_outlier_is_kept():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4)) * np.array([1.0, 1.0, 1.0, 0.01])
    x[17, 3] = 3.0  # alone along a direction the others barely use
    scores, sub = streamed(x, 0.99, batch=64)
    groups = np.zeros(200, dtype=np.int64)
    sel = scalselect_select(1, groups, scores, 5, sub)
    assert sel.selected[17] and sel.count == 5
    assert int(np.argmax(scores)) == 17


def test_within_clusters_keeps_each_clusters_highest_leverage():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 4)) * np.array([3.0, 1.0, 1.0, 1.0])
    groups = np.repeat([0, 1, 2], 40)
    x[groups == 2] *= 0.1  # a tight cluster: the global top-B leaves it out
    scores, sub = streamed(x, 0.99, batch=32)
    assert scalselect_select(3, groups, scores, 30, sub).selected[groups == 2].sum() == 0
    quotas = np.array([10, 10, 10])
    sel = scalselect_select(3, groups, scores, 30, sub, quotas)
    assert np.bincount(groups[sel.selected], minlength=3).tolist() == [10, 10, 10]
    for g in range(3):
        rows = np.flatnonzero(groups == g)
        assert set(rows[np.argsort(-scores[rows])[:10]]) == set(np.flatnonzero(sel.selected & (groups == g)))
    assert sel.quotas.tolist() == [10, 10, 10] and "in cluster" in sel.reason[np.flatnonzero(sel.selected)[0]]
