"""Starting or joining Ray, and sizing stages from the cluster's resources (never the driver's)."""

from __future__ import annotations

import logging
import math
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


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _fits(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many bundles of (cpus, gpus) one node holds."""
    room = math.inf
    if cpus > 0:
        room = min(room, math.floor(node.get("CPU", 0.0) / cpus + 1e-9))
    if gpus > 0:
        room = min(room, math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
    return min(room, 10**9)


def check_placement(count_field: str, count: int, cpus_field: str, cpus: float, gpus: float = 0.0, gpus_field: str | None = None,
                    nodes: list[dict[str, float]] | None = None, what: str = "workers") -> None:
    """Refuse, naming the setting, `count` actors or workers of `cpus` CPUs and `gpus` GPUs each
    that the cluster's nodes (as they are now) can never hold: Ray would wait for them forever.
    Each one must fit on a single node; the count is checked against what all nodes hold together."""
    from rsdist.config import ConfigError

    nodes = node_resources() if nodes is None else nodes
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    shape = f"{cpus:g} CPU{'s' if cpus != 1 else ''}" + (f" and {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "")
    where = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {total_cpus:g} CPUs" + (f", {total_gpus:g} GPUs" if total_gpus else "")
    per_node = [_fits(n, cpus, gpus) for n in nodes]
    if not any(per_node):
        largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        if gpus and not any(_fits(n, 0.0, gpus) for n in nodes):
            raise ConfigError(f"{gpus_field or count_field}: each of the {what} needs {gpus:g} GPU{'s' if gpus != 1 else ''} on one node; no node of the Ray cluster has that ({where})")
        raise ConfigError(f"{cpus_field}: {cpus:g} CPUs for each of the {what}, but the largest node of the Ray cluster has {largest:g} ({where})")
    room = min(sum(per_node), 10**9)
    if count > room:
        raise ConfigError(f"{count_field}: {count} {what} of {shape} each, but the Ray cluster can hold {room} ({where})")
