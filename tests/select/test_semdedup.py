"""Near-duplicates are found inside clusters, one of each group stays, the filter composes."""

import numpy as np

from rsdist.select.semdedup import cluster_redundancy, redundancy, semdedup_select, with_dedup_filter
from rsdist.select.strategies import random_select, shift_select


def unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def pool_with_duplicates(seed=0):
    """Two clusters of 10 distinct rows; rows 10-12 copy row 0 (with tiny noise), row 19 copies row 15."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 32))
    x[10:13] = x[0] + 1e-3 * rng.normal(size=(3, 32))
    x[19] = x[15]
    groups = np.array([0] * 13 + [1] * 7)
    x[:13] += 4.0 * np.eye(32)[0]
    x[13:] += 4.0 * np.eye(32)[1]
    return unit(x), groups


def test_duplicates_are_flagged_and_one_of_each_group_stays():
    x, groups = pool_with_duplicates()
    red = redundancy(x, groups, "first")
    dups = np.flatnonzero(red.max_cos > 0.99)
    assert dups.tolist() == [10, 11, 12, 19]
    assert red.duplicate_of[10] == 0 and red.duplicate_of[19] == 15
    for rule in ("farthest", "nearest"):
        red = redundancy(x, groups, rule)
        flagged = set(np.flatnonzero(red.max_cos > 0.99))
        assert len(flagged & {0, 10, 11, 12}) == 3 and len(flagged & {15, 19}) == 1 and len(flagged) == 4


def test_duplicates_in_different_clusters_are_not_compared():
    x, groups = pool_with_duplicates()
    groups = groups.copy()
    groups[10] = 1  # the copy of row 0 now sits in the other cluster
    red = redundancy(x, groups, "first")
    assert red.max_cos[10] < 0.99


def test_blocked_redundancy_matches_one_block():
    rng = np.random.default_rng(4)
    x = unit(rng.normal(size=(50, 8)))
    a = cluster_redundancy(x, "farthest", block=7)
    b = cluster_redundancy(x, "farthest", block=1024)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert np.array_equal(a[1], b[1])


def test_semdedup_strategy_drops_duplicates_first():
    x, groups = pool_with_duplicates()
    red = redundancy(x, groups, "first")
    sel = semdedup_select(2, groups, red, 16)
    assert sel.count == 16 and not sel.selected[[10, 11, 12, 19]].any()
    assert "near-duplicate" in sel.reason[10]


def test_filter_composes_with_a_strategy_and_keeps_the_count_exact():
    x, groups = pool_with_duplicates()
    red = redundancy(x, groups, "first")
    shift = np.linspace(0, 1, 20)  # the duplicates have the highest shifts of cluster 0

    def strategy(rows, b):
        return shift_select(2, groups[rows], shift[rows], b, "proportional", "highest")

    sel = with_dedup_filter(2, groups, red, 0.99, 6, strategy)
    assert sel.count == 6 and not sel.selected[[10, 11, 12, 19]].any()
    assert sel.info["near_duplicates"] == 4
    # a budget above what survives the filter lets the least redundant duplicates back in
    full = with_dedup_filter(2, groups, red, 0.99, 18, lambda rows, b: random_select(len(rows), 2, groups[rows], b, 0))
    assert full.count == 18 and full.info["readmitted"] == 2
