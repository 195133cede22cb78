"""VLM instruction LoRA through Ray Train: checkpoints at steps, resume at the same step and data position."""

from __future__ import annotations

import pyarrow as pa

from rsdist.io.schema import CANONICAL_SCHEMA, empty_row, make_sample_id
from rsdist.train.vlm import VlmTrainConfig
from rsdist.train.vlm_loop import run_vlm, vlm_training_dataset, vlm_training_ids
from tests.train.test_vlm import png

ANSWERS = ["an airport", "a forest", "bare land", "a river", "yes", "no", "3", "a bridge"]


def make_instruction_run(run, n: int = 8, selected=None, splits=None) -> list[str]:
    """`n` instruction rows in two shard files, and a manifest selecting `selected` (default all)."""
    rows = []
    for i in range(n):
        row = empty_row()
        sid = make_sample_id("constructed", f"vlm{i}")
        row.update(sample_id=sid, image=png(64, 48, seed=i) if i % 4 else b"", image_format="png", width=64, height=48, task="instruction",
                   conversations=[{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}],
                   split=splits[i] if splits else "train", source="constructed")
        rows.append(row)
    half = n // 2
    run.write_table(pa.Table.from_pylist(rows[:half], schema=CANONICAL_SCHEMA), "shards", "part-00000.parquet")
    run.write_table(pa.Table.from_pylist(rows[half:], schema=CANONICAL_SCHEMA), "shards", "part-00001.parquet")
    ids = [r["sample_id"] for r in rows]
    chosen = selected if selected is not None else [True] * n
    run.write_table(pa.table({"sample_id": ids, "cluster": [0] * n, "score": [0.0] * n, "selected": chosen, "reason": ["x"] * n}), "selection", "manifest.parquet")
    return ids


def test_vlm_run_checkpoints_and_resumes_at_the_same_step_and_rows(ray_session, run_dir):
    ids = make_instruction_run(run_dir, n=8)
    base = dict(num_workers=1, cpus_per_worker=0.5, batch_size=2, grad_accum=2, epochs=1, lr=5e-3, lora_dropout=0.0, checkpoint_every=1,
                max_pixels=56 * 56, min_pixels=28 * 28, warmup_fraction=0.0)

    first = run_vlm(run_dir, VlmTrainConfig(**base, max_steps=1))  # stops mid-epoch after step 1 (4 of 8 rows)
    meta1 = run_dir.read_json("checkpoints", "vlm", "final", "train_meta.json")
    assert first.extra["steps"] == 1 and meta1["epochs_done"] == 0
    assert meta1["history"][0]["sample_ids"] == ids[:4]  # shard order, one worker
    assert 0 < meta1["trainable_params"] < meta1["total_params"]
    assert run_dir.exists("checkpoints", "vlm", "final", "adapter", "adapter_config.json")

    second = run_vlm(run_dir, VlmTrainConfig(**base))  # same storage: continues at step 2 with the rows not yet seen
    meta2 = run_dir.read_json("checkpoints", "vlm", "final", "train_meta.json")
    assert second.extra["steps"] == 2 and meta2["epochs_done"] == 1
    assert [h["step"] for h in meta2["history"]] == [1, 2]
    assert meta2["history"][0] == meta1["history"][0]
    assert meta2["history"][1]["sample_ids"] == ids[4:]  # the data position: exactly the rows after those of step 1
    assert 0 < meta2["history"][1]["loss"] < float("inf")


SELECTED = [True, False, True, True, False, True, True, True, False, True]
SPLITS = ["train"] * 7 + ["test"] + ["train"] * 2


def test_only_selected_non_test_rows_reach_the_workers(ray_session, run_dir):
    ids = make_instruction_run(run_dir, n=10, selected=SELECTED, splits=SPLITS)
    expected = [sid for sid, sel, split in zip(ids, SELECTED, SPLITS) if sel and split != "test"]
    assert vlm_training_ids(run_dir).to_pylist() == expected
    rows = vlm_training_dataset(run_dir, vlm_training_ids(run_dir)).take_all()
    assert [r["sample_id"] for r in rows] == expected
    assert all(r["conversations"] and "image" in r for r in rows)


def test_a_missing_selected_row_is_named(run_dir):
    make_instruction_run(run_dir, n=4)
    run_dir.remove("shards", "part-00001.parquet")
    try:
        vlm_training_ids(run_dir)
    except ValueError as e:
        assert "has no row in" in str(e) and "manifest.parquet" in str(e)
    else:
        raise AssertionError("a selected row without a shard row must be refused")


def test_idefics3_trains_through_ray_train_with_accumulation_and_checkpointing(ray_session, run_dir):
    ids = make_instruction_run(run_dir, n=10, selected=SELECTED, splits=SPLITS)
    expected = [sid for sid, sel, split in zip(ids, SELECTED, SPLITS) if sel and split != "test"]  # 6 rows
    cfg = VlmTrainConfig(model="idefics3-tiny", num_workers=1, cpus_per_worker=0.5, batch_size=1, grad_accum=3, epochs=1, lr=5e-3, lora_dropout=0.0,
                         checkpoint_every=1, gradient_checkpointing=True, max_failures=1, max_pixels=56 * 56, min_pixels=28 * 28, warmup_fraction=0.0)
    result = run_vlm(run_dir, cfg)
    meta = run_dir.read_json("checkpoints", "vlm", "final", "train_meta.json")
    assert result.rows_in == 6 and result.extra["steps"] == 2 and meta["epochs_done"] == 1
    assert [h["sample_ids"] for h in meta["history"]] == [expected[:3], expected[3:]]  # 3 micro-batches of 1 row per step
    assert all(h["loss"] > 0 for h in meta["history"])
    assert meta["settings"]["gradient_checkpointing"] and meta["settings"]["model"] == "idefics3-tiny"
    assert run_dir.exists("checkpoints", "vlm", "final", "adapter", "adapter_model.safetensors")
