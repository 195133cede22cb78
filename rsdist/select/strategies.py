"""The baseline strategies and seed 000's two-stage truncation, as pure functions over arrays.

Every strategy takes `groups` (each sample's cluster as an index 0..k-1, see `group_index`) and
returns a `Selection` over the same rows: which are kept, a score, and a reason per row.
Ties are broken by row order, so the caller fixes determinism by fixing the row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsdist.select.budget import apportion, top_global, top_per_group


@dataclass
class Selection:
    """The outcome of a strategy: one entry per pool row, plus per-cluster quotas and figures."""

    selected: np.ndarray  # bool (N,)
    score: np.ndarray  # float32 (N,)
    reason: np.ndarray  # object (N,) of str
    quotas: np.ndarray  # int64 (k,): how many each cluster was meant to give
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.selected.sum())


def group_index(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, groups): the distinct cluster labels and each row's position among them."""
    labels, groups = np.unique(np.asarray(clusters), return_inverse=True)
    return labels, groups.astype(np.int64)


def members_of(groups: np.ndarray, k: int) -> list[np.ndarray]:
    """Row positions of each cluster 0..k-1, in row order (one sort, not one scan per cluster)."""
    order = np.argsort(groups, kind="stable")
    return np.split(order, np.cumsum(np.bincount(groups, minlength=k))[:-1])


def cluster_quotas(groups: np.ndarray, k: int, budget: int, rule: str) -> np.ndarray:
    """Per-cluster quotas summing to `budget`: 'proportional' to size or 'equal', capped by size."""
    sizes = np.bincount(groups, minlength=k)
    if rule == "proportional":
        weights = sizes.astype(np.float64)
    elif rule == "equal":
        weights = (sizes > 0).astype(np.float64)
    else:
        raise ValueError(f"quota rule {rule!r} is not one of: proportional, equal")
    return apportion(weights, budget, sizes)


def _reasons(selected: np.ndarray, kept: str, dropped: str) -> np.ndarray:
    return np.where(selected, kept, dropped).astype(object)


def random_select(n: int, k: int, groups: np.ndarray, budget: int, seed: int) -> Selection:
    """Uniform random subset of exactly `budget` rows; the score is the random draw."""
    key = np.random.default_rng(seed).random(n)
    selected = top_global(key, budget)
    quotas = np.bincount(groups[selected], minlength=k)
    reason = _reasons(selected, f"kept: uniform random draw (seed {seed})", "dropped: not drawn")
    return Selection(selected, key.astype(np.float32), reason, quotas)


def cluster_random_select(k: int, groups: np.ndarray, budget: int, quota: str, seed: int) -> Selection:
    """Random rows inside each cluster, the budget split by `quota` ('proportional' | 'equal')."""
    key = np.random.default_rng(seed).random(len(groups))
    quotas = cluster_quotas(groups, k, budget, quota)
    selected, _ = top_per_group(groups, key, quotas)
    reason = _reasons(selected, f"kept: random draw within the {quota} cluster quota", "dropped: not drawn within the cluster quota")
    return Selection(selected, key.astype(np.float32), reason, quotas)


def shift_select(k: int, groups: np.ndarray, shift: np.ndarray, budget: int, quota: str, keep: str) -> Selection:
    """Seed 000's two-stage truncation: per-cluster quotas, then the `keep` end of the shift.

    Rows with a missing (NaN) shift are taken last.
    """
    if keep not in ("highest", "lowest"):
        raise ValueError(f"keep {keep!r} is not one of: highest, lowest")
    shift = np.asarray(shift, dtype=np.float64)
    quotas = cluster_quotas(groups, k, budget, quota)
    key = shift if keep == "highest" else -shift
    selected, rank = top_per_group(groups, key, quotas)
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        g = groups[i]
        where = f"rank {rank[i] + 1} in cluster, quota {quotas[g]}"
        reason[i] = f"kept: {keep} shift ({where})" if selected[i] else f"dropped: outside the {keep}-shift quota ({where})"
    return Selection(selected, shift.astype(np.float32), reason, quotas)
