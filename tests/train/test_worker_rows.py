"""Training rows reach the Ray Train workers through Ray Data reads of the run directory: each rank
reads its own equal contiguous share, the same rows in the same order as the in-driver table the
previous version split, and the stage's driver never builds that table."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rsdist.config import TrainConfig
from rsdist.core import rows as data
from rsdist.train import stage as train
from tests.train.runs import make_run


def _cfg(**kw) -> TrainConfig:
    base = dict(num_workers=2, epochs=1, batch_size=8, lr=5e-3, embed_dim=16, lora_r=4, lora_alpha=8, cpus_per_worker=0.5, shuffle_buffer=16, warmup_fraction=0.0, read_block_rows=5)
    return TrainConfig(**{**base, **kw})


def test_rank_items_cut_equal_contiguous_ranges():
    ranks = data.rank_items([("a", 5), ("b", 0), ("c", 6)], 2)  # 11 rows: 5 each, the last dropped
    assert ranks == [[{"file": "a", "skip": 0, "take": 5}], [{"file": "c", "skip": 0, "take": 5}]]
    ranks = data.rank_items([("a", 3), ("c", 6)], 3)
    assert ranks == [[{"file": "a", "skip": 0, "take": 3}], [{"file": "c", "skip": 0, "take": 3}], [{"file": "c", "skip": 3, "take": 3}]]


def in_order(ds) -> pa.Table:
    """The dataset's rows in its order, as the workers read it (Ray Train preserves the order)."""
    ds.context.execution_options.preserve_order = True
    return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))


def test_each_rank_reads_its_half_of_the_in_driver_table(ray_session, run_dir):
    ids = make_run(run_dir, n_train=30, n_test=8, select=21, parts=3)
    manifest = run_dir.read_table("selection", "manifest.parquet")  # one selected test row: never trained on
    extra = pa.table({"sample_id": ids["test"][:1], "cluster": [0], "score": [1.0], "selected": [True], "reason": ["x"]})
    run_dir.write_table(pa.concat_tables([manifest, extra]), "selection", "manifest.parquet")
    datasets, n_rows, n_selected = train.training_datasets(run_dir, _cfg(), "tiny")
    assert (n_rows, n_selected) == (21, 22) and sorted(datasets) == ["train_0", "train_1"]
    reference, _ = data.training_rows(run_dir)  # the previous version's table, in the same order
    for rank in (0, 1):
        got = in_order(datasets[f"train_{rank}"])  # the test materialises it; the stage never does
        want = reference.slice(rank * 10, 10)
        assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
        assert got.column("image_emb").to_pylist() == want.column("image_emb").to_pylist()
        assert got.column("captions").to_pylist() == want.column("captions").to_pylist()


def test_missing_feature_row_names_the_sample_on_workers(ray_session, run_dir):
    make_run(run_dir, n_train=8, n_test=0, select=4)
    manifest = run_dir.read_table("selection", "manifest.parquet")
    extra = pa.table({"sample_id": ["nosuchsample"], "cluster": [0], "score": [0.0], "selected": [True], "reason": ["x"]})
    run_dir.write_table(pa.concat_tables([manifest, extra]), "selection", "manifest.parquet")
    with pytest.raises(ValueError, match="nosuchsample"):
        train.training_datasets(run_dir, _cfg(), "tiny")


def test_the_train_stage_driver_never_builds_the_row_table(heads_best_val):
    """The shared heads run (tests/train/conftest.py) trains and resumes with every row-building
    function of rsdist.core.rows raising in the driver; its 32 rows reach the workers in blocks of
    5 (read_block_rows) and the 12 validation rows score every epoch."""
    for record, epochs in ((heads_best_val.first, 2), (heads_best_val.resumed, 4)):
        assert record.result.rows_in == 32 and record.meta["train_rows"] == 32
        assert len(record.meta["history"]) == epochs and all("val_mR" in h for h in record.meta["history"])
