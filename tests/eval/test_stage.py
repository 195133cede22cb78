"""The eval stage on a constructed run with a checkpoint written the way training writes it."""

from __future__ import annotations

import pytest
import torch

from rsdist.config import EvalConfig
from rsdist.eval import stage as evaluate
from rsdist.models.encoders import build_encoder
from rsdist.train.loss import info_nce
from rsdist.models.tuned import make_trainable, save_trained
from tests.train.runs import CLASSES, make_run


def write_checkpoint(run, steps: int = 0, embed_dim: int = 16) -> None:
    """A final checkpoint of the tiny encoder; `steps` of full-batch InfoNCE on the train rows first."""
    from rsdist.core.metrics import label_words
    from rsdist.core.rows import feature_rows, join_captions

    encoder = make_trainable(build_encoder("tiny", embed_dim=embed_dim, seed=0), 4, 8, 0.0, ["query", "key", "value"])
    rows = join_captions(run, feature_rows(run, split="train"))
    feats = torch.from_numpy(evaluate.image_matrix(rows))
    texts = [caps[0] for caps in rows.column("captions").to_pylist()]
    tokens = encoder.tokenize(texts)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = info_nce(encoder.project_image(feats), encoder.project_text(encoder.encode_text_features(**tokens)), encoder.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = run.path("checkpoints", "final")
    save_trained(encoder, folder, {"epoch": 1})
    run.write_json({"encoder": "tiny", "embed_dim": embed_dim, "seed": 0, "epochs": 1}, "checkpoints", "final", "train_meta.json")


def test_eval_writes_metrics_for_trained_and_untrained(ray_session, run_dir):
    make_run(run_dir, n_train=40, n_test=12)
    write_checkpoint(run_dir, steps=0)
    result = evaluate.run(run_dir, EvalConfig(batch_size=8))
    report = run_dir.read_json("eval", "metrics.json")
    assert result.rows_in == result.rows_out == 12
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR", "zero_shot_acc"):
        assert 0.0 <= report["trained"][key] <= 100.0
    assert report["trained"]["images"] == 12 and report["trained"]["texts"] == 36
    assert set(report["trained"]["zero_shot_per_class"]) == set(CLASSES)
    assert report["settings"]["prompt"] == "an aerial photograph of {label}"
    # A checkpoint saved before any step has the untrained model's weights: identical metrics.
    assert report["untrained"]["mR"] == pytest.approx(report["trained"]["mR"])
    assert result.extra["metrics"]["mR"] == report["trained"]["mR"]


def test_training_on_the_train_split_raises_held_out_recall(ray_session, run_dir):
    make_run(run_dir, n_train=40, n_test=12)
    write_checkpoint(run_dir, steps=60)
    evaluate.run(run_dir, EvalConfig(batch_size=16))
    report = run_dir.read_json("eval", "metrics.json")
    assert report["trained"]["mR"] > report["untrained"]["mR"] + 10


def test_eval_without_checkpoint_names_the_path(run_dir):
    make_run(run_dir, n_train=8, n_test=4)
    with pytest.raises(FileNotFoundError, match="checkpoints/final"):
        evaluate.run(run_dir, EvalConfig())


def test_no_held_out_rows_is_one_clear_error(run_dir):
    make_run(run_dir, n_train=8, n_test=0, select=4)
    with pytest.raises(ValueError, match="split == 'test'"):
        evaluate.held_out_rows(run_dir)


def test_cached_frozen_text_features_give_the_same_metrics(run_dir):
    from rsdist.models.text_cache import FrozenTextFeatures
    from rsdist.models.tuned import load_trained

    make_run(run_dir, n_train=20, n_test=12)
    model = load_trained("tiny", 16, None)
    rows, classes, cfg = evaluate.held_out_rows(run_dir), evaluate.class_names(run_dir), EvalConfig(batch_size=5)
    cache = FrozenTextFeatures(build_encoder("tiny", embed_dim=16), cfg.max_text_tokens, batch_size=7)
    direct = evaluate.evaluate_model(model, rows, classes, cfg)
    cached = evaluate.evaluate_model(model, rows, classes, cfg, cache)
    again = evaluate.evaluate_model(model, rows, classes, cfg, cache)  # every text already cached
    for key in ("mR", "i2t_r1", "t2i_r1", "zero_shot_acc"):
        assert cached[key] == pytest.approx(direct[key]) and again[key] == cached[key]
