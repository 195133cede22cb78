"""Embedding shards and the Ray actors that own them.

The features folder is cut into *units*: one parquet row group, or a slice of at most `UNIT_ROWS`
rows of one. Units depend only on the files, never on how many actors there are, so the labelling
pass can write one output file per unit and a resumed run finds the same names. The driver reads
only parquet metadata to plan units; each `ShardActor` reads its own units, keeps their training
rows (split == "train") as one float32 matrix on its device, and answers the per-iteration calls
of the k-means driver (mini-batch sums, full-pass sums, k-means|| rounds, samples, labelling).
"""

from __future__ import annotations

import logging
import math
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rsdist.cluster.backends import make_backend
from rsdist.io.rundir import RunDir

log = logging.getLogger("rsdist")

UNIT_ROWS = 65536
SPACE_COLUMNS = {"joint": ["image_emb", "text_emb"], "image": ["image_emb"], "text": ["text_emb"]}


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
    with run.fs.open(run.path(unit.path), "rb") as fh:
        table = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=columns)
    return table.slice(unit.start, unit.rows)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, name: str, where: str) -> np.ndarray:
    """A list-of-float column as an (n, d) float32 matrix; nulls, ragged rows and NaNs name the row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        row = int(pc.index(pc.is_null(arr), True).as_py())
        raise ValueError(f"{where}: column {name} is null in row {row}")
    if not (pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise ValueError(f"{where}: column {name} has type {arr.type}, expected a list of floats")
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if n else 0
        if n and (lengths != dim).any():
            row = int(np.argmax(lengths != dim))
            raise ValueError(f"{where}: column {name} row {row} has {lengths[row]} values, expected {dim}")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        raise ValueError(f"{where}: column {name} row {int(np.argmax(bad))} holds a NaN or infinite value")
    return values


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def space_vectors(table: pa.Table, space: str, where: str) -> np.ndarray:
    """The rows' vectors in the clustering space: each tower l2-normalised; joint = concat / sqrt(2)."""
    parts = [l2_normalise(embedding_matrix(table.column(c), c, where)) for c in SPACE_COLUMNS[space]]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=1) / np.float32(math.sqrt(len(parts)))


def train_rows(table: pa.Table, where: str) -> pa.Table:
    if "split" not in table.column_names:
        raise ValueError(f"{where}: column 'split' is missing")
    return table.filter(pc.equal(table.column("split"), "train"))


class ShardActor:
    """Owns some units' training rows as one matrix on its device; made a Ray actor by the stage."""

    def __init__(self, run_uri: str, units: list[Unit], space: str, metric: str, backend: str, chunk_bytes: int, threads: int = 1):
        torch.set_num_threads(max(1, int(threads)))
        import ray

        has_gpu = bool(ray.get_gpu_ids()) if ray.is_initialized() else False
        self.run = RunDir(run_uri)
        self.units = units
        self.space = space
        self.metric = metric
        self.backend = make_backend(backend, metric, chunk_bytes, has_gpu)
        self.device = self.backend.device
        blocks = [self._vectors(u)[1] for u in units]
        x = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
        self.x = torch.from_numpy(x).to(self.device)
        self.d2: torch.Tensor | None = None

    def _vectors(self, unit: Unit, extra: list[str] = ()) -> tuple[pa.Table, np.ndarray]:
        where = f"{self.run.url(unit.path)} (row group {unit.row_group}, rows {unit.start}-{unit.stop})"
        table = train_rows(read_unit(self.run, unit, list(extra) + ["split"] + SPACE_COLUMNS[self.space]), where)
        return table, space_vectors(table, self.space, where)

    def _centroids(self, centroids: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(centroids, dtype=np.float32), device=self.device)

    def info(self) -> dict:
        return {"rows": int(self.x.shape[0]), "dim": int(self.x.shape[1]) if self.x.ndim == 2 else 0, "backend": self.backend.name}

    def sample(self, m: int, seed: list[int]) -> np.ndarray:
        """`m` of this actor's rows drawn uniformly without replacement."""
        n = self.x.shape[0]
        idx = np.random.default_rng(seed).choice(n, size=min(m, n), replace=False)
        return self.x[torch.from_numpy(np.sort(idx))].cpu().numpy()

    def minibatch_step(self, centroids: np.ndarray, m: int, seed: list[int], pool: int = 0) -> dict:
        """Assign `m` rows drawn with replacement; return per-centroid sums and counts of the touched
        centroids only (sparse, so large k costs what the batch touches), the batch inertia, and
        `pool` of the batch rows as re-seeding candidates."""
        rng = np.random.default_rng(seed)
        xb = self.x[torch.from_numpy(rng.integers(0, self.x.shape[0], size=m))]
        labels, dists = self.backend.assign(xb, self._centroids(centroids))
        touched, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(touched), xb.shape[1], device=self.device).index_add_(0, inverse, xb)
        counts = torch.bincount(inverse, minlength=len(touched))
        out = {
            "idx": touched.cpu().numpy(),
            "sums": sums.cpu().numpy(),
            "counts": counts.cpu().numpy(),
            "inertia": float(dists.double().sum()),
        }
        if pool:
            out["pool"] = xb[torch.from_numpy(rng.choice(m, size=min(pool, m), replace=False))].cpu().numpy()
        return out

    def lloyd_step(self, centroids: np.ndarray) -> dict:
        """One full pass: dense per-centroid sums and counts of every owned row, and its inertia."""
        c = self._centroids(centroids)
        labels, dists = self.backend.assign(self.x, c)
        sums = torch.zeros_like(c).index_add_(0, labels, self.x)
        counts = torch.bincount(labels, minlength=c.shape[0])
        return {"sums": sums.cpu().numpy(), "counts": counts.cpu().numpy(), "inertia": float(dists.double().sum())}

    def farthest(self, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The `m` owned rows farthest from their nearest centroid, with those distances."""
        _, dists = self.backend.assign(self.x, self._centroids(centroids))
        m = min(m, dists.shape[0])
        best = torch.topk(dists, m).indices
        return self.x[best].cpu().numpy(), dists[best].cpu().numpy()

    def kpar_update(self, centers: np.ndarray) -> float:
        """k-means||: fold new centers into each row's distance to the candidate set; return the sum."""
        _, dists = self.backend.assign(self.x, self._centroids(centers))
        self.d2 = dists if self.d2 is None else torch.minimum(self.d2, dists)
        return float(self.d2.double().sum())

    def kpar_sample(self, oversampling: float, phi: float, seed: list[int]) -> np.ndarray:
        """k-means||: keep each row with probability min(1, l * d(x) / phi)."""
        p = (oversampling * self.d2.double() / max(phi, 1e-30)).clamp_(max=1.0).cpu().numpy()
        keep = np.flatnonzero(np.random.default_rng(seed).random(len(p)) < p)
        return self.x[torch.from_numpy(keep).to(self.device)].cpu().numpy()

    def nearest_counts(self, centers: np.ndarray) -> np.ndarray:
        """How many owned rows have each center as their nearest (the k-means|| weights)."""
        self.d2 = None
        c = self._centroids(centers)
        labels, _ = self.backend.assign(self.x, c)
        return torch.bincount(labels, minlength=c.shape[0]).cpu().numpy()

    def label_unit(self, unit: Unit, centroids: np.ndarray, folder: str) -> dict:
        """Write `<folder>/<unit>.parquet` (sample_id, cluster, dist) unless it is already there, and
        return its per-cluster counts and inertia, so a resumed pass redoes only missing units."""
        k = len(centroids)
        name = unit.output_name()
        if self.run.exists(folder, name):
            t = self.run.read_table(folder, name, columns=["cluster", "dist"])
            labels = t.column("cluster").to_numpy()
            dists = t.column("dist").to_numpy().astype(np.float64)
            skipped = True
        else:
            table, x = self._vectors(unit, extra=["sample_id"])
            lab, d = self.backend.assign(torch.from_numpy(x).to(self.device), self._centroids(centroids))
            labels = lab.cpu().numpy().astype(np.int32)
            d = d.cpu().numpy()
            dists = np.sqrt(d) if self.metric == "euclidean" else d
            out = pa.table(
                {
                    "sample_id": table.column("sample_id").cast(pa.string()),
                    "cluster": pa.array(labels, pa.int32()),
                    "dist": pa.array(dists.astype(np.float32), pa.float32()),
                }
            )
            self.run.write_table(out, folder, name)
            dists = dists.astype(np.float64)
            skipped = False
        inertia = float((dists**2).sum() if self.metric == "euclidean" else dists.sum())
        return {"rows": int(len(labels)), "counts": np.bincount(labels, minlength=k), "inertia": inertia, "skipped": skipped}
