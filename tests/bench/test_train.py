"""`rsdist bench train`: both paths time real steps, and the trainable counts follow the method."""

from __future__ import annotations

from rsdist.bench.train import bench


def test_bench_counts_each_methods_trainable_parameters():
    figures = {m: bench(["--encoder", "tiny", "--method", m, "--steps", "1", "--image-size", "32", "--batch-size", "4"]) for m in ("heads", "lora", "harma")}
    full = figures["heads"]["full_finetune_params"]
    assert all(f["full_finetune_params"] == full for f in figures.values())
    assert figures["heads"]["trainable_params"] < figures["lora"]["trainable_params"] < figures["harma"]["trainable_params"] < full
    assert figures["heads"]["total_params"] == full  # heads add nothing to the encoder
    for f in figures.values():
        assert f["cached_step_s"] > 0 and f["tower_step_s"] > 0
        assert f["trainable_percent_of_full"] == round(100 * f["trainable_params"] / full, 2)
