"""The VLM train stage's workers follow `train.vlm.device` (auto | cpu | cuda) like the dual
encoder's stages: cuda asks Ray for GPUs no node has yet (what makes an autoscaler add a GPU node),
and a demand that is not met ends in one line naming the setting."""

from __future__ import annotations

import logging

import pytest

from rsdist.config import TrainConfig
from rsdist.core.raycluster import DemandError
from rsdist.train import vlm_stage
from rsdist.train.vlm import VlmTrainConfig
from rsdist.train.vlm_loop import run_vlm



def test_the_workers_ask_for_gpus_by_the_device_setting(ray_session, gpu_node_type):
    def gpus(**settings) -> float:
        return vlm_stage.resources(TrainConfig(model="vlm", vlm=VlmTrainConfig(**settings))).num_gpus

    assert gpus(device="cuda", gpus_per_worker=2) == 2  # no live node has a GPU: asked all the same
    assert gpus(device="auto") == 1  # the autoscaler's node types have one
    assert gpus(device="cpu") == 0


def test_cuda_waits_for_a_gpu_node_then_names_the_setting(ray_session, gpu_node_type, run_dir, caplog):
    with caplog.at_level(logging.INFO, logger="rsdist"), pytest.raises(DemandError) as e:
        run_vlm(run_dir, VlmTrainConfig(device="cuda", cpus_per_worker=0.5))
    assert str(e.value).startswith("train.vlm.device=cuda with train.vlm.gpus_per_worker: each worker asks for CPU 0.5, GPU 1; no node that can hold that joined within ray.demand_timeout_s=1")
    assert "waiting up to 1 s for a node that can hold CPU 0.5, GPU 1" in caplog.text  # the request the autoscaler acts on
