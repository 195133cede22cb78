"""`rsdist bench vlm-train`: the tiny preset runs on CPU; the 2b / 7b presets have Qwen2-VL's real sizes."""

from __future__ import annotations

import json

import torch

from rsdist.cli import main
from rsdist.bench.vlm_train import PRESETS, TIED_EMBEDDINGS, build_model
from rsdist.models.vlm import tiny_tokenizer


def test_presets_have_the_published_parameter_counts():
    tok = tiny_tokenizer()
    for preset, params in (("2b", 2_208_985_600), ("7b", 8_291_375_616)):  # Qwen2-VL-2B / -7B parameter counts
        model = build_model(PRESETS[preset], tok, torch.bfloat16, torch.device("meta"), preset in TIED_EMBEDDINGS)
        assert sum(p.numel() for p in model.parameters()) == params, preset


def test_tiny_bench_prints_one_json_object(capsys):
    assert main(["bench", "vlm-train", "--steps", "1", "--batch-size", "2", "--image-size", "56", "--answer-words", "4"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["dtype"] == "float32" and figures["batch_size"] == 2
    assert figures["samples_per_s"] > 0 and figures["tokens_per_s"] > figures["supervised_tokens_per_s"] > 0
    assert figures["image_tokens_per_sample"] == 4  # 56 px / patch 14 = 4 x 4 patches, merged 2 x 2
    assert 0 < figures["trainable_params"] < figures["total_params"] and figures["peak_memory_gb"] > 0
