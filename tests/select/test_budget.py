"""Budget arithmetic: exact counts, the rounding rule, caps and redistribution."""

import numpy as np
import pytest

from rsdist.select.budget import apportion, budget_count, rank_within_groups, top_global, top_per_group


@pytest.mark.parametrize(
    "budget, pool, expected",
    [(1 / 3, 9, 3), (1 / 3, 10, 3), (0.25, 10, 3), (0.05, 10, 1), (0.001, 10, 1), (1.0, 7, 7), (5, 10, 5), (50, 10, 10), (0.5, 0, 0)],
)
def test_budget_count_rounds_half_up_and_caps(budget, pool, expected):
    assert budget_count(budget, pool) == expected


def test_budget_count_rejects_fractional_counts():
    with pytest.raises(ValueError, match="whole count"):
        budget_count(2.5, 10)


def test_apportion_is_exact_and_uses_largest_remainders():
    # ideal shares 3.5, 2.1, 1.4 of 7 -> floors 3, 2, 1 and the free seat goes to the 0.5 remainder
    q = apportion(np.array([5.0, 3.0, 2.0]), 7, np.array([5, 3, 2]))
    assert q.tolist() == [4, 2, 1]
    assert q.sum() == 7


def test_apportion_caps_a_small_cluster_and_redistributes():
    # equal weights, 12 seats over sizes 2, 10, 10: the small cluster is filled, the rest split 5/5
    q = apportion(np.ones(3), 12, np.array([2, 10, 10]))
    assert q.tolist() == [2, 5, 5]


def test_apportion_budget_larger_than_most_clusters():
    caps = np.array([1, 1, 1, 50])
    q = apportion(np.ones(4), 40, caps)
    assert q.tolist() == [1, 1, 1, 37]
    assert apportion(np.ones(4), 53, caps).tolist() == caps.tolist()


def test_apportion_exact_over_many_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        caps = rng.integers(0, 30, size=rng.integers(1, 12))
        total = int(rng.integers(0, caps.sum() + 1))
        w = rng.random(len(caps)) * (rng.random(len(caps)) > 0.2)
        q = apportion(w, total, caps)
        assert q.sum() == total and np.all(q <= caps) and np.all(q >= 0)


def test_apportion_refuses_a_budget_above_the_pool():
    with pytest.raises(ValueError, match="cannot apportion"):
        apportion(np.ones(2), 5, np.array([2, 2]))


def test_ranks_and_top_picks_break_ties_by_row_order():
    groups = np.array([0, 1, 0, 0, 1])
    key = np.array([1.0, 2.0, 1.0, 3.0, np.nan])
    assert rank_within_groups(groups, np.array([1.0, 2.0, 1.0, 3.0, -1.0])).tolist() == [1, 0, 2, 0, 1]
    sel, _ = top_per_group(groups, key, np.array([2, 1]))
    assert sel.tolist() == [True, True, False, True, False]
    assert top_global(np.array([0.5, 0.9, 0.5, 0.1]), 2).tolist() == [True, True, False, False]
