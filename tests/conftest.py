"""Shared fixtures: one local Ray for the whole session, and small run directories."""

from __future__ import annotations

import os

import pytest

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
