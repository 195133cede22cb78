"""cluster.yaml matches what the stages ask for: its image runs the Ray that rsdist is used with,
every node type declares its resources, and each stage's workers (default settings; GPU stages
with device 'auto', which these node types make cuda) fit a node type the autoscaler can start."""

from __future__ import annotations

import os
import re

import ray
import yaml

from rsdist.config import RunConfig
from rsdist.core.raycluster import fits, node_types, use_gpus
from rsdist.features import stage as features
from rsdist.ingest import stage as ingest
from rsdist.stage import Resources

CLUSTER_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "cluster.yaml")


def load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def test_image_runs_the_ray_version_rsdist_submits_with():
    image = load()["docker"]["image"]
    found = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
    assert found and found.group(1) == ray.__version__, (image, ray.__version__)


def test_every_stage_fits_a_node_type_the_autoscaler_can_start():
    config = load()
    types = node_types(CLUSTER_YAML)
    assert types is not None, "every node type must declare its resources"
    startable = [t for name, t in zip(config["available_node_types"], types) if config["available_node_types"][name].get("max_workers", 0) > 0]
    assert use_gpus("auto", types), "'auto' devices mean GPUs on this cluster"
    cfg = RunConfig()
    gpu = use_gpus(cfg.features.device, types)
    demands = {
        "features model actor": features.pool_demand(cfg.features, gpu).bundle,
        "features read task": features.CPU_STAGE.bundle(),
        "ingest task": ingest.RESOURCES.bundle(),
        "k-means actor": Resources(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=1.0).bundle(),
        "train worker": Resources(num_cpus=cfg.train.cpus_per_worker, num_gpus=cfg.train.gpus_per_worker).bundle(),
    }
    for what, bundle in demands.items():
        assert any(fits(bundle, t) for t in startable), f"{what} {bundle}: no node type of cluster.yaml holds it"
    # one GPU node holds a model actor plus the read tasks that feed it
    plan = features.plan_pool(cfg.features, [t for t in startable if t.get("GPU")], use_gpu=True)
    gpu_type = next(t for t in startable if t.get("GPU"))
    assert plan.resources.num_cpus + features.CPU_STAGE.num_cpus <= gpu_type["CPU"]
    # the head starts with no CPUs for Ray work: drivers and the job server only
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
