"""ScalSelect (METHODS.md section 5): leverage scores from a streamed Gram matrix.

The reference code runs a dense SVD of the centred N x d matrix X. Here one pass accumulates the
d x d Gram matrix and the column sum (`GramAccumulator.add`, batch by batch, mergeable across
workers), an eigen-decomposition of the centred Gram gives V and sigma^2, and a second pass scores
each row: pi_i = ||(x_i - mu) V_k diag(1/sigma_k)||^2, which equals sum_{j<=k} U_ij^2 of the
dense SVD. k is the smallest rank whose sigma^2 hold `energy` of the total. Memory is O(d^2),
time O(N d^2): linear in N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsdist.select.budget import top_global, top_per_group
from rsdist.select.strategies import Selection


class GramAccumulator:
    """Running sum and Gram matrix of row batches, kept around a shift for numerical stability.

    The shift (the first batch's mean) keeps the later centring, G - n mu mu^T, from cancelling
    catastrophically when the embeddings share a large common component.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(dim, dtype=np.float64)
        self.gram = np.zeros((dim, dim), dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"batch of shape {x.shape} does not have {self.dim} columns")
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        xs = x - self.shift
        self.n += len(x)
        self.total += xs.sum(axis=0)
        self.gram += xs.T @ xs

    def merge(self, other: "GramAccumulator") -> None:
        """Fold another accumulator (e.g. from another worker) into this one."""
        if other.n == 0:
            return
        if self.shift is None:
            self.shift, self.n, self.total, self.gram = other.shift, other.n, other.total.copy(), other.gram.copy()
            return
        # Move `other` onto this shift: sum(x - a) = sum(x - b) + n (b - a), and likewise the Gram.
        delta = other.shift - self.shift
        total = other.total + other.n * delta
        gram = other.gram + np.outer(other.total, delta) + np.outer(delta, other.total) + other.n * np.outer(delta, delta)
        self.n += other.n
        self.total += total
        self.gram += gram

    def mean(self) -> np.ndarray:
        return self.shift + self.total / self.n

    def centred_gram(self) -> np.ndarray:
        """sum_i (x_i - mu)(x_i - mu)^T."""
        m = self.total / self.n
        return self.gram - self.n * np.outer(m, m)


@dataclass
class Subspace:
    """The dominant subspace of the centred data: mean, top-k eigenvectors and singular values."""

    mean: np.ndarray
    vectors: np.ndarray  # (d, k)
    sigma: np.ndarray  # (k,)
    energy: float  # share of the total energy the k directions hold

    @property
    def k(self) -> int:
        return len(self.sigma)


def dominant_subspace(acc: GramAccumulator, energy: float) -> Subspace:
    """Eigen-decompose the centred Gram and keep the smallest rank holding `energy` of sigma^2."""
    if acc.n < 2:
        raise ValueError("leverage scores need at least 2 rows")
    lam, vec = np.linalg.eigh(acc.centred_gram())
    lam, vec = lam[::-1], vec[:, ::-1]
    keep = lam > max(lam[0], 0.0) * 1e-10  # drop the null space (rank-deficient data)
    lam, vec = lam[keep], vec[:, keep]
    if len(lam) == 0:
        raise ValueError("the embeddings have no variance: every row is the same")
    cum = np.cumsum(lam) / lam.sum()
    k = int(np.searchsorted(cum, energy - 1e-12) + 1)
    k = min(k, len(lam))
    return Subspace(acc.mean(), vec[:, :k], np.sqrt(lam[:k]), float(cum[k - 1]))


def leverage_scores(x: np.ndarray, sub: Subspace) -> np.ndarray:
    """pi_i = ||(x_i - mu) V_k / sigma_k||^2 for a batch of rows."""
    z = (np.asarray(x, dtype=np.float64) - sub.mean) @ sub.vectors / sub.sigma
    return np.einsum("ij,ij->i", z, z)


def scalselect_select(k: int, groups: np.ndarray, scores: np.ndarray, budget: int, sub: Subspace, quotas: np.ndarray | None = None) -> Selection:
    """Keep the `budget` rows of highest leverage over the whole pool (the paper's global top-B), or,
    given per-cluster `quotas`, the highest-leverage rows of each cluster."""
    if quotas is None:
        selected = top_global(scores, budget)
        order = np.lexsort((np.arange(len(scores)), -scores))
        rank = np.empty(len(scores), dtype=np.int64)
        rank[order] = np.arange(len(scores))
        where = ""
    else:
        selected, rank = top_per_group(groups, scores, quotas)
        where = " in cluster"
    reason = np.empty(len(scores), dtype=object)
    for i in range(len(scores)):
        what = f"leverage rank {rank[i] + 1}{where} (k={sub.k}, energy {sub.energy:.3f})"
        reason[i] = f"kept: {what}" if selected[i] else f"dropped: {what} outside the budget"
    if quotas is None:
        quotas = np.bincount(groups[selected], minlength=k)
    info = {"rank_k": sub.k, "energy_held": round(sub.energy, 6)}
    return Selection(selected, scores.astype(np.float32), reason, quotas, info)
