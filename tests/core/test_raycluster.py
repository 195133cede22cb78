"""Demands checked before a stage starts its workers: met now, met by a node that joins, or a
one-line error naming the setting (no node type can hold it, or nothing arrived in time)."""

from __future__ import annotations

import json

import pytest
import yaml

from rsdist.core import raycluster
from rsdist.core.raycluster import Demand, DemandError, ensure_demand, fits

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
