"""random, cluster-random and shift on constructed pools where the right answer is known."""

import numpy as np

from rsdist.select.strategies import cluster_quotas, cluster_random_select, group_index, random_select, shift_select


def test_group_index_maps_arbitrary_labels():
    labels, groups = group_index(np.array([7, 3, 7, 9]))
    assert labels.tolist() == [3, 7, 9] and groups.tolist() == [1, 0, 1, 2]


def test_random_is_exact_and_seeded():
    groups = np.repeat(np.arange(3), 10)
    a = random_select(30, 3, groups, 7, seed=1)
    b = random_select(30, 3, groups, 7, seed=1)
    c = random_select(30, 3, groups, 7, seed=2)
    assert a.count == 7 and a.quotas.sum() == 7
    assert np.array_equal(a.selected, b.selected) and not np.array_equal(a.selected, c.selected)


def test_cluster_random_equal_quota_samples_the_dense_cluster_less():
    groups = np.array([0] * 90 + [1] * 5 + [2] * 5)
    sel = cluster_random_select(3, groups, 15, "equal", seed=0)
    assert sel.quotas.tolist() == [5, 5, 5]
    assert np.bincount(groups[sel.selected]).tolist() == [5, 5, 5]
    prop = cluster_random_select(3, groups, 10, "proportional", seed=0)
    assert np.bincount(groups[prop.selected], minlength=3).tolist() == [9, 1, 0]
    assert prop.quotas.tolist() == [9, 1, 0]  # 9, 0.5, 0.5: the tie goes to the lower index


def test_shift_keeps_the_highest_per_cluster_in_proportion():
    groups = np.array([0, 0, 0, 0, 1, 1])
    shift = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    sel = shift_select(2, groups, shift, 3, "proportional", "highest")
    assert sel.quotas.tolist() == [2, 1]
    assert np.flatnonzero(sel.selected).tolist() == [1, 2, 5]
    assert sel.reason[1].startswith("kept: highest shift") and sel.reason[0].startswith("dropped:")
    low = shift_select(2, groups, shift, 3, "proportional", "lowest")
    assert np.flatnonzero(low.selected).tolist() == [0, 3, 4]


def test_shift_takes_missing_values_last_and_handles_budget_over_a_cluster():
    groups = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    shift = np.array([np.nan, 0.2, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    sel = shift_select(2, groups, shift, 7, "equal", "highest")
    assert sel.count == 7 and sel.quotas.tolist() == [2, 5]
    assert not sel.selected[7]
    sel = shift_select(2, groups, shift, 1, "equal", "highest")
    assert sel.count == 1


def test_cluster_quotas_sum_exactly():
    groups = np.array([0] * 7 + [1] * 5 + [2] * 1)
    for rule in ("proportional", "equal"):
        for b in range(0, 14):
            assert cluster_quotas(groups, 3, b, rule).sum() == b
