"""`rsdist bench ingest`: records/s of the Ray Data path against a plain single-process read.

Both read the same source in the same run (by default a generated captions-txt source of
`--records` PNG images under a temporary folder) into separate run directories. Figures: records
and seconds of each path, records/s, the speed-up ratio, and the driver's resident memory: before
the runs, and its peak during each run (sampled every 50 ms from /proc, so each path gets its own).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import threading
import time

import numpy as np


def _generate(root: str, records: int, side: int) -> None:
    """A captions-txt source: `images/<Class>/<name>.png` + train_filename.txt + train_caps.txt."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names, caps = [], []
    for i in range(records):
        cls = f"Class{i % 10}"
        os.makedirs(os.path.join(root, "images", cls), exist_ok=True)
        name = f"img_{i:07d}.png"
        arr = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        with open(os.path.join(root, "images", cls, name), "wb") as f:
            f.write(buf.getvalue())
        names.append(name)
        caps += [f"scene {i} of class {cls}"] * 5
        if (i + 1) % 5000 == 0:
            print(f"bench ingest: generated {i + 1}/{records} images", file=sys.stderr)
    os.makedirs(os.path.join(root, "captions"), exist_ok=True)
    with open(os.path.join(root, "captions", "train_filename.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "captions", "train_caps.txt"), "w") as f:
        f.write("\n".join(caps) + "\n")


def _rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class _PeakRSS:
    """Samples the driver's RSS in a thread while a block runs; `.peak` is the highest seen."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _timed_ingest(source: str, out: str, engine: str, shard_rows: int) -> tuple[int, float, float]:
    from rsdist.config import DataConfig
    from rsdist.ingest import stage as ingest
    from rsdist.core.rundir import RunDir

    start = time.perf_counter()
    with _PeakRSS() as rss:
        result = ingest.run(RunDir(out), DataConfig(source=source, engine=engine, shard_rows=shard_rows))
    return result.rows_in, time.perf_counter() - start, rss.peak


def bench(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rsdist bench ingest", description=__doc__)
    p.add_argument("--source", help="Source to read (default: a generated captions-txt source).")
    p.add_argument("--records", type=int, default=4000, help="Images of the generated source.")
    p.add_argument("--side", type=int, default=64, help="Side in pixels of the generated images.")
    p.add_argument("--shard-rows", type=int, default=512)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray when none is running.")
    args = p.parse_args(argv)

    from rsdist.core.raycluster import cluster_cpus, init_ray

    init_ray(num_cpus=args.num_cpus)
    with tempfile.TemporaryDirectory(prefix="rsdist-bench-ingest-") as tmp:
        source = args.source
        if source is None:
            source = os.path.join(tmp, "source")
            _generate(source, args.records, args.side)
        rss_before = _rss_mb()
        print("bench ingest: single-process read...", file=sys.stderr)
        n_local, t_local, rss_local = _timed_ingest(source, os.path.join(tmp, "local"), "local", args.shard_rows)
        print(f"bench ingest: single-process {n_local} records in {t_local:.1f}s; Ray Data read...", file=sys.stderr)
        n_ray, t_ray, rss_ray = _timed_ingest(source, os.path.join(tmp, "ray"), "ray", args.shard_rows)
        print(f"bench ingest: Ray Data {n_ray} records in {t_ray:.1f}s", file=sys.stderr)
    return {
        "records": n_ray,
        "cluster_cpus": cluster_cpus(),
        "local_seconds": round(t_local, 3),
        "ray_seconds": round(t_ray, 3),
        "local_records_per_s": round(n_local / t_local, 1),
        "ray_records_per_s": round(n_ray / t_ray, 1),
        "ray_vs_local_speedup": round(t_local / t_ray, 3),
        "driver_rss_before_mb": round(rss_before, 1),
        "driver_peak_rss_local_mb": round(rss_local, 1),
        "driver_peak_rss_ray_mb": round(rss_ray, 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench(sys.argv[1:])))
