"""Validation failures for error-driven selection: which images fail, their weights, and the file the eval stage writes."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from rsdist.config import EvalConfig
from rsdist.core.rundir import RunDir
from rsdist.eval import stage as evaluate
from rsdist.eval.failures import SCHEMA, failure_table
from rsdist.stage import fingerprint, run_stage
from tests.eval.test_stage import write_checkpoint
from tests.train.runs import make_run

# Three images, captions t0 t1 (image 0), t2 (image 1), t3 t4 (image 2).
TEXT_IMAGE = np.array([0, 0, 1, 2, 2])
SIM = np.array(
    [
        [0.9, 0.8, 0.1, 0.65, 0.2],  # image 0 finds its caption first; it outranks image 2 for t3
        [0.1, 0.1, 0.3, 0.4, 0.1],  # image 1 ranks its own caption second (t3 above it)
        [0.2, 0.1, 0.0, 0.6, 0.7],  # image 2 finds t4 first, but t3 finds image 0 first
    ]
)


def test_failures_are_the_images_with_a_missed_query_weighted_by_the_share_missed():
    table = failure_table(["a", "b", "c"], SIM, TEXT_IMAGE, rank=1)
    assert table.schema.equals(SCHEMA)
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"b", "c"}  # image 0's three queries all hit
    assert rows["b"]["weight"] == 0.5 and rows["b"]["i2t_rank"] == 1 and rows["b"]["t2i_rank"] == 0  # 1 of 2 queries missed
    assert abs(rows["c"]["weight"] - 1 / 3) < 1e-12 and rows["c"]["i2t_rank"] == 0 and rows["c"]["t2i_rank"] == 0  # t3 missed
    assert failure_table(["a", "b", "c"], SIM, TEXT_IMAGE, rank=2).num_rows == 0  # every match within the first two


@pytest.fixture(scope="module")
def evaluated(ray_session, tmp_path_factory):
    """A constructed run with 15 validation rows, evaluated through run_stage (as the pipeline does)
    with failures at rank 3: the failures test reads it, the removal test evaluates a copy again."""
    root = tmp_path_factory.mktemp("evaluated") / "run"
    run = RunDir(str(root))
    ids = make_run(run, n_train=40, n_test=12, n_val=15)
    write_checkpoint(run, steps=0)
    run_eval_stage(run, EvalConfig(batch_size=8, failure_rank=3, baseline=False))  # the untrained model writes no failures
    return SimpleNamespace(root=root, run=run, ids=ids)


def test_eval_writes_the_validation_failures_error_driven_reads(evaluated):
    run_dir, ids = evaluated.run, evaluated.ids
    report = run_dir.read_json("eval", "metrics.json")
    table = pq.read_table(run_dir.path("eval", "failures.parquet"))
    # The same failures as scoring the validation rows directly with the checkpoint's model.
    from rsdist.core.rows import split_rows
    from rsdist.models.tuned import load_trained

    rows = split_rows(run_dir, "val")
    _, sim, text_image = evaluate.similarity(load_trained("tiny", 16, run_dir.path("checkpoints", "final")), rows, EvalConfig(batch_size=8))
    expected = failure_table(rows.column("sample_id").to_pylist(), sim, text_image, 3)
    assert table.to_pylist() == expected.to_pylist() and 0 < table.num_rows <= 15
    assert set(table.column("sample_id").to_pylist()) <= set(ids["val"])
    test, val = evaluate.held_out_and_validation_rows(run_dir)  # the eval's one read of both splits
    assert test.column("sample_id").to_pylist() == ids["test"] and val.column("sample_id").to_pylist() == ids["val"]
    assert report["validation"] == {"images": 15, "failures": table.num_rows, "failure_rank": 3, "mR": report["validation"]["mR"]}
    assert 0.0 <= report["validation"]["mR"] <= 100.0


def test_no_validation_rows_or_rank_zero_write_no_failures_and_remove_earlier_ones(evaluated, run_dir, tmp_path):
    make_run(run_dir, n_train=40, n_test=12)
    write_checkpoint(run_dir, steps=0)
    evaluate.run(run_dir, EvalConfig(batch_size=8, baseline=False))
    assert not run_dir.exists("eval", "failures.parquet") and "validation" not in run_dir.read_json("eval", "metrics.json")
    shutil.copytree(evaluated.root, tmp_path / "with-failures")  # a run evaluated with validation rows
    earlier = RunDir(str(tmp_path / "with-failures"))
    assert earlier.exists("eval", "failures.parquet")
    # Evaluated again (as the pipeline does, through run_stage) with no failures asked for: the
    # earlier file goes, error-driven cannot read it.
    run_eval_stage(earlier, EvalConfig(batch_size=8, failure_rank=0, baseline=False))
    assert not earlier.exists("eval", "failures.parquet")


def run_eval_stage(run_dir, cfg: EvalConfig) -> dict:
    return run_stage(run_dir, evaluate.FOLDER, fingerprint(cfg), lambda: evaluate.run(run_dir, cfg))
