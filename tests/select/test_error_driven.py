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
    teacher = load_teacher("rsdist.select.teachers:each_failure")
    emb = np.eye(3, dtype=np.float32)
    queries, weights = teacher(emb, ["a", "b", "c"])
    assert np.array_equal(queries, emb) and weights.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("spec", ["numpy:mean", "os:system", "builtins:exec", "rsdist_evil:run", "rsdist:main",
                                  "rsdist.select.error_driven:nearest_to_failures", "rsdist.cli:main", "rsdist.nosuch:f"])
def test_only_marked_teachers_of_the_rsdist_package_load(spec):
    with pytest.raises(ValueError, match=r"^select\.teacher: ") as e:
        load_teacher(spec)
    assert "\n" not in str(e.value) and "rsdist.<module>:<function>" in str(e.value) or "has no module" in str(e.value)


def test_a_teacher_outside_the_package_is_never_imported(tmp_path, monkeypatch):
    """A module on the path whose import would leave a marker file: naming it is refused before any import."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_teacher.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef teach(e, i):\n    return e, None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from rsdist.config import ConfigError, SelectConfig

    with pytest.raises(ValueError, match="select.teacher"):
        load_teacher("planted_teacher:teach")
    with pytest.raises(ConfigError, match="select.teacher"):
        SelectConfig(method="error-driven", teacher="planted_teacher:teach")
    assert not marker.exists()
