"""Budget arithmetic shared by every strategy: how many samples, and how many per cluster.

Rounding rule. A fractional budget f in (0, 1] of a pool of N keeps floor(f * N + 1/2) samples
(round half up), at least 1 when the pool is not empty. A budget > 1 is a count, capped at N.

Apportionment. A budget B is split over clusters by the largest-remainder (Hamilton) method:
each cluster's ideal share is B * w_i / sum(w); it gets the floor of that, and the seats still
free go to the largest fractional parts (ties: larger weight, then lower cluster index). A
cluster whose ideal share reaches its size is filled completely and the rest of the budget is
apportioned again over the others, so quotas never exceed cluster sizes and always sum to B.
"""

from __future__ import annotations

import math

import numpy as np


def budget_count(budget: float, pool: int) -> int:
    """The exact number of samples a budget keeps from a pool of `pool` samples."""
    if pool <= 0:
        return 0
    if budget <= 0:
        raise ValueError(f"budget {budget!r} must be > 0")
    if budget <= 1:
        return max(1, min(pool, math.floor(budget * pool + 0.5)))
    if float(budget) != int(budget):
        raise ValueError(f"budget {budget!r} must be a fraction in (0, 1] or a whole count")
    return min(pool, int(budget))


def apportion(weights: np.ndarray, total: int, caps: np.ndarray) -> np.ndarray:
    """Integer quotas summing exactly to `total`, proportional to `weights`, never above `caps`.

    Clusters with zero weight get nothing unless the others cannot hold the budget; if every
    cluster still open has zero weight, the rest is split equally among them.
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if weights.shape != caps.shape:
        raise ValueError("weights and caps must have the same length")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("weights must be finite and >= 0")
    if total < 0 or total > int(caps.sum()):
        raise ValueError(f"cannot apportion {total} over clusters holding {int(caps.sum())}")
    quota = np.zeros(len(caps), dtype=np.int64)
    open_ = caps > 0
    remaining = int(total)
    while remaining > 0:
        idx = np.flatnonzero(open_)
        w = weights[idx]
        if w.sum() <= 0:
            w = np.ones_like(w)
        ideal = remaining * w / w.sum()
        full = ideal >= caps[idx]
        if full.any():
            # Fill these clusters completely and apportion what is left over the rest.
            filled = idx[full]
            quota[filled] = caps[filled]
            remaining -= int(caps[filled].sum())
            open_[filled] = False
            continue
        base = np.floor(ideal).astype(np.int64)
        seats = remaining - int(base.sum())
        frac = ideal - base
        order = np.lexsort((idx, -w, -frac))  # largest remainder, then weight, then index
        base[order[:seats]] += 1
        quota[idx] = base
        remaining = 0
    return quota


def rank_within_groups(groups: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Each element's 0-based rank inside its group by descending `key` (ties: lower index first)."""
    n = len(groups)
    order = np.lexsort((np.arange(n), -key, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def top_per_group(groups: np.ndarray, key: np.ndarray, quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the `quotas[g]` highest-`key` elements of every group g (groups are 0..k-1).

    Returns (selected mask, rank inside the group). NaN keys rank last.
    """
    key = np.where(np.isnan(key), -np.inf, key)
    rank = rank_within_groups(groups, key)
    return rank < quotas[groups], rank


def top_global(key: np.ndarray, count: int) -> np.ndarray:
    """Mask of the `count` highest-`key` elements (ties: lower index first; NaN last)."""
    key = np.where(np.isnan(key), -np.inf, key)
    order = np.lexsort((np.arange(len(key)), -key))
    mask = np.zeros(len(key), dtype=bool)
    mask[order[:count]] = True
    return mask
