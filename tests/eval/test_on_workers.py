"""The eval stage runs on Ray workers: the same metrics as scoring the held-out rows in one
process, embeddings written to the eval folder, and no row table built by the driver."""

from __future__ import annotations

import pytest

from rsdist.config import EvalConfig
from rsdist.eval import stage as evaluate
from rsdist.core import rows as data
from rsdist.models.tuned import load_trained
from tests.eval.test_stage import write_checkpoint
from tests.train.runs import make_run


def test_metrics_on_workers_equal_the_in_process_ones(ray_session, run_dir, monkeypatch):
    make_run(run_dir, n_train=40, n_test=14, n_val=6, parts=3)
    write_checkpoint(run_dir, steps=30)
    cfg = EvalConfig(batch_size=8, read_block_rows=4)
    rows, classes = evaluate.held_out_rows(run_dir), evaluate.class_names(run_dir)
    expected = evaluate.evaluate_model(load_trained("tiny", 16, run_dir.path("checkpoints", "final")), rows, classes, cfg)

    def refuse(*a, **k):
        raise AssertionError("the driver read held-out rows")

    for name in ("split_rows", "held_out_rows", "held_out_and_validation_rows", "class_names"):
        monkeypatch.setattr(evaluate, name, refuse)
    for name in ("feature_rows", "caption_rows", "join_captions", "_filtered"):
        monkeypatch.setattr(data, name, refuse)
    result = evaluate.run(run_dir, cfg)
    report = run_dir.read_json("eval", "metrics.json")
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR", "zero_shot_acc"):
        assert report["trained"][key] == pytest.approx(expected[key], abs=1e-9), key
    assert report["trained"]["images"] == 14 and result.rows_in == 14
    assert report["validation"]["images"] == 6
    stored = evaluate.read_embeddings(run_dir, "trained")
    assert stored.num_rows == 20 and stored.schema.field("image").type.list_size == 16
    assert evaluate.read_embeddings(run_dir, "untrained").num_rows == 14
