"""Embedding shards and the Ray actors that own them.

The features folder is cut into *units*: one parquet row group, or a slice of at most `UNIT_ROWS`
rows of one. Units depend only on the files, never on how many actors there are, so the labelling
pass can write one output file per unit and a resumed run finds the same names. The driver reads
only parquet metadata to plan units; each `ShardActor` reads its own units, keeps their training
rows (split == "train") as one float32 matrix on its device, and answers the per-iteration calls
of the k-means driver (mini-batch sums, full-pass sums, k-means|| rounds, samples, labelling).
"""

from __future__ import annotations

import importlib
import logging
import math
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from rsdist.cluster.backends import make_backend
from rsdist.core.rundir import RunDir
from rsdist.core.tables import SPACE_COLUMNS, space_dim, space_vectors

log = logging.getLogger("rsdist")

UNIT_ROWS = 65536


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of row group `row_group` of parquet file `path` (a run-relative path)."""

    path: str
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def output_name(self) -> str:
        stem = posixpath.basename(self.path).rsplit(".", 1)[0]
        return f"{stem}-g{self.row_group:04d}-r{self.start:09d}.parquet"


def plan_units(run: RunDir, folder: str = "features", unit_rows: int = UNIT_ROWS) -> list[Unit]:
    """Cut every parquet file of `folder` into units, from metadata only."""
    files = run.parquet_files(folder)
    if not files:
        raise FileNotFoundError(f"{run.url(folder)}: no parquet files to cluster (run the features stage first)")
    units = []
    for f in files:
        rel = posixpath.relpath(f, run.root)
        with run.fs.open(f, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            for lo in range(0, n, unit_rows):
                units.append(Unit(rel, g, lo, min(n, lo + unit_rows)))
    return units


def split_units(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Deal units to `parts` owners, each unit to the owner with the fewest rows so far (stable)."""
    owners: list[list[Unit]] = [[] for _ in range(parts)]
    load = [0] * parts
    for u in units:
        i = min(range(parts), key=lambda j: (load[j], j))
        owners[i].append(u)
        load[i] += u.rows
    return owners


def read_unit(run: RunDir, unit: Unit, columns: list[str]) -> pa.Table:
    """One unit's columns. Decoded on the calling thread: a shard actor has about one CPU, and
    arrow's thread pool made the read ~2.5x slower there (0.59 s instead of 0.22 s for 50,000 x 384)."""
    if isinstance(run.fs, LocalFileSystem):  # arrow's own reader, memory-mapped: no Python file object in between
        table = pq.ParquetFile(run.path(unit.path), memory_map=True).read_row_group(unit.row_group, columns=columns, use_threads=False)
    else:
        with run.fs.open(run.path(unit.path), "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=columns, use_threads=False)
    return table.slice(unit.start, unit.rows)


def train_rows(table: pa.Table, where: str) -> pa.Table:
    if "split" not in table.column_names:
        raise ValueError(f"{where}: column 'split' is missing")
    keep = pc.equal(table.column("split"), "train")
    if pc.all(keep).as_py() and not keep.null_count:
        return table  # all training rows: no filtered copy
    return table.filter(keep)


def batch_sums(backend, xb: torch.Tensor, centroids: torch.Tensor) -> dict:
    """Assign the batch rows; per-centroid sums and counts of the touched centroids only (sparse,
    so large k costs what the batch touches), and the batch inertia."""
    labels, dists = backend.assign(xb, centroids)
    touched, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(touched), xb.shape[1], device=xb.device).index_add_(0, inverse, xb)
    counts = torch.bincount(inverse, minlength=len(touched))
    return {"idx": touched.cpu().numpy(), "sums": sums.cpu().numpy(), "counts": counts.cpu().numpy(), "inertia": float(dists.double().sum())}


def full_sums(backend, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One full pass over `x`: dense per-centroid sums and counts (on x's device), and the inertia."""
    labels, dists = backend.assign(x, centroids)
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=centroids.shape[0])
    return sums, counts, float(dists.double().sum())


ARROW_DECAY_MS = 10_000


def reuse_arrow_pages(decay_ms: int = ARROW_DECAY_MS) -> None:
    """Let arrow's jemalloc keep freed pages for `decay_ms` before returning them to the OS.

    pyarrow's default (0) returns every unit's decode buffers at once, so the next unit's 75 MB
    are page-faulted anew (`rsdist bench kmeans --micro`, "arrow_pages"). Affects arenas made after
    the call, so the actor calls it before its first read; a pyarrow without jemalloc is left alone."""
    try:
        pa.jemalloc_set_decay_ms(decay_ms)
    except (NotImplementedError, AttributeError):
        pass


def disable_numpy_huge_pages() -> bool:
    """Stop numpy asking for transparent huge pages (madvise) for its large arrays in this process;
    return whether it asked before.

    Where the kernel's THP defrag setting is "madvise" (a common default) each 2 MB fault may
    compact memory synchronously, and on a host whose memory is fragmented a shard actor's load of
    500,000 x 384 rows took 4.2-4.4 s instead of 1.9-2.9 s (`rsdist bench kmeans --micro`,
    "huge_pages", three runs). The matrix is written once and then read in random rows, where 4 KiB pages cost
    nothing measurable per iteration. (numpy's switch is private but has been there since 1.20;
    the environment variable NUMPY_MADVISE_HUGEPAGE does the same at import, but setting it for
    an actor takes a Ray runtime_env, which gives each actor a worker process of its own to start.)"""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return bool(importlib.import_module(module)._set_madvise_hugepage(False))
        except (ImportError, AttributeError):
            continue
    return False


class ShardActor:
    """Owns some units' training rows as one matrix on its device (and their sample_ids, for the
    labelling pass); made a Ray actor by the stage."""

    def __init__(self, run_uri: str, units: list[Unit], space: str, metric: str, backend: str, chunk_bytes: int, threads: int = 1, precision: str = "float32"):
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        disable_numpy_huge_pages()
        reuse_arrow_pages()
        import ray

        has_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else False
        self.run = RunDir(run_uri)
        self.units = units
        self.space = space
        self.metric = metric
        self.backend = make_backend(backend, metric, chunk_bytes, has_gpu, precision)
        self.device = self.backend.device
        x, self.ids, self.spans = self._load(units)
        self.x = torch.from_numpy(x).to(self.device)
        self.d2: torch.Tensor | None = None
        self.kpar_x: torch.Tensor | None = None  # the rows k-means|| works on (kpar_begin)
        self.shared: tuple | None = None  # same-node exchange buffers, while a fit uses them
        self.load_seconds = time.perf_counter() - t0

    def _where(self, unit: Unit) -> str:
        return f"{self.run.url(unit.path)} (row group {unit.row_group}, rows {unit.start}-{unit.stop})"

    def _load(self, units: list[Unit]) -> tuple[np.ndarray, dict, dict]:
        """Read every unit's training rows straight into one preallocated float32 matrix (sized by
        the units' row counts, trimmed when test rows left much of it unused); sample_ids and each
        unit's row span in the matrix are kept for the labelling pass."""
        buf, n, ids, spans = None, 0, {}, {}
        capacity = sum(u.rows for u in units)
        for u in units:
            where = self._where(u)
            table = train_rows(read_unit(self.run, u, ["sample_id", "split"] + SPACE_COLUMNS[self.space]), where)
            if buf is None and table.num_rows:
                buf = np.empty((capacity, space_dim(table, self.space, where)), np.float32)
            if table.num_rows:
                space_vectors(table, self.space, where, out=buf[n : n + table.num_rows])
            ids[u] = table.column("sample_id").cast(pa.string())
            spans[u] = (n, n + table.num_rows)
            n += table.num_rows
        if buf is None:
            return np.zeros((0, 0), np.float32), ids, spans
        return (buf[:n].copy() if n < 0.9 * capacity else buf[:n]), ids, spans

    def _centroids(self, centroids: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(centroids, dtype=np.float32), device=self.device)

    def info(self) -> dict:
        return {
            "rows": int(self.x.shape[0]),
            "dim": int(self.x.shape[1]) if self.x.ndim == 2 else 0,
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "load_seconds": self.load_seconds,
        }

    def sample(self, m: int, seed: list[int]) -> np.ndarray:
        """`m` of this actor's rows drawn uniformly without replacement."""
        n = self.x.shape[0]
        idx = np.random.default_rng(seed).choice(n, size=min(m, n), replace=False)
        return self.x[torch.from_numpy(np.sort(idx))].cpu().numpy()

    def minibatch_step(self, centroids: np.ndarray, m: int, seed: list[int], pool: int = 0) -> dict:
        """Assign `m` rows drawn with replacement; return `batch_sums` of them, and `pool` of the
        batch rows as re-seeding candidates."""
        rng = np.random.default_rng(seed)
        # index_select: 4x faster than x[idx] for a few thousand random rows (`rsdist bench kmeans --micro`)
        xb = self.x.index_select(0, torch.from_numpy(rng.integers(0, self.x.shape[0], size=m)).to(self.device))
        out = batch_sums(self.backend, xb, self._centroids(centroids))
        if pool:
            out["pool"] = xb[torch.from_numpy(rng.choice(m, size=min(pool, m), replace=False)).to(self.device)].cpu().numpy()
        return out

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def attach_exchange(self, centroid_path: str, prefix: str, k: int, dim: int) -> None:
        """Map the driver's same-node exchange buffers (rsdist/cluster/exchange.py)."""
        from rsdist.cluster.exchange import centroid_buffer, sums_buffer

        self.shared = (centroid_buffer(centroid_path, k, dim, "r"), *sums_buffer(prefix, k, dim, "r+"))

    def detach_exchange(self) -> None:
        self.shared = None

    def minibatch_step_shared(self, slot: int, m: int, seed: list[int], pool: int = 0) -> dict:
        """`minibatch_step` with the centroids read from, and the sums written to, the exchange
        buffers' `slot`; returns the touched count, the inertia and any re-seeding candidates."""
        centroids, sums, ids = self.shared
        out = self.minibatch_step(centroids[slot], m, seed, pool)
        n = len(out["idx"])
        sums[slot, :n] = out["sums"]
        ids[slot, 0, :n] = out["idx"]
        ids[slot, 1, :n] = out["counts"]
        reply = {"touched": n, "inertia": out["inertia"]}
        if "pool" in out:
            reply["pool"] = out["pool"]
        return reply

    def lloyd_step(self, centroids: np.ndarray) -> dict:
        """One full pass: dense per-centroid sums and counts of every owned row, and its inertia."""
        sums, counts, inertia = full_sums(self.backend, self.x, self._centroids(centroids))
        return {"sums": sums.cpu().numpy(), "counts": counts.cpu().numpy(), "inertia": inertia}

    def farthest(self, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The `m` owned rows farthest from their nearest centroid, with those distances."""
        _, dists = self.backend.assign(self.x, self._centroids(centroids))
        m = min(m, dists.shape[0])
        best = torch.topk(dists, m).indices
        return self.x[best].cpu().numpy(), dists[best].cpu().numpy()

    def kpar_begin(self, m: int, seed: list[int]) -> None:
        """k-means||: work on `m` of this actor's rows drawn uniformly (all of them when m covers them)."""
        n = self.x.shape[0]
        if m >= n:
            self.kpar_x = self.x
        else:
            idx = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
            self.kpar_x = self.x.index_select(0, torch.from_numpy(idx).to(self.device))
        self.d2 = None

    def kpar_update(self, centers: np.ndarray) -> float:
        """k-means||: fold new centers into each row's distance to the candidate set; return the sum."""
        _, dists = self.backend.assign(self.kpar_x, self._centroids(centers))
        self.d2 = dists if self.d2 is None else torch.minimum(self.d2, dists)
        return float(self.d2.double().sum())

    def kpar_sample(self, oversampling: float, phi: float, seed: list[int]) -> np.ndarray:
        """k-means||: keep each row with probability min(1, l * d(x) / phi)."""
        p = (oversampling * self.d2.double() / max(phi, 1e-30)).clamp_(max=1.0).cpu().numpy()
        keep = np.flatnonzero(np.random.default_rng(seed).random(len(p)) < p)
        return self.kpar_x[torch.from_numpy(keep).to(self.device)].cpu().numpy()

    def nearest_counts(self, centers: np.ndarray) -> np.ndarray:
        """How many of the k-means|| rows have each center as their nearest (its weights)."""
        c = self._centroids(centers)
        labels, _ = self.backend.assign(self.kpar_x, c)
        self.d2 = self.kpar_x = None
        return torch.bincount(labels, minlength=c.shape[0]).cpu().numpy()

    def label_unit(self, unit: Unit, centroids: np.ndarray, folder: str) -> dict:
        """Write `<folder>/<unit>.parquet` (sample_id, cluster, dist) from the rows in memory unless
        it is already there, and return its per-cluster counts and inertia, so a resumed pass
        redoes only missing units."""
        k = len(centroids)
        name = unit.output_name()
        if self.run.exists(folder, name):
            t = self.run.read_table(folder, name, columns=["cluster", "dist"])
            labels = t.column("cluster").to_numpy()
            dist = t.column("dist").to_numpy()
            skipped = True
        else:
            lo, hi = self.spans[unit]
            lab, d = self.backend.assign(self.x[lo:hi], self._centroids(centroids))
            if self.metric == "euclidean":
                d = d.sqrt_()
            labels = lab.to(torch.int32).cpu().numpy()
            dist = d.cpu().numpy()
            out = pa.table({"sample_id": self.ids[unit], "cluster": pa.array(labels, pa.int32()), "dist": pa.array(dist, pa.float32())})
            self.run.write_table(out, folder, name)
            skipped = False
        dist = dist.astype(np.float64)
        inertia = float(np.dot(dist, dist) if self.metric == "euclidean" else dist.sum())
        return {"rows": int(len(labels)), "counts": np.bincount(labels, minlength=k), "inertia": inertia, "skipped": skipped}
