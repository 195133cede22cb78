"""COINCIDE: exact sequential quotas, a dense cluster under-sampled, greedy MMD, Ray == local."""

import itertools

import numpy as np
import pytest

from rsdist.select.budget import apportion
from rsdist.select.coincide import (
    blocked_greedy_mmd,
    cluster_probabilities,
    coincide_select,
    density,
    greedy_mmd,
    mmd_among_top,
    sequential_quotas,
    transferability,
)


def unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def two_clusters(seed=0):
    """Cluster 0: 60 near-identical rows (dense). Cluster 1: 20 spread-out rows. Centres alike (S > 0)."""
    rng = np.random.default_rng(seed)
    common = 2.0 * np.eye(16)[0]
    dense = common + np.eye(16)[1] + 0.05 * rng.normal(size=(60, 16))
    spread = common + np.eye(16)[2] + 0.5 * rng.normal(size=(20, 16))
    x = unit(np.vstack([dense, spread]))
    return x, np.array([0] * 60 + [1] * 20)


def test_sequential_quotas_are_exact_and_capped():
    p = np.array([0.7, 0.2, 0.1])
    sizes = np.array([3, 50, 50])
    for budget in range(0, 104):
        q, order = sequential_quotas(p, sizes, budget)
        assert q.sum() == budget and np.all(q <= sizes)
    q, order = sequential_quotas(p, sizes, 10)
    assert order.tolist() == [0, 1, 2] and q[0] == 3  # the top cluster is taken whole


def test_transferability_ignores_near_identical_pairs():
    c = unit(np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]))
    s = transferability(c, 0.9)
    assert abs(s[0] - c[0] @ c[2]) < 1e-12  # the pair (0, 1) is left out


def test_dense_cluster_is_under_sampled():
    x, groups = two_clusters()
    d0, d1 = density(x[:60], 512, 0), density(x[60:], 512, 0)
    assert d0 > d1
    sel = coincide_select(x, groups, 2, 20, tau=0.1)
    taken = np.bincount(groups[sel.selected], minlength=2)
    assert sel.count == 20
    assert taken[0] / 60 < taken[1] / 20  # denser cluster gets the smaller share of its rows


@pytest.mark.parametrize("width", [1.0, 0.5, 0.3])
def test_greedy_mmd_matches_brute_force_first_steps(width):
    rng = np.random.default_rng(5)
    x = unit(rng.normal(size=(9, 4)))
    kern = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * width**2))

    def mmd(idx):
        idx = list(idx)
        return kern[np.ix_(idx, idx)].mean() - 2 * kern[idx].mean()

    picks = greedy_mmd(x, 3, width=width)
    chosen = []
    for _ in range(3):
        best = min((j for j in range(9) if j not in chosen), key=lambda j: mmd(chosen + [j]))
        chosen.append(best)
    assert picks.tolist() == chosen
    # greedy is close to the best 3-subset
    best3 = min(mmd(c) for c in itertools.combinations(range(9), 3))
    assert mmd(picks) <= best3 + 0.05


def test_probabilities_sum_to_one():
    p = cluster_probabilities(np.array([0.1, 0.5, 0.3]), np.array([0.5, 0.9, 0.2]), 0.1)
    assert abs(p.sum() - 1) < 1e-12 and np.all(p > 0)


@pytest.mark.parametrize("block_rows", [0, 16])
def test_ray_tasks_give_the_same_selection_as_local(ray_session, block_rows):
    """Also with greedy MMD in blocks (16 rows: the 60-row cluster is split), which ships width,
    block size and seed to the tasks."""
    x, groups = two_clusters(1)
    local = coincide_select(x, groups, 2, 25, use_ray=False, parts=2, mmd_width=0.5, mmd_block_rows=block_rows, seed=4)
    remote = coincide_select(x, groups, 2, 25, use_ray=True, parts=2, mmd_width=0.5, mmd_block_rows=block_rows, seed=4)
    assert np.array_equal(local.selected, remote.selected)
    assert list(local.reason) == list(remote.reason)


def test_given_quotas_replace_the_cluster_probabilities():
    x, groups = two_clusters()
    sel = coincide_select(x, groups, 2, 20, tau=0.1, quotas=np.array([15, 5]))
    assert np.bincount(groups[sel.selected], minlength=2).tolist() == [15, 5]
    assert sel.info["quotas_from"] == "select.quota"
    inside = greedy_mmd(x[60:], 5)  # the picks inside a cluster are still COINCIDE's greedy MMD
    assert set(np.flatnonzero(sel.selected[60:])) == set(inside.tolist())


def test_greedy_mmd_picks_only_allowed_rows():
    rng = np.random.default_rng(6)
    x = unit(rng.normal(size=(12, 4)))
    allowed = np.arange(12) % 2 == 0
    picks = greedy_mmd(x, 4, allowed)
    assert len(set(picks.tolist())) == 4 and allowed[picks].all()
    with pytest.raises(ValueError, match="greedy_mmd: 6 allowed rows, fewer than the 7 to pick"):
        greedy_mmd(x, 7, allowed)


def block_shares(n, rows):
    """How blocked_greedy_mmd splits `n` over blocks of `rows` candidate rows."""
    rows = np.array(rows)
    return apportion(rows, n, rows)


def test_block_shares_are_proportional_exact_and_capped():
    assert block_shares(10, [50, 30, 20]).tolist() == [5, 3, 2]
    assert block_shares(7, [3, 3, 3]).tolist() == [3, 2, 2]  # remainder ties to the first
    assert block_shares(9, [3, 3, 3]).tolist() == [3, 3, 3]
    parts = block_shares(13, [1, 40, 2, 17])
    assert parts.sum() == 13 and (parts <= [1, 40, 2, 17]).all()


def test_blocked_greedy_mmd_is_greedy_mmd_when_the_cluster_fits_a_block():
    x = unit(np.random.default_rng(7).normal(size=(30, 6)))
    for block_rows in (0, 30, 100):
        assert blocked_greedy_mmd(x, 8, block_rows=block_rows, seed=3).tolist() == greedy_mmd(x, 8).tolist()


def test_blocked_greedy_mmd_picks_each_block_by_greedy_mmd():
    x = unit(np.random.default_rng(8).normal(size=(101, 6)))
    allowed = np.arange(101) % 3 != 0
    picks = blocked_greedy_mmd(x, 20, allowed, width=0.5, block_rows=25, seed=4)
    assert len(picks) == 20 and len(set(picks.tolist())) == 20 and allowed[picks].all()
    assert picks.tolist() == blocked_greedy_mmd(x, 20, allowed, width=0.5, block_rows=25, seed=4).tolist()
    blocks = np.array_split(np.random.default_rng(4).permutation(101), 5)  # ceil(101 / 25) blocks
    shares = block_shares(20, [allowed[b].sum() for b in blocks])
    for b, q in zip(blocks, shares):
        inside = [p for p in picks.tolist() if p in set(b.tolist())]
        assert sorted(inside) == sorted(b[greedy_mmd(x[b], int(q), allowed[b], 0.5)].tolist())
    with pytest.raises(ValueError, match="greedy_mmd: 67 allowed rows, fewer than the 70 to pick"):
        blocked_greedy_mmd(x, 70, allowed, block_rows=25)


def test_coincide_passes_width_and_blocks_to_its_greedy_mmd():
    x, groups = two_clusters()
    sel = coincide_select(x, groups, 2, 20, quotas=np.array([15, 5]), mmd_width=0.4, mmd_block_rows=16, seed=2)
    assert set(np.flatnonzero(sel.selected[:60])) == set(blocked_greedy_mmd(x[:60], 15, width=0.4, block_rows=16, seed=2).tolist())
    assert set(np.flatnonzero(sel.selected[60:])) == set(blocked_greedy_mmd(x[60:], 5, width=0.4, block_rows=16, seed=2).tolist())
    assert sel.info["mmd_width"] == 0.4 and sel.info["mmd_block_rows"] == 16


def test_mmd_among_top_picks_representative_rows_among_the_top_scores():
    rng = np.random.default_rng(0)
    # One cluster, two visual modes of 10 rows each; the typical captions are rows 0-5 and 10-15.
    x = np.vstack([rng.normal(0, 0.05, (10, 4)) + [1, 0, 0, 0], rng.normal(0, 0.05, (10, 4)) + [0, 1, 0, 0]])
    typicality = np.where(np.isin(np.arange(20), [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]), 1.0, 0.0) + 0.01 * np.arange(20)
    groups = np.zeros(20, dtype=np.int64)
    sel = mmd_among_top(x, groups, 1, typicality, 4, "proportional", candidates=3.0)
    kept = np.flatnonzero(sel.selected)
    assert len(kept) == 4 and set(kept) <= {0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15}
    assert (kept < 10).sum() == 2  # both modes represented, not the 4 most typical (all in mode 2)
    assert sel.reason[kept[0]].startswith("kept: greedy MMD pick")
    assert "score" in sel.reason[kept[0]]
    only_top = mmd_among_top(x, groups, 1, typicality, 4, "proportional", candidates=1.0)
    assert set(np.flatnonzero(only_top.selected)) == set(np.argsort(-typicality)[:4])  # candidates = quota: the top 4


def test_mmd_among_top_passes_width_and_blocks_to_its_greedy_mmd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    typicality = rng.normal(size=40)
    groups = np.zeros(40, dtype=np.int64)
    sel = mmd_among_top(x, groups, 1, typicality, 8, "proportional", 2.0, mmd_width=0.5, mmd_block_rows=15, seed=9)
    allowed = np.isin(np.arange(40), np.argsort(-typicality, kind="stable")[:16])
    assert set(np.flatnonzero(sel.selected)) == set(blocked_greedy_mmd(x, 8, allowed, 0.5, 15, 9).tolist())
    assert sel.info["mmd_width"] == 0.5 and sel.info["mmd_block_rows"] == 15


def test_greedy_mmd_in_place_over_candidate_rows_picks_what_the_whole_kernel_picks():
    """The candidates-only, in-place greedy MMD picks the rows of the plain formula over the
    whole m x m kernel, in the same order (ties included)."""
    from rsdist.select.coincide import _sq_dists, kernel_rows

    def plain(x, n, allowed, width):
        m = len(x)
        kern = np.exp(-_sq_dists(x, x) / (2.0 * width * width))
        kc, kdiag, ks, ss, sc = kern.sum(axis=1), np.diag(kern).copy(), np.zeros(m), 0.0, 0.0
        free = allowed.copy()
        picks = []
        for t in range(n):
            obj = (ss + 2.0 * ks + kdiag) / (t + 1) ** 2 - 2.0 * (sc + kc) / ((t + 1) * m)
            obj[~free] = np.inf
            j = int(np.argmin(obj))
            picks.append(j)
            free[j] = False
            ss += 2.0 * ks[j] + kdiag[j]
            sc += kc[j]
            ks += kern[:, j]
        return np.array(picks)

    rng = np.random.default_rng(3)
    for m, d, width in ((40, 3, 1.0), (300, 16, 0.7), (257, 64, 2.0)):
        x = rng.normal(size=(m, d))
        x[5] = x[7]  # a tie
        allowed = rng.random(m) < 0.6
        n = int(allowed.sum()) // 2
        assert np.array_equal(greedy_mmd(x, n, allowed, width), plain(x, n, allowed, width))
        assert np.array_equal(greedy_mmd(x, n, None, width), plain(x, n, np.ones(m, dtype=bool), width))
        rows = np.flatnonzero(allowed)
        assert np.array_equal(kernel_rows(x, rows, width), np.exp(-_sq_dists(x, x) / (2.0 * width * width))[rows])
