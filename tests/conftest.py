"""Shared fixtures: one local Ray for the whole session, and small run directories."""

from __future__ import annotations

import os

import pytest
import yaml

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and a small object store, started once for all tests that need it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def run_dir(tmp_path):
    from rsdist.core.rundir import RunDir

    return RunDir(str(tmp_path / "run"))


@pytest.fixture
def gpu_node_type(tmp_path, monkeypatch):
    """An autoscaler that may start a GPU node (and has none running), with a 1 s demand timeout."""
    from rsdist.core import raycluster

    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump({"available_node_types": {"head": {"resources": {"CPU": 2}}, "gpu_worker": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 1}}}))
    monkeypatch.setitem(raycluster._settings, "autoscaler_config", str(config))
    monkeypatch.setitem(raycluster._settings, "demand_timeout_s", 1.0)

