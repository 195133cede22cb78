"""The k-means driver: initialise, then iterate over shard actors until the centroids settle.

The driver holds only the centroids (k x d), their running counts and small samples; every pass
over the data happens inside the `ShardActor`s that own it.

- Mini-batch (Sculley 2010): each iteration the centroids go out once (`ray.put`), every actor
  assigns its share of the batch and returns sums and counts of the centroids it touched; the
  driver merges them and moves centroid j by eta_j = n_j / v_j towards the batch mean, v_j the
  count it has absorbed so far (a per-centroid learning rate). Stops on mean centroid movement
  below `tol` or after `max_no_improvement` iterations without a better smoothed batch inertia
  (the same rule as scikit-learn's MiniBatchKMeans). With `overlap` the next batch goes out before
  the current one is merged (actors assign while the driver updates; one update of staleness).
- Lloyd: the same plumbing with full passes and dense sums; stops on movement or a relative
  inertia change below `tol`.
- Re-seeding: in mini-batch mode every 10k rows seen (and whenever a centroid is still empty),
  centroids whose count is below `reassign_ratio` x the largest move to rows of the current
  batch; in Lloyd mode empty centroids move to the rows farthest from their centroid.
- Initialisation: greedy k-means++ on a uniform sample, or k-means|| (Bahmani et al. 2012:
  5 rounds oversampling 2k rows by distance, then weighted k-means++ on the candidates).
- Spherical mode (metric "cosine"): rows are unit vectors and centroids are renormalised after
  every update. Every random draw is keyed by (seed, actor, iteration): a seed fixes the result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from rsdist.cluster.backends import matmul_dtype
from rsdist.cluster.exchange import SLOTS, SharedExchange, open_shared_exchange
from rsdist.core.tables import unit_rows

log = logging.getLogger("rsdist")

KMEANS_PAR_ROUNDS = 5
KMEANS_PP_MAX_K = 1000
# k-means|| runs on a uniform sample of at least this many rows (cluster.init_pool): each of its
# rounds is a pass over its rows against ~2k new candidates, and its weighting pass one against
# all ~10k of them; on a whole 1e7-row pool at k = 2,236 the rounds alone took 7.6 min.
KMEANS_PAR_MIN_POOL = 200_000
KMEANS_PAR_POOL_PER_K = 50
# k-means++ multiplies its whole sample by itself once when the product fits in this many bytes
# (12,288 rows in bf16: 302 MB), so each of its k steps gathers rows of it instead of reading the
# sample again: 867 -> 356 ms at k = 1,000 on 6,144 rows (`rsdist bench kmeans --micro`,
# "kmeans_pp"), the benchmark's init 1.8-2.6 -> 1.0-1.1 s on 12,288. Larger samples (k-means||
# candidates at large k, big init samples) step as before.
KMEANS_PP_GRAM_BYTES = 512 << 20


@dataclass
class FitResult:
    centroids: np.ndarray
    iterations: int
    inertia: float  # last batch (mini-batch) or last full pass (Lloyd) inertia
    reseeded: int = 0
    init: str = ""
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    init_seconds: float = 0.0  # of `seconds`: initialisation; the rest is the iterations
    exchange: str = "object-store"  # how the mini-batch loop moved centroids and sums (rsdist/cluster/exchange.py)


def auto_k(n: int) -> int:
    """About sqrt(N / 2), clamped to [2, N]."""
    return int(min(max(2, round(math.sqrt(n / 2))), n))


def share(total: int, sizes: list[int]) -> list[int]:
    """Split `total` draws over actors in proportion to their rows (largest remainder, exact sum)."""
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    out = [int(r) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def readable_tensor(a: np.ndarray, dtype) -> torch.Tensor:
    """A tensor of `a` for reading; the object store's arrays are read-only, which torch warns
    about, so those are copied."""
    arr = np.asarray(a, dtype)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def merge_sums(results: list[dict], acc: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Merge the actors' sparse (idx, sums, counts) in `acc` (k x d float32, zeroed here): the
    touched centroids, their summed rows and their counts. Float32 like the rows (scikit-learn's
    update also runs in the data's precision); each actor's idx holds distinct centroids."""
    acc.zero_()
    counts = np.zeros(acc.shape[0])
    for r in results:
        acc.index_add_(0, readable_tensor(r["idx"], np.int64), readable_tensor(r["sums"], np.float32))
        counts[r["idx"]] += r["counts"]
    touched = np.flatnonzero(counts)
    return touched, acc.index_select(0, torch.from_numpy(touched)), counts[touched]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # the highest value glibc's own dynamic threshold reaches (64-bit)


@contextmanager
def heap_reuse():
    """Serve the driver's per-iteration temporaries from the heap, then return freed memory.

    glibc trims the heap top whenever more than M_TRIM_THRESHOLD is free there, and that threshold
    starts at 256 KiB and only rises once a large mmapped block is freed. Until then every MB-sized
    temporary of the centroid update is page-faulted anew (745 faults, 2.0 instead of 0.54 ms an
    update at k = 1000, d = 384, in a fresh process: `rsdist bench kmeans --micro`, "heap"). This sets both thresholds to the values
    glibc's dynamic rule settles on (32 MiB mmap, 64 MiB trim) for the rest of the process, and
    trims once on exit so the fit leaves no freed heap behind. Outside glibc it does nothing."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
    try:
        yield
    finally:
        libc.malloc_trim(0)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def kmeans_pp(
    x: np.ndarray, k: int, rng: np.random.Generator, metric: str, weights: np.ndarray | None = None, trials: int | None = None, bf16: bool = False,
    gram_bytes: int = KMEANS_PP_GRAM_BYTES,
) -> np.ndarray:
    """Greedy k-means++ (Arthur & Vassilvitskii; local trials as in scikit-learn) on rows `x`,
    optionally weighted; O(k x trials x n x d). Runs on one thread: its k sequential steps are
    small, memory-bound products that gain nothing from a second thread, and a multi-threaded
    pool on a busy host slowed it ~8x (34 s instead of 4 s at k = 1000 on 12,288 rows).
    `bf16`: the candidates' products read a bf16 copy of the rows (half the memory traffic: 0.7
    instead of 1.4 ms a step at 6,144 x 384, `rsdist bench kmeans --micro`); a product then carries
    bf16's 8-bit mantissa, which shifts the sampling weights, not which rows can be drawn.
    When the sample's Gram matrix fits in `gram_bytes` it is computed once and the steps gather
    its rows (KMEANS_PP_GRAM_BYTES)."""
    with torch_threads(1):
        return _kmeans_pp(x, k, rng, metric, weights, trials, bf16, gram_bytes)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator, metric: str, weights: np.ndarray | None, trials: int | None, bf16: bool, gram_bytes: int) -> np.ndarray:
    n = len(x)
    if n < k:
        raise ValueError(f"k-means++ needs at least k = {k} rows, got {n}")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    trials = trials or 2 + int(math.log(k))
    x_sq = (xt * xt).sum(1, keepdim=True)
    xm = xt.to(torch.bfloat16) if bf16 else xt
    gram = xm @ xm.t() if n * n * xm.element_size() <= gram_bytes else None

    def dists_to(rows: torch.Tensor) -> np.ndarray:
        # the sample's Gram matrix is symmetric: row j of it is every row's product with row j
        prod = (gram.index_select(0, rows).t() if gram is not None else xm @ xm.index_select(0, rows).t()).float()
        if metric == "cosine":
            return (1.0 - prod).clamp_(min=0.0).double().numpy()
        return (x_sq - 2.0 * prod + x_sq.index_select(0, rows).t()).clamp_(min=0.0).double().numpy()

    chosen = [int(rng.choice(n, p=w / w.sum()))]
    best = dists_to(torch.tensor(chosen))[:, 0]
    best[chosen[0]] = 0.0  # exactly: a bf16 self-distance is a small positive number
    for _ in range(1, k):
        pot = w * best
        total = pot.sum()
        if total <= 0:  # fewer distinct rows than k: take the first unchosen row
            taken = set(chosen)
            cand = np.array([next(i for i in range(n) if i not in taken)])
        else:
            cand = np.minimum(np.searchsorted(np.cumsum(pot), rng.random(trials) * total), n - 1)
        # keep the candidate that lowers the weighted potential the most
        new = np.minimum(best[:, None], dists_to(torch.from_numpy(cand)))
        j = int(np.argmin(w @ new))
        chosen.append(int(cand[j]))
        best = new[:, j]
        best[chosen[-1]] = 0.0
    return x[chosen].astype(np.float32)


class KMeansDriver:
    """Fits centroids over a list of ShardActor handles whose row counts are `sizes`."""

    def __init__(self, actors: list, sizes: list[int], k: int, cfg):
        self.actors = [a for a, s in zip(actors, sizes) if s > 0]
        self.sizes = [s for s in sizes if s > 0]
        self.n = sum(self.sizes)
        self.k = k
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, 7919])
        self.bf16 = matmul_dtype(cfg.precision, torch.device("cpu")) == torch.bfloat16  # the driver's own products (k-means++)
        self._acc: torch.Tensor | None = None  # the mini-batch update's k x d accumulator, reused every iteration

    def _get(self, refs):
        import ray

        return ray.get(refs)

    def _key(self, actor: int, it: int, what: int) -> list[int]:
        return [self.cfg.seed, actor, it, what]

    # ----- initialisation -------------------------------------------------------------------
    def init_method(self) -> str:
        init = self.cfg.init
        if init == "auto":
            init = "k-means++" if self.k <= KMEANS_PP_MAX_K else "k-means||"
        return init

    def sample(self, m: int, what: int = 0) -> np.ndarray:
        m = min(m, self.n)
        parts = self._get([a.sample.remote(s, self._key(i, 0, what)) for i, (a, s) in enumerate(zip(self.actors, share(m, self.sizes)))])
        return np.concatenate(parts)

    def initial_centroids(self) -> np.ndarray:
        init = self.init_method()
        metric = self.cfg.metric
        if init == "random":
            c = self.sample(self.k, what=1)
        elif init == "k-means++":
            m = self.cfg.init_sample or max(3 * self.cfg.batch_size, 3 * self.k)
            c = kmeans_pp(self.sample(max(m, self.k)), self.k, self.rng, metric, bf16=self.bf16)
        else:
            c = self.kmeans_parallel()
        return unit_rows(c) if metric == "cosine" else c

    def kmeans_parallel(self) -> np.ndarray:
        """k-means||: oversample ~2k rows per round by distance to the candidates, weight, recluster."""
        import ray

        m = min(self.n, self.cfg.init_pool or max(KMEANS_PAR_MIN_POOL, KMEANS_PAR_POOL_PER_K * self.k))
        self._get([a.kpar_begin.remote(s, self._key(i, 0, 6)) for i, (a, s) in enumerate(zip(self.actors, share(m, self.sizes)))])
        log.info("k-means||: on %d of %d rows", m, self.n)
        first = self.sample(1, what=2)
        cands = [first]
        new = first
        oversampling = 2.0 * self.k
        for r in range(KMEANS_PAR_ROUNDS):
            ref = ray.put(new)
            phi = sum(self._get([a.kpar_update.remote(ref) for a in self.actors]))
            if phi <= 0:
                break
            new = np.concatenate(self._get([a.kpar_sample.remote(oversampling, phi, self._key(i, r, 3)) for i, a in enumerate(self.actors)]))
            cands.append(new)
            log.info("k-means|| round %d: %d candidates", r + 1, sum(len(c) for c in cands))
        cands = np.concatenate(cands)
        if len(cands) < self.k:  # too few distinct candidates: top up with a uniform sample
            cands = np.concatenate([cands, self.sample(self.k - len(cands), what=4)])
        ref = ray.put(cands)
        weights = np.sum(self._get([a.nearest_counts.remote(ref) for a in self.actors]), axis=0).astype(np.float64)
        weights = np.maximum(weights, 1e-3)
        trials = 1 if self.k > KMEANS_PP_MAX_K else None
        return kmeans_pp(cands, self.k, self.rng, self.cfg.metric, weights=weights, trials=trials, bf16=self.bf16)

    # ----- iterations -------------------------------------------------------------------------
    def fit(self, init: np.ndarray | None = None) -> FitResult:
        start = time.perf_counter()
        c = np.ascontiguousarray(init if init is not None else self.initial_centroids(), dtype=np.float32)
        if self.cfg.metric == "cosine":
            c = unit_rows(c)
        method = "given" if init is not None else self.init_method()
        init_seconds = time.perf_counter() - start
        with heap_reuse():
            res = self._lloyd(c) if self.cfg.mode == "lloyd" else self._minibatch(c)
        res.init = method
        res.seconds = time.perf_counter() - start
        res.init_seconds = init_seconds
        return res

    def _update_sculley(self, c: np.ndarray, v: np.ndarray, results: list[dict]) -> float:
        """Move each touched centroid by eta_j = n_j / v_j towards its batch mean, in place in `c`
        (float32, in torch on one thread: 0.54 instead of 3.05 ms at k = 1,000 in float64 numpy,
        `rsdist bench kmeans --micro`, "heap");
        returns the mean movement over all k."""
        if self._acc is None or tuple(self._acc.shape) != c.shape:
            self._acc = torch.zeros(c.shape, dtype=torch.float32)
        touched, sums, n = merge_sums(results, self._acc)
        v[touched] += n
        rows = torch.from_numpy(touched)
        ct = torch.from_numpy(c)
        old = ct.index_select(0, rows)
        mean = sums.div_(torch.from_numpy(n.astype(np.float32))[:, None])
        new = torch.lerp(old, mean, torch.from_numpy((n / v[touched]).astype(np.float32))[:, None])
        if self.cfg.metric == "cosine":
            new = new / torch.linalg.vector_norm(new, dim=1, keepdim=True).clamp_(min=1e-12)
        ct.index_copy_(0, rows, new)
        return float(torch.linalg.vector_norm(new - old, dim=1).sum()) / self.k

    def _starved(self, v: np.ndarray, batch: int) -> np.ndarray:
        """Centroids to re-seed: count below `reassign_ratio` x the largest, or zero; as scikit-learn,
        never more than half a batch at once (the most starved are kept)."""
        starved = (v == 0) | (v < self.cfg.reassign_ratio * v.max())
        if starved.sum() > 0.5 * batch:
            keep = np.argsort(v)[int(0.5 * batch) :]
            starved[keep] = False
        return starved

    def _reseed_candidates(self, v: np.ndarray, batch: int) -> int:
        """How many batch rows the actors return as re-seeding candidates: as many as centroids are
        starved when the batch is sent. Asking for half the batch every time cost a 1.5 MB return
        per actor every third iteration at k = 1,000, when usually none is starved; a centroid that
        starves while the batch is out waits for the next re-seeding round."""
        return int(self._starved(v, batch).sum())

    def _reseed_minibatch(self, c: np.ndarray, v: np.ndarray, pool: np.ndarray, batch: int) -> int:
        """Move starved centroids (count < ratio x max, or zero) onto random rows of this batch."""
        starved = self._starved(v, batch)
        n = int(starved.sum())
        if n == 0 or len(pool) == 0:
            return 0
        n = min(n, len(pool))
        where = np.flatnonzero(starved)[:n]
        c[where] = pool[self.rng.choice(len(pool), size=n, replace=False)]
        if self.cfg.metric == "cosine":
            c[where] = unit_rows(c[where])
        rest = v[~starved]
        v[where] = rest.min() if len(rest) else 1.0
        return n

    def _minibatch(self, c: np.ndarray) -> FitResult:
        exchange = self._open_exchange(c.shape[1]) if self.cfg.shared_memory else None
        try:
            with torch_threads(1):  # the update's small ops: a second thread would only take CPU from the actors
                return self._minibatch_loop(c, exchange)
        finally:
            if exchange is not None:
                self._get([a.detach_exchange.remote() for a in self.actors])
                exchange.close()

    def _open_exchange(self, dim: int) -> SharedExchange | None:
        """The same-node exchange when every actor runs on this node (rsdist/cluster/exchange.py)."""
        import ray

        nodes = self._get([a.node_id.remote() for a in self.actors])
        exchange = open_shared_exchange(nodes, ray.get_runtime_context().get_node_id(), self.k, dim)
        if exchange is None:
            return None
        try:
            self._get([a.attach_exchange.remote(exchange.centroid_path, p, self.k, dim) for a, p in zip(self.actors, exchange.actor_prefixes)])
        except ray.exceptions.RayTaskError as e:  # e.g. a driver that does not share the actors' /dev/shm (Ray Client)
            log.warning("cluster: shard actors cannot map %s (%s); using the object store", exchange.centroid_path, str(e).splitlines()[-1])
            self._get([a.detach_exchange.remote() for a in self.actors])
            exchange.close()
            return None
        exchange.unlink()  # every actor has mapped the buffers: nothing stays in /dev/shm, even after a kill
        return exchange

    def _minibatch_loop(self, c: np.ndarray, exchange: SharedExchange | None) -> FitResult:
        """Sculley's loop. With `cfg.overlap` the next batch is sent out (with the centroids as they
        are) before the current one's sums are merged, so the actors assign batch t + 1 while the
        driver updates with batch t: every batch is assigned against centroids one update old.
        With an `exchange` the centroids and sums travel through its buffers, else the object store."""
        cfg = self.cfg
        batch = min(cfg.batch_size, self.n)
        shares = share(batch, self.sizes)
        v = np.zeros(self.k, np.float64)
        alpha = min(1.0, batch * 2.0 / (self.n + 1))
        ewa = ewa_min = None
        no_improvement = 0
        since_reseed = 0
        reseeded = 0
        history = []

        def send(it: int) -> tuple:
            """Ask every actor for its share of batch `it`, with re-seeding candidates when due."""
            nonlocal since_reseed
            import ray

            since_reseed += batch
            reseed_due = cfg.reassign_ratio >= 0 and ((v == 0).any() or since_reseed >= 10 * self.k)
            if reseed_due:
                since_reseed = 0
            pools = share(self._reseed_candidates(v, batch), shares) if reseed_due else [0] * len(shares)
            busy = [i for i, m in enumerate(shares) if m > 0]
            if exchange is not None:
                exchange.put_centroids(it % SLOTS, c)
                refs = [self.actors[i].minibatch_step_shared.remote(it % SLOTS, shares[i], self._key(i, it, 5), pools[i]) for i in busy]
            else:
                ref = ray.put(c)
                refs = [self.actors[i].minibatch_step.remote(ref, shares[i], self._key(i, it, 5), pools[i]) for i in busy]
            return it, busy, refs, reseed_due

        def receive(sent: tuple) -> tuple[list[dict], bool]:
            it, busy, refs, reseed_due = sent
            replies = self._get(refs)
            if exchange is not None:
                replies = [exchange.result(it % SLOTS, i, r) for i, r in zip(busy, replies)]
            return replies, reseed_due

        pending = send(1) if cfg.overlap else None
        it = 0
        for it in range(1, cfg.max_iter + 1):
            if not cfg.overlap:
                pending = send(it)
            ahead = send(it + 1) if cfg.overlap and it < cfg.max_iter else None
            results, reseed_due = receive(pending)
            batch_inertia = sum(r["inertia"] for r in results) / batch
            history.append(batch_inertia)
            movement = self._update_sculley(c, v, results)
            if reseed_due:
                pools = [r["pool"] for r in results if "pool" in r]
                reseeded += self._reseed_minibatch(c, v, np.concatenate(pools) if pools else c[:0], batch)
            pending = ahead
            if it % max(1, cfg.max_iter // 10) == 0:
                log.info("k-means mini-batch %d/%d: batch inertia %.5g, movement %.3g", it, cfg.max_iter, batch_inertia, movement)
            if it == 1:  # the first batch measures the initialisation, not progress
                continue
            ewa = batch_inertia if ewa is None else ewa * (1 - alpha) + batch_inertia * alpha
            if cfg.tol > 0 and movement < cfg.tol:
                log.info("k-means converged: centroid movement %.3g < tol at iteration %d", movement, it)
                break
            if ewa_min is None or ewa < ewa_min:
                ewa_min, no_improvement = ewa, 0
            else:
                no_improvement += 1
            if cfg.max_no_improvement and no_improvement >= cfg.max_no_improvement:
                log.info("k-means converged: no inertia improvement for %d iterations at %d", no_improvement, it)
                break
        return FitResult(c, it, float(history[-1] * self.n) if history else 0.0, reseeded, history=history, exchange="shared-memory" if exchange is not None else "object-store")

    def _lloyd(self, c: np.ndarray) -> FitResult:
        import ray

        cfg = self.cfg
        history = []
        reseeded = 0
        it = 0
        for it in range(1, cfg.max_iter + 1):
            ref = ray.put(c)
            results = self._get([a.lloyd_step.remote(ref) for a in self.actors])
            sums = np.sum([r["sums"] for r in results], axis=0, dtype=np.float64)
            counts = np.sum([r["counts"] for r in results], axis=0).astype(np.float64)
            inertia = float(sum(r["inertia"] for r in results))
            history.append(inertia)
            new = c.astype(np.float64).copy()
            full = counts > 0
            new[full] = sums[full] / counts[full, None]
            if self.cfg.metric == "cosine":
                new[full] = unit_rows(new[full])
            empty = np.flatnonzero(~full)
            if len(empty):
                reseeded += len(empty)
                new[empty] = self._farthest_rows(c, len(empty))
            movement = float(np.linalg.norm(new - c, axis=1).mean())
            c = new.astype(np.float32)
            log.info("k-means lloyd %d/%d: inertia %.6g, movement %.3g, empty %d", it, cfg.max_iter, inertia, movement, len(empty))
            if len(empty):
                continue
            if cfg.tol > 0 and movement < cfg.tol:
                break
            if cfg.tol > 0 and len(history) > 1 and abs(history[-2] - inertia) <= cfg.tol * max(abs(history[-2]), 1e-30):
                break
        return FitResult(c, it, history[-1] if history else 0.0, reseeded, history=history)

    def _farthest_rows(self, c: np.ndarray, m: int) -> np.ndarray:
        import ray

        ref = ray.put(c)
        parts = self._get([a.farthest.remote(ref, m) for a in self.actors])
        rows = np.concatenate([p[0] for p in parts])
        dists = np.concatenate([p[1] for p in parts])
        rows = rows[np.argsort(-dists, kind="stable")[:m]]
        return unit_rows(rows) if self.cfg.metric == "cosine" else rows
