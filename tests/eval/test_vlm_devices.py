"""The VLM eval stage's generators follow `eval.vlm.device` (auto | cpu | cuda): cuda asks Ray for
GPUs no node has yet (an autoscaler adds a GPU node), a demand that is not met ends in one line
naming the setting, and cuda in a driver without CUDA (num_actors 0) is refused."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rsdist.config import ConfigError, EvalConfig
from rsdist.core.raycluster import DemandError
from rsdist.eval import vlm_stage
from rsdist.eval.vlm import VlmEvalConfig, generate_all



def test_the_generators_ask_for_gpus_by_the_device_setting(ray_session, gpu_node_type):
    def gpus(**settings) -> float:
        return vlm_stage.resources(EvalConfig(vlm=VlmEvalConfig(**settings))).num_gpus

    assert gpus(device="cuda", gpus_per_actor=0.5) == 0.5
    assert gpus(device="auto") == 1
    assert gpus(device="cpu") == 0
    assert gpus(device="cuda", num_actors=0) == 0  # the driver generates: no worker asks for anything


def test_cuda_generators_wait_for_a_gpu_node_then_name_the_setting(ray_session, gpu_node_type):
    inputs = pa.table({"sample_id": ["a"], "image": [b""], "prompt": ["Describe the image."]})
    with pytest.raises(DemandError, match=r"^eval.vlm.device=cuda with eval.vlm.gpus_per_actor: each worker asks for CPU 0.5, GPU 1; no node that can hold that joined within ray.demand_timeout_s=1$"):
        generate_all(inputs, VlmEvalConfig(device="cuda", num_actors=1, cpus_per_actor=0.5), "qwen2-vl-tiny", 0, None, 4)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the driver has a CUDA device")
def test_cuda_in_a_driver_without_cuda_is_refused():
    with pytest.raises(ConfigError, match=r"^eval.vlm.device: 'cuda' with eval.vlm.num_actors 0 generates in the driver, which has no CUDA device"):
        vlm_stage.check_resources(EvalConfig(vlm=VlmEvalConfig(device="cuda", num_actors=0)))
