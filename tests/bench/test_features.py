"""The features benchmark's GPU section: the adapter-vs-bare CLIP timing, on a tiny CLIP on CPU."""

from __future__ import annotations

import pytest
import torch

from rsdist.bench.features import bench, clip_adapter_vs_bare

TINY = {
    "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
    "text_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "projection_dim": 16,
}


def test_adapter_vs_bare_times_the_same_computation():
    figures = clip_adapter_vs_bare("cpu", batch=4, iters=2, config=TINY)  # asserts both give the same features
    assert figures["batch"] == 4 and figures["bare_images_per_s"] > 0 and figures["adapter_images_per_s"] > 0
    assert figures["adapter_vs_bare"] > 0 and figures["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the section runs")
def test_gpu_section_is_skipped_without_cuda():
    assert bench(["--gpu-clip-only"]) == {"gpu_clip": {"skipped": "no CUDA device"}}
