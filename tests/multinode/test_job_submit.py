"""`ray job submit` on a multi-node cluster (head without CPUs, worker nodes of 2 and 1 CPUs, token
authentication), on a fresh run directory, losing worker nodes during features, k-means, select
and training: the job finishes, every sample is written exactly once, features finish on the node
left when no node replaces the lost one (an elastic model-actor pool), and training resumes from
its last epoch checkpoint instead of starting over. Every wait is bounded: a job that stops making
progress fails the test with the stage it was in, never hangs it."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tests.multinode.nodes import REPO, LocalCluster

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 600  # the whole job, node losses included (about 3 minutes on an idle 2-core machine)
ALONE_TIMEOUT_S = 240  # features on the 1-CPU node alone

SETTINGS = {
    "data": {"source": "synthetic", "synthetic_per_class": 6, "test_fraction": 0.2},
    "features": {"encoder": "tiny", "image_size": 32, "batch_size": 8},
    "cluster": {"k": 4, "max_iter": 20},
    "select": {"method": "shift", "budget": 0.34},
    # 0.75 CPU a worker: the 1-CPU node holds one, so the 2-CPU node always hosts a worker
    "train": {"num_workers": 2, "epochs": 6, "batch_size": 8, "embed_dim": 16, "cpus_per_worker": 0.75, "max_failures": 3},
    "eval": {"baseline": False},
}


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.big = c.add_worker(2)
        c.small = c.add_worker(1)
        yield c
    finally:
        c.stop()


def submit(cluster: LocalCluster, tmp_path, settings: dict, run_dir: str) -> str:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(settings))
    out = cluster.ray("job", "submit", "--no-wait", "--working-dir", REPO, "--", "rsdist", "run", str(config), "--out", run_dir, timeout=180)
    found = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    return found.group(0)


def job_state(cluster: LocalCluster, job_id: str) -> str:
    """SUCCEEDED, FAILED, STOPPED, or RUNNING (also when the job server did not answer in time)."""
    try:
        out = cluster.ray("job", "status", job_id, timeout=60)
    except subprocess.TimeoutExpired:
        return "RUNNING"
    said = (out.stdout + out.stderr).lower()  # e.g. "Job 'raysubmit_...' succeeded"
    return next((s.upper() for s in ("succeeded", "failed", "stopped") if f"' {s}" in said), "RUNNING")


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    try:
        return cluster.ray("job", "logs", job_id, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return "(the job server did not give the logs within 60 s)"


def stages_done(run_dir: str) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(run_dir, "*", "_SUCCESS.json")))


def wait_job(cluster: LocalCluster, job_id: str, timeout: float, run_dir: str | None = None) -> tuple[str, str]:
    """The job's end state and logs; a job still running after `timeout` seconds is stopped and
    reported as TIMEOUT with the stages it had finished (never an open-ended wait)."""
    deadline = time.monotonic() + timeout
    state = job_state(cluster, job_id)
    while state == "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
        state = job_state(cluster, job_id)
    if state == "RUNNING":
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.ray("job", "stop", "--no-wait", job_id, timeout=60)
        state = f"TIMEOUT after {timeout:.0f} s, stages finished: {stages_done(run_dir) if run_dir else '?'}"
    return state, job_logs(cluster, job_id)


def wait_for_path(run_dir: str, stage: str, pattern: str, done: threading.Event, timeout: float) -> bool:
    """Whether `<run_dir>/<stage>/<pattern>` appeared within `timeout` seconds (False once the job ended)."""
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        if glob.glob(os.path.join(run_dir, stage, pattern)):
            return True
        time.sleep(0.2)
    return False


def lose_the_big_node_during(cluster: LocalCluster, run_dir: str, moments: list[tuple[str, str, bool]], record: dict, done: threading.Event) -> None:
    """At each moment (a stage folder, a glob that must exist in it, whether a new node replaces the
    lost one at once), SIGKILL the 2-CPU node; record whether the stage was still running when its
    node went. Without a replacement at once, the stage must finish on the nodes left (recorded as
    `<stage>_on_nodes_left`); a new 2-CPU node then joins (what an autoscaler does)."""
    for stage, pattern, replace_at_once in moments:
        if not wait_for_path(run_dir, stage, pattern, done, JOB_TIMEOUT_S):
            return
        running = not os.path.exists(os.path.join(run_dir, stage, "_SUCCESS.json"))
        cluster.kill(cluster.big)
        record[stage] = running
        if not replace_at_once:
            record[f"{stage}_on_nodes_left"] = wait_for_path(run_dir, stage, "_SUCCESS.json", done, ALONE_TIMEOUT_S)
        record[f"{stage}_replaced"] = replace_big_node(cluster, done)


def replace_big_node(cluster: LocalCluster, done: threading.Event, attempts: int = 2, timeout: float = 120) -> bool:
    """Start a new 2-CPU node in place of the lost one (what an autoscaler does) and wait until it
    has joined; a node that does not join in time (a start that timed out on a busy machine) is
    stopped and another started. Whether one joined."""
    for _ in range(attempts):
        known = cluster.alive_node_ids()
        cluster.big = cluster.add_worker(2, wait=False)
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if cluster.alive_node_ids() - known:
                return True
            time.sleep(1)
        if done.is_set():
            return False
        cluster.kill(cluster.big)
    return False


def ids(path: str) -> list[str]:
    return [sid for f in sorted(glob.glob(os.path.join(path, "*.parquet"))) for sid in pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()]


def test_submitted_job_on_a_fresh_run_dir_survives_lost_nodes(cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    job_id = submit(cluster, tmp_path, SETTINGS, run_dir)
    kills: dict[str, bool] = {}
    done = threading.Event()
    # features: no new node until the pass is done (the pool goes on with the 1-CPU node alone);
    # training: once epoch 2's checkpoint folder appears, so epoch 1's is complete whether or not
    # Ray Train has registered it yet
    moments = [("features", "_STARTED.json", False), ("clusters", "_STARTED.json", True), ("selection", "_STARTED.json", True),
               ("checkpoints", "ray/train/epoch_0002*", True)]
    killer = threading.Thread(target=lose_the_big_node_during, args=(cluster, run_dir, moments, kills, done), daemon=True)
    killer.start()
    state, logs = wait_job(cluster, job_id, JOB_TIMEOUT_S, run_dir)
    done.set()
    killer.join(timeout=30)
    assert state == "SUCCEEDED", f"{state}; kills: {kills}; the job's log ends:\n{logs[-4000:]}"
    assert "oneMKL" not in logs
    # the node went while features and training were running; features finished on the node
    # left, training went on from its checkpoint
    assert kills.get("features") and kills.get("checkpoints"), kills
    assert kills.get("features_on_nodes_left"), f"features did not finish within {ALONE_TIMEOUT_S} s on the node left: {kills}"
    assert re.search(r"train: resuming after epoch [1-9]", logs), logs[-4000:]
    shards, features, clusters = ids(os.path.join(run_dir, "shards")), ids(os.path.join(run_dir, "features")), ids(os.path.join(run_dir, "clusters"))
    assert len(set(shards)) == len(shards) == len(features) and set(features) == set(shards)
    assert len(set(clusters)) == len(clusters) > 0
    manifest = pq.read_table(os.path.join(run_dir, "selection", "manifest.parquet")).column("sample_id").to_pylist()
    assert len(set(manifest)) == len(manifest) == len(clusters)
    assert os.path.exists(os.path.join(run_dir, "summary.json"))


def test_relative_run_dir_in_a_job_is_refused(cluster, tmp_path):
    """Relative paths in a `--working-dir` job land in Ray's temporary copy of it: one-line error."""
    job_id = submit(cluster, tmp_path, SETTINGS, "runs/demo")
    state, logs = wait_job(cluster, job_id, 300)
    assert state == "FAILED"
    assert "rsdist: error: run_dir: 'runs/demo' is relative" in logs
