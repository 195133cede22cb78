"""COINCIDE (METHODS.md section 3) on any embedding: cluster probabilities, then greedy MMD.

1. Transferability S_i: mean cosine between cluster i's centroid and the other centroids,
   ignoring pairs above `max_cosine` (near-identical clusters say nothing about transfer).
2. Density D_i: mean over x, y in cluster i of exp(-||x - y||^2 / 2) (estimated on at most
   `density_rows` members drawn with the seed).
3. P = softmax(S / (tau D)). Clusters are visited by descending P; cluster i gets
   n_i = round(R P_i / sum of P over the unvisited clusters), R the budget still unspent, the
   whole cluster when n_i >= |C_i|. When the clusters visited last are too small to absorb what
   is left, the rest goes to clusters with room in visiting order, so the count is exact.
4. Inside a cluster, n_i rows are picked by greedy MMD: each step adds the row that makes the
   chosen set's kernel mean closest to the cluster's (by default the density's kernel; its width
   is a setting, and a cluster above a row limit is picked in random blocks: blocked_greedy_mmd).

Steps 2 and 4 are independent per cluster and run as Ray tasks over chunks of clusters when
`use_ray` is set. Embeddings must be unit rows.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from rsdist.select.budget import apportion
from rsdist.select.strategies import Selection, cluster_quotas, members_of

log = logging.getLogger("rsdist")


def centroids_of(x: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """Unit-length mean of each cluster's rows (spherical k-means centroids)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, groups, x)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return sums / np.where(norms > 0, norms, 1.0)


def transferability(centroids: np.ndarray, max_cosine: float) -> np.ndarray:
    """S_i: mean cosine to the other centroids, leaving out pairs above `max_cosine`."""
    cos = centroids @ centroids.T
    use = cos <= max_cosine
    np.fill_diagonal(use, False)
    counts = use.sum(axis=1)
    return np.where(counts > 0, (cos * use).sum(axis=1) / np.maximum(counts, 1), 0.0)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def density(x: np.ndarray, max_rows: int, seed: int) -> float:
    """D = mean over pairs (self-pairs included) of exp(-||x - y||^2 / 2)."""
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    return float(np.exp(-_sq_dists(x, x) / 2.0).mean())


def cluster_probabilities(s: np.ndarray, d: np.ndarray, tau: float) -> np.ndarray:
    """P = softmax(S / (tau D)), computed stably."""
    z = s / (tau * np.maximum(d, 1e-12))
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def sequential_quotas(p: np.ndarray, sizes: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """COINCIDE's quota walk (see the module docstring). Returns (quotas, visiting order)."""
    order = np.lexsort((np.arange(len(p)), -p))
    quotas = np.zeros(len(p), dtype=np.int64)
    remaining, mass = int(budget), float(p.sum())
    for i in order:
        if remaining <= 0:
            break
        share = min(1.0, p[i] / mass) if mass > 0 else 1.0
        n_i = min(int(np.floor(remaining * share + 0.5)), int(sizes[i]))
        quotas[i] = n_i
        remaining -= n_i
        mass -= p[i]
    for i in order:  # what the last, small clusters could not hold
        if remaining <= 0:
            break
        extra = min(int(sizes[i] - quotas[i]), remaining)
        quotas[i] += extra
        remaining -= extra
    return quotas, order


def greedy_mmd(x: np.ndarray, n: int, allowed: np.ndarray | None = None, width: float = 1.0) -> np.ndarray:
    """Positions of `n` rows of `x` picked greedily to minimise MMD(chosen, all) with the RBF kernel
    exp(-||x - y||^2 / (2 width^2)), only among the `allowed` rows when a mask is given (at least
    `n` of them). Width 1 is COINCIDE's kernel (the one of its density).

    With t chosen rows and candidate j, the MMD^2 up to a constant is
    (ss + 2 ks_j + K_jj) / (t+1)^2 - 2 (sc + kc_j) / ((t+1) m), where ss sums K over chosen
    pairs, ks_j sums K(j, chosen), kc_j sums K(j, all) and sc sums kc over the chosen rows.
    """
    m = len(x)
    if allowed is None and n >= m:
        return np.arange(m)
    if allowed is not None and int(allowed.sum()) < n:
        raise ValueError(f"greedy_mmd: {int(allowed.sum())} allowed rows, fewer than the {n} to pick")
    rows = np.arange(m) if allowed is None else np.flatnonzero(allowed)
    kern = kernel_rows(x, rows, width)
    a = len(rows)
    kc = kern.sum(axis=1)
    kdiag = kern[np.arange(a), rows].copy()
    ks = np.zeros(a)
    ss = sc = 0.0
    taken = np.zeros(a)  # +inf once a row is picked
    obj, fit = np.empty(a), np.empty(a)
    picks = np.empty(n, dtype=np.int64)
    for t in range(n):
        # obj = (ss + 2 ks + kdiag) / (t+1)^2 - 2 (sc + kc) / ((t+1) m), in place, in that order
        np.multiply(ks, 2.0, out=obj)
        np.add(obj, ss, out=obj)
        np.add(obj, kdiag, out=obj)
        np.divide(obj, (t + 1) ** 2, out=obj)
        np.add(kc, sc, out=fit)
        np.multiply(fit, 2.0, out=fit)
        np.divide(fit, (t + 1) * m, out=fit)
        np.subtract(obj, fit, out=obj)
        np.add(obj, taken, out=obj)
        j = int(np.argmin(obj))
        picks[t] = rows[j]
        taken[j] = np.inf
        ss += 2.0 * ks[j] + kdiag[j]
        sc += kc[j]
        ks += kern[:, rows[j]]
    return picks


def kernel_rows(x: np.ndarray, rows: np.ndarray, width: float) -> np.ndarray:
    """exp(-||x_i - x_j||^2 / (2 width^2)) for i in `rows` and every j: the rows of the full kernel,
    bit for bit (the whole Gram product is formed once, as _sq_dists forms it, and only the
    candidates' rows go through the element-wise steps, in place)."""
    sq = (x * x).sum(1)
    gram = 2.0 * x @ x.T
    if len(rows) < len(x):
        gram = gram[rows]
    kern = sq[rows][:, None] + sq[None, :]
    kern -= gram
    np.maximum(kern, 0.0, out=kern)
    kern /= -(2.0 * width * width)
    return np.exp(kern, out=kern)


def blocked_greedy_mmd(
    x: np.ndarray, n: int, allowed: np.ndarray | None = None, width: float = 1.0, block_rows: int = 0, seed: int = 0
) -> np.ndarray:
    """greedy_mmd, with a cluster of more than `block_rows` rows (0: no limit) first dealt at random
    (with the seed) into equal blocks of at most `block_rows` rows; each block picks its share of `n`
    (rsdist.select.budget.apportion over its allowed rows) by greedy MMD against the block.

    Why: greedy MMD holds an m x m kernel and costs O(m n d) for a cluster of m rows. Blocks bound
    the kernel to block_rows^2 and the work to O(m block_rows d) per cluster, so the pick stays
    linear in the pool at any cluster size; a random block is a sample of its cluster, so the union
    of the blocks' representative picks is a representative pick of the cluster.
    """
    m = len(x)
    if block_rows <= 0 or m <= block_rows:
        return greedy_mmd(x, n, allowed, width)
    blocks = np.array_split(np.random.default_rng(seed).permutation(m), int(np.ceil(m / block_rows)))
    free = np.ones(m, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if int(free.sum()) < n:
        raise ValueError(f"greedy_mmd: {int(free.sum())} allowed rows, fewer than the {n} to pick")
    room = np.array([int(free[b].sum()) for b in blocks])
    shares = apportion(room, n, room)  # the budget's largest-remainder rule, capped by each block's rows
    picks = [b[greedy_mmd(x[b], int(q), None if allowed is None else free[b], width)] for b, q in zip(blocks, shares) if q > 0]
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def mmd_among_top(
    x: np.ndarray,
    groups: np.ndarray,
    k: int,
    score: np.ndarray,
    budget: int,
    quota: str,
    candidates: float,
    mmd_width: float = 1.0,
    mmd_block_rows: int = 0,
    seed: int = 0,
    what: str = "score",
) -> Selection:
    """Per-cluster quotas; in each cluster, greedy MMD (blocked_greedy_mmd) picks the quota among
    the `candidates` x quota rows of highest `score` (at least the quota).

    The score keeps the rows worth training on (`typicality-mmd`: caption typicality,
    `alignment-mmd`: image-text alignment); MMD spreads the picks over the cluster's visual modes
    instead of piling them where high scores are densest. `what` names the score in the reasons.
    """
    quotas = cluster_quotas(groups, k, budget, quota)
    selected = np.zeros(len(groups), dtype=bool)
    pick_rank = np.full(len(groups), -1, dtype=np.int64)
    score_rank = np.empty(len(groups), dtype=np.int64)
    for g, rows in enumerate(members_of(groups, k)):
        order = np.lexsort((rows, -score[rows]))  # highest first, ties by row
        score_rank[rows[order]] = np.arange(len(rows))
        q = int(quotas[g])
        if q == 0:
            continue
        allowed = np.zeros(len(rows), dtype=bool)
        allowed[order[: min(len(rows), max(q, int(np.ceil(candidates * q))))]] = True
        picks = blocked_greedy_mmd(x[rows], q, allowed, mmd_width, mmd_block_rows, seed)
        selected[rows[picks]] = True
        pick_rank[rows[picks]] = np.arange(q)
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        where = f"{what} {score[i]:.3f}, rank {score_rank[i] + 1} in cluster, quota {quotas[groups[i]]}"
        reason[i] = f"kept: greedy MMD pick {pick_rank[i] + 1} ({where})" if selected[i] else f"dropped: {where}"
    return Selection(selected, score.astype(np.float32), reason, quotas, {"candidates": candidates, "mmd_width": mmd_width, "mmd_block_rows": mmd_block_rows})


def densities_of_chunk(blocks: list[np.ndarray], max_rows: int, seed: int) -> list[float]:
    return [density(x, max_rows, seed + i) for i, x in enumerate(blocks)]


def picks_of_chunk(blocks: list[np.ndarray], quotas: list[int], width: float, block_rows: int, seed: int) -> list[np.ndarray]:
    return [
        blocked_greedy_mmd(x, int(q), width=width, block_rows=block_rows, seed=seed) if q > 0 else np.zeros(0, dtype=np.int64)
        for x, q in zip(blocks, quotas)
    ]


def _chunks(sizes: np.ndarray, parts: int) -> list[list[int]]:
    """Clusters split into about `parts` chunks of similar work (largest first, greedy)."""
    parts = max(1, min(parts, len(sizes)))
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = np.zeros(parts)
    for i in np.lexsort((np.arange(len(sizes)), -(sizes.astype(np.float64) ** 2))):
        b = int(np.argmin(load))
        bins[b].append(int(i))
        load[b] += float(sizes[i]) ** 2
    return [b for b in bins if b]


def _map(fn: Callable, args: list[tuple], use_ray: bool) -> list[Any]:
    if not use_ray:
        return [fn(*a) for a in args]
    import ray

    remote = ray.remote(num_cpus=0.5)(fn)
    return ray.get([remote.remote(*a) for a in args])


def coincide_select(
    x: np.ndarray,
    groups: np.ndarray,
    k: int,
    budget: int,
    tau: float = 0.1,
    max_cosine: float = 0.9,
    density_rows: int = 512,
    seed: int = 0,
    use_ray: bool = False,
    parts: int = 4,
    quotas: np.ndarray | None = None,
    mmd_width: float = 1.0,
    mmd_block_rows: int = 0,
) -> Selection:
    """COINCIDE over unit rows `x` with cluster indices `groups` (0..k-1). Given per-cluster
    `quotas`, those replace the quotas from the cluster probabilities (greedy MMD inside each
    cluster only). `mmd_width` and `mmd_block_rows` are the greedy MMD's (blocked_greedy_mmd)."""
    given = quotas
    sizes = np.bincount(groups, minlength=k)
    members = members_of(groups, k)
    chunks = _chunks(sizes, parts)
    blocks = [[x[members[g]] for g in chunk] for chunk in chunks]
    if use_ray:
        import ray

        blocks = [ray.put(b) for b in blocks]  # shipped once, used by both rounds

    dens = np.zeros(k)
    for chunk, out in zip(chunks, _map(densities_of_chunk, [(b, density_rows, seed) for b in blocks], use_ray)):
        dens[chunk] = out
    s = transferability(centroids_of(x, groups, k), max_cosine)
    p = cluster_probabilities(s, dens, tau)
    if quotas is None:
        quotas, visit = sequential_quotas(p, sizes, budget)
    else:
        visit = np.arange(k)
    log.info("coincide: %d clusters, %d take a share, P max %.3g", k, int((quotas > 0).sum()), float(p.max()))

    selected = np.zeros(len(groups), dtype=bool)
    pick_rank = np.full(len(groups), -1, dtype=np.int64)
    jobs = [(b, [int(quotas[g]) for g in chunk], mmd_width, mmd_block_rows, seed) for b, chunk in zip(blocks, chunks)]
    for chunk, out in zip(chunks, _map(picks_of_chunk, jobs, use_ray)):
        for g, picks in zip(chunk, out):
            rows = members[g][picks]
            selected[rows] = True
            pick_rank[rows] = np.arange(len(rows))

    visit_pos = np.empty(k, dtype=np.int64)
    visit_pos[visit] = np.arange(k)
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        g = groups[i]
        if given is None:
            where = f"cluster P={p[g]:.3g} visited {visit_pos[g] + 1} of {k}, quota {quotas[g]} of {sizes[g]}"
        else:
            where = f"cluster P={p[g]:.3g}, quota {quotas[g]} of {sizes[g]} from select.quota"
        if not selected[i]:
            reason[i] = f"dropped: not picked ({where})"
        elif quotas[g] >= sizes[g]:
            reason[i] = f"kept: whole cluster taken ({where})"
        else:
            reason[i] = f"kept: greedy MMD pick {pick_rank[i] + 1} ({where})"
    info = {"tau": tau, "mmd_width": mmd_width, "mmd_block_rows": mmd_block_rows, "clusters_used": int((quotas > 0).sum()), "quotas_from": "cluster probabilities" if given is None else "select.quota"}
    return Selection(selected, p[groups].astype(np.float32), reason, quotas, info)
