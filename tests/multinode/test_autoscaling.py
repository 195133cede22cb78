"""Autoscaling from zero GPU nodes, with Ray's fake multi-node provider (the real autoscaler,
starting and stopping local nodes): a stage whose device is cuda asks for a GPU no node has, the
autoscaler adds a GPU node type, the stage runs there, and the node is released when idle. A
demand no node type can meet ends the run at once with one line naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.multinode.nodes import REPO, LocalCluster

pytestmark = pytest.mark.slow

EMPTY = {"initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
         "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
         "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def autoscaler_config() -> dict:
    return {
        "cluster_name": "rsdist-fake",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # a GPU node as Ray counts it (logical GPUs; torch on it finds no CUDA and computes on CPU)
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 200 * 1024 * 1024}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,
        **EMPTY,
    }


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(autoscaling_config=autoscaler_config())
    try:
        yield c
    finally:
        c.stop()


def rsdist(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    return subprocess.run([sys.executable, "-m", "rsdist.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def gpu_nodes(cluster: LocalCluster) -> int:
    return sum(1 for n in cluster.node_resources() if n.get("GPU", 0) >= 1)


def test_cuda_stage_scales_a_gpu_node_up_from_zero_and_back(cluster, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "synthetic", "synthetic_per_class": 4, "test_fraction": 0.2},
        "features": {"encoder": "tiny", "image_size": 32, "batch_size": 16, "device": "cuda"},
        "ray": {"autoscaler_config": cluster.autoscaler_config, "demand_timeout_s": 300},
    }))
    run = str(tmp_path / "run")
    assert gpu_nodes(cluster) == 0
    ingest = rsdist(cluster, "ingest", str(config), "--out", run)
    assert ingest.returncode == 0, ingest.stdout[-2000:] + ingest.stderr[-2000:]
    features = rsdist(cluster, "features", str(config), "--out", run)
    out = features.stdout + features.stderr
    assert features.returncode == 0, out[-3000:]
    assert "waiting up to 300 s for a node that can hold" in out
    assert "1.0 GPU" in out  # the pool's actors asked for the GPU the new node brought
    assert os.path.exists(os.path.join(run, "features", "_SUCCESS.json"))
    # idle, the GPU node goes away again
    LocalCluster.wait_for(lambda: gpu_nodes(cluster) == 0, 180, "the idle GPU node's release")


def test_a_demand_no_node_type_can_meet_is_one_line_naming_the_setting(cluster, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "synthetic", "synthetic_per_class": 4},
        "features": {"encoder": "tiny", "image_size": 32, "device": "cuda", "gpus_per_actor": 2},
        "ray": {"autoscaler_config": cluster.autoscaler_config},
    }))
    run = str(tmp_path / "run")
    assert rsdist(cluster, "ingest", str(config), "--out", run).returncode == 0
    started = time.monotonic()
    features = rsdist(cluster, "features", str(config), "--out", run)
    assert features.returncode == 2
    last = features.stderr.strip().splitlines()[-1]
    assert last.startswith("rsdist: error: features.device=cuda with features.gpus_per_actor: each worker asks for"), last
    assert "no node type" in last and time.monotonic() - started < 120
