"""SemDeDup: near-duplicates inside clusters, as a strategy and as a filter for any strategy.

Inside each cluster the rows are put in keep order (`farthest` from the centroid first, as
SemDeDup keeps the hard examples; or `nearest` first; or `first` = row order). A row's
redundancy is its highest cosine similarity to any row before it in that order; a row whose
redundancy exceeds the threshold is a near-duplicate of that earlier row. So from a group of
duplicates the one that comes first in keep order stays. As a strategy, `semdedup` keeps the
budget's least redundant rows: SemDeDup with its threshold chosen to hit the budget exactly.

Cost per cluster of m rows: O(m^2 d) time, O(m * block) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import logging

import numpy as np

from rsdist.select.budget import top_global
from rsdist.select.strategies import Selection, members_of

log = logging.getLogger("rsdist")

DEDUP_KEEP_RULES = ("farthest", "nearest", "first")


@dataclass
class Redundancy:
    """Per row: the highest cosine to an earlier row of its cluster (-1 if none) and that row."""

    max_cos: np.ndarray  # float32 (N,)
    duplicate_of: np.ndarray  # int64 (N,), -1 when the row is first in its cluster


def keep_order(x: np.ndarray, rule: str) -> np.ndarray:
    """Row positions of one cluster in the order its rows get to stay."""
    m = len(x)
    if rule == "first":
        return np.arange(m)
    centroid = x.mean(axis=0)
    norm = np.linalg.norm(centroid)
    cos = x @ (centroid / norm) if norm > 0 else np.zeros(m)
    if rule == "farthest":
        return np.lexsort((np.arange(m), cos))
    if rule == "nearest":
        return np.lexsort((np.arange(m), -cos))
    raise ValueError(f"keep rule {rule!r} is not one of: {', '.join(DEDUP_KEEP_RULES)}")


def cluster_redundancy(x: np.ndarray, rule: str, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(max cosine to an earlier row in keep order, position of that row) for one cluster.

    `x` must hold unit rows.
    """
    m = len(x)
    order = keep_order(x, rule)
    xo = x[order]
    best = np.full(m, -1.0, dtype=np.float32)
    arg = np.full(m, -1, dtype=np.int64)
    for start in range(1, m, block):
        stop = min(m, start + block)
        sims = xo[:stop] @ xo[start:stop].T  # (stop, b): earlier rows x this block
        cols = np.arange(start, stop)
        sims[np.arange(stop)[:, None] >= cols[None, :]] = -np.inf  # only rows earlier in keep order
        j = np.argmax(sims, axis=0)
        best[start:stop] = sims[j, np.arange(stop - start)]
        arg[start:stop] = j
    max_cos = np.empty(m, dtype=np.float32)
    dup = np.full(m, -1, dtype=np.int64)
    max_cos[order] = best
    has = arg >= 0
    dup[order[has]] = order[arg[has]]
    return max_cos, dup


def redundancy(x: np.ndarray, groups: np.ndarray, rule: str) -> Redundancy:
    """Redundancy of every row within its cluster; `x` holds unit rows."""
    n = len(groups)
    max_cos = np.full(n, -1.0, dtype=np.float32)
    dup = np.full(n, -1, dtype=np.int64)
    for rows in members_of(groups, int(groups.max()) + 1 if n else 0):
        if len(rows) == 0:
            continue
        mc, d = cluster_redundancy(x[rows], rule)
        max_cos[rows] = mc
        dup[rows[d >= 0]] = rows[d[d >= 0]]
    log.info("semdedup: redundancy of %d rows over %d clusters (keep %s)", n, len(np.unique(groups)), rule)
    return Redundancy(max_cos, dup)


def _name(i: int, ids: np.ndarray | None) -> str:
    return str(ids[i]) if ids is not None else f"row {i}"


def semdedup_select(k: int, groups: np.ndarray, red: Redundancy, budget: int, ids: np.ndarray | None = None) -> Selection:
    """Keep the `budget` least redundant rows; the score is 1 - redundancy."""
    score = (1.0 - red.max_cos).astype(np.float32)
    selected = top_global(score, budget)
    cut = float(red.max_cos[selected].max()) if selected.any() else -1.0
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        c = red.max_cos[i]
        reason[i] = (f"kept: max cosine {c:.4f} to an earlier row of its cluster" if selected[i]
                     else f"dropped: near-duplicate (cosine {c:.4f}) of {_name(red.duplicate_of[i], ids)}")
    quotas = np.bincount(groups[selected], minlength=k)
    return Selection(selected, score, reason, quotas, {"cosine_cut": round(cut, 6)})


def with_dedup_filter(
    k: int,
    groups: np.ndarray,
    red: Redundancy,
    threshold: float,
    budget: int,
    strategy: Callable[[np.ndarray, int], Selection],
    ids: np.ndarray | None = None,
) -> Selection:
    """Run `strategy` on the rows that are not near-duplicates (cosine <= threshold) only.

    `strategy(rows, budget)` gets the eligible row positions and the budget and returns a
    Selection over those rows. When fewer rows than the budget survive the filter, the least
    redundant duplicates are let back in so that the count stays exact.
    """
    n = len(groups)
    dup = red.max_cos > threshold
    rows = np.flatnonzero(~dup)
    inner = strategy(rows, min(budget, len(rows)))
    selected = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32)
    reason = np.empty(n, dtype=object)
    selected[rows] = inner.selected
    score[rows] = inner.score
    reason[rows] = inner.reason
    for i in np.flatnonzero(dup):
        reason[i] = f"dropped: near-duplicate (cosine {red.max_cos[i]:.4f} > {threshold}) of {_name(red.duplicate_of[i], ids)}"
    short = budget - int(selected.sum())
    if short > 0:
        back = np.flatnonzero(dup)
        back = back[np.lexsort((back, red.max_cos[back]))][:short]
        selected[back] = True
        for i in back:
            reason[i] = f"kept: near-duplicate let back in to meet the budget (cosine {red.max_cos[i]:.4f})"
    quotas = np.bincount(groups[selected], minlength=k)
    info = {**inner.info, "dedup_threshold": threshold, "near_duplicates": int(dup.sum()), "readmitted": max(short, 0)}
    return Selection(selected, score, reason, quotas, info)
