"""HarMA through the train and eval stages: train, checkpoint, resume, evaluate."""

from __future__ import annotations

import pytest
import torch

from rsdist.config import ConfigError, EvalConfig, TrainConfig
from rsdist.eval import stage as evaluate
from rsdist.train import stage as train
from rsdist.models.tuned import load_trained
from tests.train.runs import make_run


def harma_config(**kw) -> TrainConfig:
    base = dict(method="harma", num_workers=2, epochs=1, batch_size=8, lr=5e-3, embed_dim=16, cpus_per_worker=0.5, shuffle_buffer=16,
                warmup_fraction=0.0, harma_hidden=16, harma_heads=2, harma_mini_dim=8)
    return TrainConfig(**{**base, **kw})


def test_method_is_validated():
    with pytest.raises(ConfigError, match="train.method: 'full' is not one of: lora, harma"):
        TrainConfig(method="full")
    with pytest.raises(ConfigError, match="train.harma_hidden"):
        TrainConfig(method="harma", harma_hidden=20, harma_heads=8)


def test_harma_run_trains_checkpoints_resumes_and_evaluates(ray_session, run_dir):
    make_run(run_dir, n_train=40, n_test=8, select=32)

    first = train.run(run_dir, harma_config(epochs=1))
    meta1 = run_dir.read_json("checkpoints", "final", "train_meta.json")
    assert first.extra["method"] == "harma" and meta1["method"] == "harma"
    assert meta1["harma"] == {"hidden": 16, "heads": 2, "mini_dim": 8, "gate_init": 0.6, "margin": 0.2}
    assert run_dir.exists("checkpoints", "final", "harma.pt")
    assert not run_dir.exists("checkpoints", "final", "text_adapter")
    # Only adapters, heads and the scale train; full fine-tuning would train the whole encoder.
    assert 0 < meta1["trainable_params"] < meta1["full_finetune_params"] < meta1["total_params"]
    assert meta1["total_params"] - meta1["full_finetune_params"] < meta1["trainable_params"]

    second = train.run(run_dir, harma_config(epochs=2))
    meta2 = run_dir.read_json("checkpoints", "final", "train_meta.json")
    assert second.extra["epochs"] == 2
    assert [h["epoch"] for h in meta2["history"]] == [1, 2]
    assert meta2["history"][0] == meta1["history"][0]  # epoch 1 was not redone
    assert meta2["history"][1]["loss"] < meta2["history"][0]["loss"]

    trained = load_trained("tiny", 16, run_dir.path("checkpoints", "final"))
    assert trained.harma is not None
    assert any(float(a.up.weight.detach().abs().sum()) > 0 for a in trained.harma.text), "adapters did not move from the identity"

    result = evaluate.run(run_dir, EvalConfig(batch_size=8))
    report = run_dir.read_json("eval", "metrics.json")
    assert report["settings"]["method"] == "harma"
    assert result.rows_in == 8
    assert report["trained"]["mR"] != pytest.approx(report["untrained"]["mR"])


def test_harma_on_an_hf_clip_model_is_identity_at_start():
    torch.manual_seed(0)
    from rsdist.models.encoders import build_encoder
    from rsdist.models.tuned import make_tunable

    encoder = build_encoder("clip-tiny", embed_dim=16)
    tokens = encoder.tokenize(["an airport", "many green trees in a forest"])
    with torch.no_grad():
        before = encoder.encode_text_features(**tokens)
    make_tunable(encoder, {"method": "harma", "harma_hidden": 16, "harma_heads": 2, "harma_mini_dim": 8, "harma_gate_init": 0.6})
    with torch.no_grad():
        after = encoder.encode_text_features(**tokens)
    assert torch.allclose(before, after, atol=1e-6)
    assert len(encoder.harma.text) == 2
    assert all(not p.requires_grad for p in encoder.text_tower.vision_model.parameters())
