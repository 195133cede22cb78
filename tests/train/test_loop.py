"""The training loop's validation scoring (keep_epoch 'best-val') against the eval stage's metrics."""

from __future__ import annotations

import pytest
import torch

from rsdist.config import EvalConfig
from rsdist.eval.stage import evaluate_model
from rsdist.models.encoders import build_encoder
from rsdist.models.text_cache import FrozenTextFeatures
from rsdist.core.rows import feature_rows, join_captions, with_caption_features
from rsdist.train.loop import load_validation, validation_mR
from tests.train.runs import make_run


@pytest.mark.parametrize("stored_text_features", [True, False], ids=["heads", "text-tower"])
def test_validation_mR_equals_the_eval_stage_mR_on_the_same_rows(ray_session, run_dir, stored_text_features):
    import ray.data

    make_run(run_dir, n_train=8, n_test=4, select=4, n_val=10)
    rows = join_captions(run_dir, feature_rows(run_dir, split="val"))
    encoder = build_encoder("tiny", embed_dim=16, seed=3)
    frozen = FrozenTextFeatures(encoder, max_tokens=16) if stored_text_features else None
    shipped = with_caption_features(rows.select(["sample_id", "image_emb", "captions"]), frozen) if frozen else rows.select(["sample_id", "image_emb", "captions"])
    val = load_validation(ray.data.from_arrow(shipped), encoder.text_dim)
    assert len(val["image_emb"]) == 10 and len(val["text_image"]) == 30  # three captions per row
    encoder.train()
    score = validation_mR(encoder, val, max_tokens=16, device=torch.device("cpu"))
    assert encoder.training  # left as it was
    expected = evaluate_model(encoder.eval(), rows, [], EvalConfig(max_text_tokens=16), frozen)["mR"]
    assert score == pytest.approx(expected, abs=1e-6)
