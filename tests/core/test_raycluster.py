"""Demands checked before any stage runs (`check_demand`: never placeable, refused at once) and
when a stage starts its workers (`ensure_demand`: met now, met by nodes that join, or a one-line
error naming the setting: no node type can hold a worker, or nothing arrived in time)."""

from __future__ import annotations

import json

import pytest
import yaml

from rsdist.core import raycluster
from rsdist.core.raycluster import Demand, DemandError, check_demand, ensure_demand, fits

GPU_DEMAND = Demand({"CPU": 0.25, "GPU": 1.0}, {"CPU": "features.cpus_per_actor", "GPU": "features.device=cuda with features.gpus_per_actor"})


def test_a_demand_a_node_can_hold_returns_those_nodes(ray_session):
    nodes = ensure_demand(Demand({"CPU": 0.5}, {"CPU": "cluster.cpus_per_actor"}))
    assert nodes and all(fits({"CPU": 0.5}, n) for n in nodes)


def test_nothing_arriving_in_time_names_the_setting_and_the_timeout(ray_session):
    with pytest.raises(DemandError, match=r"^features.device=cuda with features.gpus_per_actor: each worker asks for CPU 0.25, GPU 1; .*ray.demand_timeout_s=1$"):
        ensure_demand(GPU_DEMAND, timeout_s=1)


def test_no_node_type_that_can_hold_it_fails_at_once(ray_session, tmp_path, monkeypatch):
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump({"available_node_types": {"head": {"resources": {"CPU": 2}}, "cpu_worker": {"resources": {"CPU": 16}, "max_workers": 4}}}))
    monkeypatch.setitem(raycluster._settings, "autoscaler_config", str(config))
    with pytest.raises(DemandError, match=r"^features.device=cuda with features.gpus_per_actor: .*no node type of its autoscaler can hold that$"):
        ensure_demand(GPU_DEMAND, timeout_s=600)
    memory = Demand({"CPU": 1.0, "memory": 64e9}, {"CPU": "train.cpus_per_worker", "memory": "train.memory_per_worker_gb"})
    config.write_text(yaml.safe_dump({"available_node_types": {"w": {"resources": {"CPU": 16, "memory": 32e9}}}}))
    with pytest.raises(DemandError, match=r"^train.memory_per_worker_gb: each worker asks for CPU 1, memory 64 GB"):
        ensure_demand(memory)


def test_auto_device_means_gpus_when_a_node_type_has_them():
    assert raycluster.use_gpus("auto", [{"CPU": 8}, {"CPU": 8, "GPU": 1}])
    assert not raycluster.use_gpus("auto", [{"CPU": 8}])
    assert raycluster.use_gpus("cuda", []) and not raycluster.use_gpus("cpu", [{"GPU": 8}])


def test_relative_run_dir_in_a_working_dir_job_is_refused(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    monkeypatch.setenv("PWD", "/tmp/ray/session/runtime_resources/working_dir_files/_ray_pkg_1")
    with pytest.raises(DemandError, match=r"^run_dir: 'runs/demo' is relative"):
        raycluster.check_job_run_dir("runs/demo")
    raycluster.check_job_run_dir("/data/runs/demo")
    raycluster.check_job_run_dir("s3://bucket/run")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    raycluster.check_job_run_dir("runs/demo")  # outside a job, relative paths are the user's own


def test_workers_that_start_together_are_counted(ray_session):
    """Ray Train's workers must all be placed at once: the session's one 2-CPU node holds two of
    one CPU, not five; an elastic pool's actors need only one to start."""
    five = Demand({"CPU": 1.0}, {"CPU": "train.cpus_per_worker"}, count=5, count_setting="train.num_workers")
    with pytest.raises(DemandError, match=r"^train.num_workers: 5 workers of 1 CPU each, but the Ray cluster can hold 2 \(1 node, 2 CPUs\)$"):
        check_demand(five)
    with pytest.raises(DemandError, match=r"^train.num_workers: 5 workers of CPU 1 each must start together; the nodes hold 2 and no node that can hold more joined within ray.demand_timeout_s=1$"):
        ensure_demand(five, timeout_s=1)
    elastic = Demand({"CPU": 1.0}, {"CPU": "features.cpus_per_actor"}, count=5, count_setting="features.num_actors", all_at_once=False)
    check_demand(elastic)
    assert ensure_demand(elastic, timeout_s=1)


def test_before_any_stage_a_worker_no_node_type_can_hold_is_refused(ray_session, tmp_path, monkeypatch):
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump({"available_node_types": {"head": {"resources": {"CPU": 0}}, "gpu_worker": {"resources": {"CPU": 8, "GPU": 1}}}}))
    monkeypatch.setitem(raycluster._settings, "autoscaler_config", str(config))
    check_demand(GPU_DEMAND)  # no GPU node yet: the autoscaler adds one when the stage asks
    check_demand(Demand({"CPU": 1.0}, {}, count=100))  # and as many as the stage wants
    with pytest.raises(DemandError, match=r"^features.device=cuda with features.gpus_per_actor: each worker asks for CPU 0.25, GPU 2; no node of the cluster and no node type"):
        check_demand(Demand({"CPU": 0.25, "GPU": 2.0}, GPU_DEMAND.settings))
