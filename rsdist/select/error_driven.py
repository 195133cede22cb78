"""Error-driven selection (METHODS.md section 4) without a teacher: the pool rows nearest to failures.

Input: the embeddings of the validation samples the model got wrong, in the same space as the
pool. The budget is apportioned over the failures (equally, or by an optional weight per failure,
largest remainder); then, round by round, each failure with quota left takes its nearest pool row
not taken yet, so the subset is deduplicated and no failure crowds out the others.

A teacher is an optional extension point: a function
`teacher(failure_embeddings, failure_ids) -> (query_embeddings, weights)` that rewrites the
failures into retrieval queries (e.g. embeddings of the skills a stronger model names as missing)
with a weight per query. Without one, each failure is its own query with weight 1.
`select.teacher` names one as 'rsdist.<module>:<function>': a function of the rsdist package
marked with `@teacher` (rsdist/select/teachers.py). Nothing outside the package is imported, so a
config file cannot make rsdist run code of its choosing; a new teacher is added to the package.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import numpy as np

from rsdist.select.budget import apportion
from rsdist.select.strategies import Selection

Teacher = Callable[[np.ndarray, list], tuple[np.ndarray, np.ndarray]]


TEACHER_FORM = "'rsdist.<module>:<function>', a function of the rsdist package marked with @teacher (docs/select.md)"


def teacher(fn: Teacher) -> Teacher:
    """Mark `fn` as a function `select.teacher` may name."""
    fn.rsdist_teacher = True
    return fn


def teacher_spec_error(spec: str) -> str | None:
    """Why `spec` is not of the form 'rsdist.<module>:<function>' (None when it is); nothing is imported."""
    module, colon, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    parts = module.split(".")
    if not colon or parts[0] != "rsdist" or len(parts) < 2 or not all(p.isidentifier() for p in parts) or not name.isidentifier():
        return f"select.teacher: {spec!r} must be {TEACHER_FORM}"
    return None


def load_teacher(spec: str) -> Teacher:
    """The teacher named 'rsdist.<module>:<function>'; only modules of the rsdist package are imported."""
    problem = teacher_spec_error(spec)
    if problem:
        raise ValueError(problem)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError:
        raise ValueError(f"select.teacher: {spec!r}: the rsdist package has no module {module}") from None
    if not callable(fn) or getattr(fn, "rsdist_teacher", False) is not True:
        raise ValueError(f"select.teacher: {spec!r} is not a teacher; it must be {TEACHER_FORM}")
    return fn


def _ranked(x: np.ndarray, q: np.ndarray, length: int) -> np.ndarray:
    """The `length` pool rows most similar to query q, best first (ties: lower row first)."""
    sims = x @ q
    if length < len(sims):
        part = np.argpartition(-sims, length - 1)[:length]
        # argpartition breaks ties arbitrarily at the boundary: widen to every row tied with the last.
        cut = sims[part].min()
        part = np.flatnonzero(sims >= cut)
    else:
        part = np.arange(len(sims))
    return part[np.lexsort((part, -sims[part]))][:length]


def nearest_to_failures(x: np.ndarray, queries: np.ndarray, quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin retrieval: (pool row of each pick, query that picked it), in pick order.

    `x` and `queries` are unit rows; a query's candidate list is widened when others took its rows.
    """
    n = len(x)
    taken = np.zeros(n, dtype=bool)
    lists = [_ranked(x, q, min(n, 4 * int(c) + 32)) for q, c in zip(queries, quotas)]
    pos = np.zeros(len(queries), dtype=np.int64)
    left = quotas.astype(np.int64).copy()
    rows, by = [], []
    while left.sum() > 0:
        for f in np.flatnonzero(left > 0):
            cand = lists[f]
            while pos[f] < len(cand) and taken[cand[pos[f]]]:
                pos[f] += 1
            if pos[f] == len(cand):
                if len(cand) == n:  # pool exhausted (cannot happen when the budget <= pool)
                    left[f] = 0
                    continue
                lists[f] = cand = _ranked(x, queries[f], n)
                continue
            r = int(cand[pos[f]])
            taken[r] = True
            rows.append(r)
            by.append(int(f))
            left[f] -= 1
    return np.asarray(rows, dtype=np.int64), np.asarray(by, dtype=np.int64)


def error_driven_select(
    x: np.ndarray,
    groups: np.ndarray,
    k: int,
    failures: np.ndarray,
    budget: int,
    failure_ids: Optional[list] = None,
    weights: Optional[np.ndarray] = None,
    teacher: Optional[Teacher] = None,
) -> Selection:
    """Spend `budget` on the pool rows nearest to the failures; the score is the best cosine."""
    failure_ids = list(failure_ids) if failure_ids is not None else [f"failure {i}" for i in range(len(failures))]
    queries = np.asarray(failures, dtype=np.float32)
    if teacher is not None:
        queries, weights = teacher(queries, failure_ids)
        queries = np.asarray(queries, dtype=np.float32)
        failure_ids = [f"query {i}" for i in range(len(queries))]
    if len(queries) == 0:
        raise ValueError("error-driven selection needs at least one failure")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    queries = queries / np.where(norms > 0, norms, 1.0)
    w = np.ones(len(queries)) if weights is None else np.asarray(weights, dtype=np.float64)
    quotas_f = apportion(w, budget, np.full(len(queries), len(x)))
    rows, by = nearest_to_failures(x, queries, quotas_f)

    best = np.full(len(x), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), 256):
        best = np.maximum(best, (x @ queries[start:start + 256].T).max(axis=1))
    selected = np.zeros(len(x), dtype=bool)
    selected[rows] = True
    reason = np.full(len(x), "dropped: not among the nearest rows of any failure", dtype=object)
    for r, f in zip(rows, by):
        reason[r] = f"kept: near {failure_ids[f]} (cosine {float(x[r] @ queries[f]):.4f})"
    quotas = np.bincount(groups[selected], minlength=k)
    info = {"failures": len(queries), "per_failure_quota_max": int(quotas_f.max())}
    return Selection(selected, best, reason, quotas, info)
