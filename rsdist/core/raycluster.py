"""Starting or joining Ray, and sizing stages from the cluster's resources (never the driver's)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("rsdist")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local one sized to the machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    log.info("ray: %s", ray.cluster_resources())


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
