"""Error-driven: the nearest pool rows to each failure, per-failure quotas, no row twice."""

import numpy as np
import pytest

from rsdist.select.error_driven import error_driven_select, load_teacher, nearest_to_failures


def unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_nearest_rows_to_each_failure_are_retrieved():
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(100, 16)))
    f = unit(np.vstack([x[3] + 0.01, x[40] + 0.01]))
    groups = np.zeros(100, dtype=np.int64)
    sel = error_driven_select(x, groups, 1, f, 6, ["bad-a", "bad-b"])
    assert sel.count == 6 and sel.selected[3] and sel.selected[40]
    for j, q in enumerate(f):
        want = np.argsort(-(x @ q), kind="stable")[:3]
        assert sel.selected[want].all()
    assert "bad-a" in sel.reason[3] and "bad-b" in sel.reason[40]


def test_shared_neighbours_are_taken_once_and_quotas_hold():
    x = unit(np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.0]]))
    q = unit(np.array([[1.0, 0.0], [1.0, 0.01]]))  # two failures with the same neighbours
    rows, by = nearest_to_failures(x, q, np.array([2, 2]))
    assert len(set(rows.tolist())) == 4
    assert np.bincount(by).tolist() == [2, 2]
    assert rows[:3].tolist() == [0, 1, 2]  # round robin: failure 0, failure 1, failure 0


def test_weights_and_a_teacher_hook_steer_the_quota():
    rng = np.random.default_rng(1)
    x = unit(rng.normal(size=(60, 8)))
    f = x[[5, 6]]
    groups = np.arange(60) % 3
    sel = error_driven_select(x, groups, 3, f, 10, weights=np.array([4.0, 1.0]))
    assert sel.count == 10 and sel.info["per_failure_quota_max"] == 8

    def teacher(emb, ids):
        return emb[:1], np.ones(1)  # keep only the first failure

    sel = error_driven_select(x, groups, 3, f, 5, teacher=teacher)
    assert sel.selected[5] and sel.info["failures"] == 1


def test_load_teacher_names_the_problem():
    with pytest.raises(ValueError, match="select.teacher"):
        load_teacher("no_colon")
    assert callable(load_teacher("numpy:mean"))
