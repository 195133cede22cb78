"""Starting or joining Ray, and sizing stages from the cluster's resources (never the driver's).

Placement is planned per node: `alive_nodes()` lists what each node offers, `use_gpus` turns a
stage's `device` setting into GPUs or not (a stage may ask for GPUs that no node has yet: the
autoscaler adds them). Each stage states what its workers ask for as one `Demand` (the bundle of
one worker, the setting behind each resource, how many workers, whether they must all be placed
at once), checked twice: `check_demand` before any stage runs refuses a demand the cluster can
never meet (no node type of the autoscaler can hold a worker; without an autoscaler, no live node
can, or the live nodes cannot hold the workers together), and `ensure_demand` when the stage
starts waits until the live nodes can hold them, asking the autoscaler, up to
`ray.demand_timeout_s`. Either ends the run with one line naming the setting.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("rsdist")

EPS = 1e-6
# What `ray up` leaves on the head: the cluster launcher config the autoscaler runs with.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class DemandError(RuntimeError):
    """A stage asks for resources that no node (and no node type) can provide; names the setting."""


@dataclass(frozen=True)
class Demand:
    """What one worker of a stage asks for (a Ray resource bundle), the setting behind each
    resource (named in errors), how many workers the stage starts and the setting behind that
    number, what they are (in errors), and whether all of them must be placed at once (Ray Train's
    workers, k-means actors) or the stage starts with one (an elastic actor pool)."""

    bundle: dict
    settings: dict
    count: int = 1
    count_setting: str | None = None
    what: str = "workers"
    all_at_once: bool = True

    def positive(self) -> dict[str, float]:
        """The bundle without the resources it does not ask for."""
        return {k: float(v) for k, v in self.bundle.items() if v > 0}

    def needed(self) -> int:
        """How many workers the nodes must hold before the stage starts them."""
        return max(1, self.count) if self.all_at_once else 1

    def blamed(self, candidates: list[dict]) -> str:
        """The settings of the resources no candidate node has enough of (all when only their
        combination fails)."""
        short = [k for k, v in self.bundle.items() if v > 0 and not any(float(n.get(k, 0.0)) + EPS >= v for n in candidates)]
        return ", ".join(dict.fromkeys(self.settings.get(k, k) for k in (short or [k for k, v in self.bundle.items() if v > 0])))


_settings = {"demand_timeout_s": 600.0, "autoscaler_config": None}


def init_ray(address: str | None = None, num_cpus: int | None = None, demand_timeout_s: float = 600.0, autoscaler_config: str | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local one sized to the machine."""
    import ray

    _settings.update(demand_timeout_s=float(demand_timeout_s), autoscaler_config=autoscaler_config)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # helpers that look the cluster up (Ray Train's) find this one, also where a machine runs
        # several Rays; the job's own env_vars (ray job submit --runtime-env-json) are kept
        env_vars = {**job_runtime_env().get("env_vars", {}), **({} if address == "auto" else {"RAY_ADDRESS": address})}
        kwargs["runtime_env"] = {"env_vars": env_vars}
        if job_working_dir() is not None:
            kwargs["runtime_env"]["worker_process_setup_hook"] = "rsdist.core.raycluster.leave_working_dir"
        ray.init(address=address, **kwargs)
        settle_job_working_dir()
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    log.info("ray: %s", ray.cluster_resources())


def job_runtime_env() -> dict:
    """The runtime environment a submitted job was given (empty outside a job)."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except ValueError:
        return {}


def job_working_dir() -> str | None:
    """The folder a `ray job submit --working-dir` job runs in (Ray's copy of it), else None."""
    runtime_env = job_runtime_env()
    if not runtime_env.get("working_dir"):
        return None
    return os.environ.get("PWD") or None


def _current_folder() -> str:
    return os.getcwd()


def settle_job_working_dir() -> None:
    """Leave the job's working directory once Ray has finished setting it up on this node.

    Ray unpacks a submitted job's working directory for the job's driver, and again (deleting the
    folder and creating it anew under the same name) when the driver connects and whenever a node
    sharing that folder starts the job's first worker (nodes on one machine share it). A process
    whose working directory was deleted cannot load libraries by a relative lookup (torch's MKL:
    `Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so`) nor make a path absolute. So the
    driver waits for the setup on its node (one task there with the job's runtime environment),
    then works from the temporary folder; the job's code stays importable through PYTHONPATH, and
    every worker does the same (`leave_working_dir`, the job's worker_process_setup_hook). Paths
    the job is given must be absolute (`check_job_run_dir`).
    """
    if job_working_dir() is None:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ray.get(ray.remote(num_cpus=0)(_current_folder).options(scheduling_strategy=here).remote())
    leave_working_dir()


def leave_working_dir() -> None:
    """Work from the temporary folder instead of Ray's copy of the job's working directory, which
    Ray may delete and re-create while the process runs (see settle_job_working_dir)."""
    os.chdir(tempfile.gettempdir())


def check_job_run_dir(run_dir: str) -> None:
    """A job submitted with a working directory runs in Ray's temporary copy of it, which Ray
    deletes later: a relative local run directory would land there and be lost."""
    if job_working_dir() is not None and "://" not in run_dir and not os.path.isabs(run_dir):
        raise DemandError(f"run_dir: {run_dir!r} is relative; in a `ray job submit --working-dir` job that is Ray's temporary copy of the working directory: give an absolute path every node can reach, or s3://...")


def in_job_working_dir(path: str | None) -> str | None:
    """A relative local path given to a `--working-dir` job, made absolute inside Ray's copy of
    the working directory (the job's processes do not stay in it: settle_job_working_dir)."""
    folder = job_working_dir()
    if folder is None or not path or "://" in path or os.path.isabs(path) or path == "synthetic":
        return path
    return os.path.join(folder, path)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def alive_nodes() -> list[dict[str, float]]:
    """The resources of every live node (CPU, GPU, memory, custom ones), one dict per node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def node_types(path: str | None = None) -> list[dict[str, float]] | None:
    """The resources of each node type the autoscaler may start (from its cluster launcher YAML:
    `ray.autoscaler_config`, else ~/ray_bootstrap_config.yaml on the head), or None when unknown.
    A type whose YAML leaves `resources` empty (the cloud fills them in) counts as unknown."""
    import yaml

    path = path or _settings["autoscaler_config"] or os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(os.path.expanduser(path)):
        return None
    with open(os.path.expanduser(path)) as f:
        config = yaml.safe_load(f) or {}
    types = []
    for spec in (config.get("available_node_types") or {}).values():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if not resources:
            return None
        resources.setdefault("memory", float("inf"))  # not declared: Ray measures it on the node
        types.append(resources)
    return types


def fits(bundle: dict, node: dict) -> bool:
    """Whether one worker asking `bundle` fits on a node of these resources (when it is empty)."""
    return all(float(node.get(k, 0.0)) + EPS >= v for k, v in bundle.items() if v > 0)


def use_gpus(device: str, offered: list[dict[str, float]] | None = None) -> bool:
    """A stage's `device` setting as GPUs or not: 'cuda' asks for GPUs (present or not, so the
    autoscaler adds them), 'cpu' never; 'auto' when a live node, or a node type the autoscaler
    may start, has a GPU (`offered`: those nodes and types, looked up when not given)."""
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    if offered is None:
        offered = alive_nodes() + (node_types() or [])
    return any(float(n.get("GPU", 0.0)) >= 1 for n in offered)


def _describe(bundle: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:g} GB" if k == "memory" else f"{k} {v:g}" for k, v in bundle.items() if v > 0)


def worker_room(bundle: dict, node: dict) -> int:
    """How many workers asking `bundle` one node of these resources holds (when it is empty)."""
    room = [math.floor(float(node.get(k, 0.0)) / v + EPS) for k, v in bundle.items() if v > 0]
    return min(min(room), 10**9) if room else 10**9


def nodes_hold(bundle: dict, nodes: list[dict[str, float]]) -> int:
    """How many workers asking `bundle` the nodes hold together."""
    return min(sum(worker_room(bundle, n) for n in nodes), 10**9)


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    cpus, gpus = sum(float(n.get("CPU", 0.0)) for n in nodes), sum(float(n.get("GPU", 0.0)) for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")


def _shape(bundle: dict) -> str:
    cpus, gpus = bundle.get("CPU", 0.0), bundle.get("GPU", 0.0)
    return f"{cpus:g} CPU{'s' if cpus != 1 else ''}" + (f" and {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "")


def never_placed(demand: Demand, nodes: list[dict[str, float]]) -> str | None:
    """Why a cluster of exactly these nodes can never place the demand's workers (the setting
    first), or None when it can."""
    bundle, where = demand.positive(), _describe_nodes(nodes)
    if not any(fits(bundle, n) for n in nodes):
        gpus, cpus = bundle.get("GPU", 0.0), bundle.get("CPU", 0.0)
        count_setting = demand.count_setting or demand.blamed(nodes)
        if gpus and not any(fits({"GPU": gpus}, n) for n in nodes):
            return f"{demand.settings.get('GPU', count_setting)}: each of the {demand.what} needs {gpus:g} GPU{'s' if gpus != 1 else ''} on one node; no node of the Ray cluster has that ({where})"
        if cpus and not any(fits({"CPU": cpus}, n) for n in nodes):
            largest = max((float(n.get("CPU", 0.0)) for n in nodes), default=0.0)
            return f"{demand.settings.get('CPU', count_setting)}: {cpus:g} CPUs for each of the {demand.what}, but the largest node of the Ray cluster has {largest:g} ({where})"
        return f"{demand.blamed(nodes)}: each of the {demand.what} asks for {_describe(bundle)}; no node of the Ray cluster can hold that ({where})"
    held = nodes_hold(bundle, nodes)
    if demand.needed() > held:
        return f"{demand.count_setting or demand.blamed(nodes)}: {demand.count} {demand.what} of {_shape(bundle)} each, but the Ray cluster can hold {held} ({where})"
    return None


def check_demand(demand: Demand, nodes: list[dict[str, float]] | None = None) -> None:
    """Before any stage runs: refuse, naming the setting, a demand the cluster can never meet
    (Ray would wait for its workers forever). With the autoscaler's node types known: a worker no
    node type can hold (the autoscaler adds nodes for the rest; `ensure_demand` waits for them).
    Without them (a cluster of fixed nodes, or `nodes` given): a worker no node can hold, or more
    workers that must start together than the nodes hold together."""
    types = node_types() if nodes is None else None
    if types is not None:
        if not any(fits(demand.positive(), t) for t in types):
            raise DemandError(f"{demand.blamed(alive_nodes() + types)}: each worker asks for {_describe(demand.positive())}; no node of the cluster and no node type of its autoscaler can hold that")
        return
    reason = never_placed(demand, alive_nodes() if nodes is None else nodes)
    if reason is not None:
        raise DemandError(reason)


def ensure_demand(demand: Demand, timeout_s: float | None = None) -> list[dict[str, float]]:
    """When a stage starts its workers: the live nodes that can each hold one, once together they
    hold the workers that must start at once (`Demand.needed`), waiting for the autoscaler (asked
    with `request_resources`) when they do not yet. Raises DemandError naming the setting when no
    node type can ever hold a worker, or when the nodes to hold them have not joined within the
    timeout (`ray.demand_timeout_s`)."""
    bundle = demand.positive()

    def ready() -> list[dict[str, float]]:
        nodes = [n for n in alive_nodes() if fits(bundle, n)]
        return nodes if nodes and nodes_hold(bundle, nodes) >= demand.needed() else []

    nodes = ready()
    if nodes:
        return nodes
    types = node_types()
    if types is not None and not any(fits(bundle, t) for t in types):
        raise DemandError(f"{demand.blamed(alive_nodes() + types)}: each worker asks for {_describe(bundle)}; no node of the cluster and no node type of its autoscaler can hold that")
    timeout_s = _settings["demand_timeout_s"] if timeout_s is None else timeout_s
    from ray.autoscaler.sdk import request_resources

    wanted = f"a node that can hold {_describe(bundle)}" if demand.needed() == 1 else f"nodes that can hold {demand.needed()} x {_describe(bundle)}"
    log.info("waiting up to %.0f s for %s (%s)", timeout_s, wanted, demand.blamed(alive_nodes()))
    request_resources(bundles=[bundle] * max(1, demand.count))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            nodes = ready()
            if nodes:
                return nodes
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])
    live = alive_nodes()
    if any(fits(bundle, n) for n in live):
        held = nodes_hold(bundle, [n for n in live if fits(bundle, n)])
        raise DemandError(f"{demand.count_setting or demand.blamed(live)}: {demand.count} {demand.what} of {_describe(bundle)} each must start together; the nodes hold {held} and no node that can hold more joined within ray.demand_timeout_s={timeout_s:g}")
    raise DemandError(f"{demand.blamed(live)}: each worker asks for {_describe(bundle)}; no node that can hold that joined within ray.demand_timeout_s={timeout_s:g}")


def elastic_actor_pool(size: int):
    """A Ray Data actor pool that starts with `size` actors (the stage's plan) and may shrink to
    one: when a node is lost with some of the actors, the pool goes on with the actors the nodes
    left can hold, where a fixed-size pool waits for room for all of them (forever when no node
    replaces the lost one). The read and write tasks next to it need room of their own on some
    node: the features stage sizes its actors so that every node keeps it (fill_proof_share)."""
    import ray.data

    size = max(1, int(size))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size)
