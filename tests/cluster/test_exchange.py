"""The same-node k-means exchange leaves nothing in /dev/shm: files private to their owner, unlinked
once the actors mapped them, and those of a driver killed before that removed by the next run."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np

from rsdist.cluster.exchange import PREFIX, SHM_DIR, SharedExchange, centroid_buffer, remove_stale, sums_buffer


def test_buffers_are_private_and_stay_mapped_after_unlink(tmp_path):
    ex = SharedExchange(str(tmp_path), k=6, dim=4, actors=2)
    try:
        assert all(os.path.basename(p).startswith(f"{PREFIX}{os.getpid()}-") for p in ex.paths)
        assert {stat.S_IMODE(os.stat(p).st_mode) for p in ex.paths} == {0o600}
        # an actor's side maps the files, then the driver unlinks them
        centroids = centroid_buffer(ex.centroid_path, 6, 4, "r")
        sums, ids = sums_buffer(ex.actor_prefixes[1], 6, 4, "r+")
        ex.unlink()
        assert list(tmp_path.iterdir()) == []
        ex.put_centroids(1, np.full((6, 4), 2.0, np.float32))
        assert centroids[1].sum() == 48  # the mapping still carries the driver's writes
        sums[0, :2] = 1.5
        ids[0, 0, :2] = [3, 4]
        ids[0, 1, :2] = [7, 8]
        got = ex.result(0, 1, {"touched": 2, "inertia": 0.5})
        assert got["idx"].tolist() == [3, 4] and got["counts"].tolist() == [7, 8] and got["sums"].sum() == 12
    finally:
        ex.close()


def test_files_of_a_dead_driver_are_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}-abc-centroids"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def-centroids"
    other = tmp_path / "something-else"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert remove_stale(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


FIT = """
import sys
import ray
from rsdist.cluster import engine, run
from rsdist.config import ClusterConfig
from rsdist.core.rundir import RunDir

ray.init(address=sys.argv[1], log_to_driver=False)
opened = engine.open_shared_exchange

def announce(*args, **kwargs):
    ex = opened(*args, **kwargs)
    print("exchange", ex.prefix if ex is not None else None, flush=True)
    return ex

engine.open_shared_exchange = announce
run(RunDir(sys.argv[2]), ClusterConfig(k=8, space="image", batch_size=256, init_sample=256, max_iter=10**7, tol=0.0, max_no_improvement=0, num_actors=2))
"""


def _files_of(pid: int) -> list[str]:
    return glob.glob(f"{SHM_DIR}/{PREFIX}{pid}-*")


def test_a_kill_mid_fit_leaves_no_exchange_file(ray_session, run_dir, tmp_path):
    """A driver SIGKILLed while its shard actors iterate through the exchange leaves no file behind."""
    from rsdist.bench.kmeans import write_blob_features

    write_blob_features(run_dir, 4000, 16, 8, shard_rows=1000)
    address = ray_session.get_runtime_context().gcs_address
    with open(tmp_path / "fit.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", FIT, address, run_dir.uri], stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, start_new_session=True)
    try:
        line = proc.stdout.readline()  # blocks until the exchange is opened (or the process ends)
        assert line.startswith("exchange ") and line.split()[1] != "None", f"no shared-memory exchange: {line!r} {(tmp_path / 'fit.log').read_text()[-2000:]}"
        assert os.path.basename(line.split()[1]).startswith(f"{PREFIX}{proc.pid}-")
        deadline = time.time() + 120
        while _files_of(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the actors iterate through the unlinked buffers
        assert proc.poll() is None, f"the fit ended before the kill: {(tmp_path / 'fit.log').read_text()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _files_of(proc.pid) == []
