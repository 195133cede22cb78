"""The train stage on a constructed run: Ray Train with 2 workers, per-epoch checkpoints, resume."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest
import torch

from rsdist.config import TrainConfig
from rsdist.train import stage as train
from rsdist.core.rows import pick_caption, training_rows
from rsdist.models.tuned import load_trained
from tests.train.runs import make_run


def small_config(**kw) -> TrainConfig:
    base = dict(num_workers=2, epochs=1, batch_size=8, lr=5e-3, embed_dim=16, lora_r=4, lora_alpha=8, cpus_per_worker=0.5, shuffle_buffer=16, warmup_fraction=0.0)
    return TrainConfig(**{**base, **kw})


def test_training_rows_join_selected_rows_with_captions(run_dir):
    ids = make_run(run_dir, n_train=20, n_test=8, select=10)
    rows, n_selected = training_rows(run_dir)
    assert n_selected == 10
    assert sorted(rows.column("sample_id").to_pylist()) == ids["selected"]
    assert rows.column("image_emb").type == pa.list_(pa.float32(), 32)
    assert all(len(c) == 3 for c in rows.column("captions").to_pylist())


def test_selected_test_rows_are_never_trained_on(run_dir):
    ids = make_run(run_dir, n_train=12, n_test=4, select=6)
    manifest = run_dir.read_table("selection", "manifest.parquet")
    extra = pa.table({"sample_id": ids["test"][:2], "cluster": [0, 0], "score": [1.0, 1.0], "selected": [True, True], "reason": ["x", "x"]})
    run_dir.write_table(pa.concat_tables([manifest, extra]), "selection", "manifest.parquet")
    rows, n_selected = training_rows(run_dir)
    assert n_selected == 8
    assert not set(rows.column("sample_id").to_pylist()) & set(ids["test"])


def test_missing_feature_row_names_the_sample(run_dir):
    make_run(run_dir, n_train=8, n_test=0, select=4)
    manifest = run_dir.read_table("selection", "manifest.parquet")
    extra = pa.table({"sample_id": ["nosuchsample"], "cluster": [0], "score": [0.0], "selected": [True], "reason": ["x"]})
    run_dir.write_table(pa.concat_tables([manifest, extra]), "selection", "manifest.parquet")
    with pytest.raises(ValueError, match="nosuchsample"):
        training_rows(run_dir)


def test_caption_draw_is_seeded_and_uses_every_caption():
    caps = ["a", "b", "c", "d", "e"]
    draws = [pick_caption(caps, 0, epoch, "sid") for epoch in range(40)]
    assert draws == [pick_caption(caps, 0, epoch, "sid") for epoch in range(40)]
    assert set(draws) == set(caps)


def test_train_writes_final_checkpoint_and_resumes_after_last_epoch(ray_session, run_dir):
    make_run(run_dir, n_train=40, n_test=8, select=32)

    first = train.run(run_dir, small_config(epochs=1))
    meta1 = run_dir.read_json("checkpoints", "final", "train_meta.json")
    assert first.rows_in == 32 and first.rows_out == 32
    assert first.extra["epochs"] == 1 and len(meta1["history"]) == 1
    assert 0 < first.extra["trainable_params"] < first.extra["total_params"]
    assert run_dir.exists("checkpoints", "final", "text_adapter", "adapter_config.json")
    assert run_dir.exists("checkpoints", "final", "heads.safetensors")

    # Same run directory, two epochs: continues at epoch 2, keeps epoch 1's record untouched.
    second = train.run(run_dir, small_config(epochs=2))
    meta2 = run_dir.read_json("checkpoints", "final", "train_meta.json")
    assert second.extra["epochs"] == 2
    assert [h["epoch"] for h in meta2["history"]] == [1, 2]
    assert meta2["history"][0] == meta1["history"][0]
    assert meta2["history"][1]["loss"] < meta2["history"][0]["loss"]
    assert meta2["history"][1]["steps"] == 2  # 16 rows per worker, batch 8
    epochs_on_disk = sorted(d for d in os.listdir(train.storage_path(run_dir) + "/train") if d.startswith("epoch_"))
    assert epochs_on_disk == ["epoch_0001", "epoch_0002"]

    # The final checkpoint loads into a fresh encoder and differs from the untrained heads.
    trained = load_trained("tiny", 16, run_dir.path("checkpoints", "final"))
    untrained = load_trained("tiny", 16, None)
    assert not torch.equal(trained.image_head.weight, untrained.image_head.weight)
    lora = [n for n, _ in trained.text_tower.named_parameters() if "lora_" in n]
    assert lora, "the adapter was not loaded into the text tower"


def test_memory_run_dir_is_refused_with_one_line_naming_it():
    from rsdist.core.rundir import RunDir

    with pytest.raises(ValueError) as e:
        train.storage_path(RunDir("memory://train-refused"))
    assert "memory://train-refused" in str(e.value) and "\n" not in str(e.value)


def test_caption_features_match_the_text_tower_per_caption(run_dir):
    from rsdist.models.encoders import build_encoder
    from rsdist.models.text_cache import FrozenTextFeatures
    from rsdist.core.rows import with_caption_features

    make_run(run_dir, n_train=8, n_test=0, select=4)
    rows, _ = training_rows(run_dir)
    encoder = build_encoder("tiny", embed_dim=16)
    cache = FrozenTextFeatures(encoder, max_tokens=16, batch_size=3)
    out = with_caption_features(rows, cache)
    distinct = {c for caps in rows.column("captions").to_pylist() for c in caps}
    assert len(cache) == len(distinct)  # each distinct caption encoded once
    for caps, flat in zip(out.column("captions").to_pylist(), out.column("caption_feats").to_pylist()):
        per_caption = torch.tensor(flat).reshape(len(caps), encoder.text_dim)
        tokens = encoder.tokenize(caps, 16)
        with torch.no_grad():
            expected = encoder.encode_text_features(tokens["input_ids"], tokens["attention_mask"])
        assert torch.allclose(per_caption, expected, atol=1e-5)


def test_heads_method_trains_only_the_heads_and_saves_no_adapter(heads_best_val):
    first = heads_best_val.first  # heads, two epochs (tests/train/conftest.py)
    encoder = load_trained("tiny", 16, None)
    heads = sum(p.numel() for m in (encoder.image_head, encoder.text_head) for p in m.parameters()) + 1
    assert first.result.extra["trainable_params"] == heads
    assert first.meta["method"] == "heads" and first.meta["history"][1]["loss"] < first.meta["history"][0]["loss"]
    assert not first.has_adapter
    trained = first.model
    assert not torch.equal(trained.text_head.weight, encoder.text_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(trained.text_tower.parameters(), encoder.text_tower.parameters()))


def test_best_val_keeps_the_epoch_with_the_best_validation_mR(heads_best_val):
    for record, epochs in ((heads_best_val.first, 2), (heads_best_val.resumed, 4)):
        meta = record.meta
        scores = [h["val_mR"] for h in meta["history"]]
        assert len(scores) == epochs and meta["epochs"] == epochs
        assert scores[meta["kept_epoch"] - 1] == max(scores) and record.result.extra["kept_epoch"] == meta["kept_epoch"]
        # final/ holds the kept epoch's heads: scored on the validation rows again, they give its mR.
        assert record.heads_epoch == meta["kept_epoch"]
        assert record.rescored_mR == pytest.approx(max(scores), abs=1e-6)


def test_resumed_best_val_run_still_weighs_the_epochs_before_the_resume(heads_best_val):
    """Two epochs, then the same run asked for four: it resumes after epoch 2, and the kept epoch is
    the best of all four validation scores, here one measured before the resume (Ray's checkpoint
    manager must remember the scores of the checkpoints it kept before)."""
    before = [h["val_mR"] for h in heads_best_val.first.meta["history"]]
    result, meta = heads_best_val.resumed.result, heads_best_val.resumed.meta
    scores = [h["val_mR"] for h in meta["history"]]
    assert scores[:2] == before and len(scores) == 4
    assert max(before) > max(scores[2:])  # at this learning rate the best epoch is one before the resume
    assert meta["kept_epoch"] <= 2 and scores[meta["kept_epoch"] - 1] == max(scores)
    assert result.extra["kept_epoch"] == meta["kept_epoch"]
    assert heads_best_val.resumed.heads_epoch == meta["kept_epoch"]


def test_best_val_without_validation_rows_names_the_setting(ray_session, run_dir):
    make_run(run_dir, n_train=16, n_test=4, select=8)
    with pytest.raises(ValueError, match="data.val_fraction") as e:
        train.run(run_dir, small_config(method="heads", keep_epoch="best-val"))
    assert "\n" not in str(e.value)
