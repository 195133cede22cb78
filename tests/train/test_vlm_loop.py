"""VLM instruction LoRA through Ray Train: checkpoints at steps, resume at the same step and data position."""

from __future__ import annotations

import pyarrow as pa

from rsdist.io.schema import CANONICAL_SCHEMA, empty_row, make_sample_id
from rsdist.train.vlm import VlmTrainConfig
from rsdist.train.vlm_loop import run_vlm
from tests.train.test_vlm import png

ANSWERS = ["an airport", "a forest", "bare land", "a river", "yes", "no", "3", "a bridge"]


def make_instruction_run(run, n: int = 8) -> list[str]:
    rows = []
    for i in range(n):
        row = empty_row()
        sid = make_sample_id("constructed", f"vlm{i}")
        row.update(sample_id=sid, image=png(64, 48, seed=i) if i % 4 else b"", image_format="png", width=64, height=48, task="instruction",
                   conversations=[{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}],
                   split="train", source="constructed")
        rows.append(row)
    run.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), "shards", "part-00000.parquet")
    ids = [r["sample_id"] for r in rows]
    run.write_table(pa.table({"sample_id": ids, "cluster": [0] * n, "score": [0.0] * n, "selected": [True] * n, "reason": ["x"] * n}), "selection", "manifest.parquet")
    return ids


def test_vlm_run_checkpoints_and_resumes_at_the_same_step_and_rows(ray_session, run_dir):
    ids = make_instruction_run(run_dir, n=8)
    base = dict(num_workers=1, cpus_per_worker=0.5, batch_size=2, grad_accum=2, epochs=1, lr=5e-3, lora_dropout=0.0, checkpoint_every=1,
                max_pixels=56 * 56, min_pixels=28 * 28, warmup_fraction=0.0)

    first = run_vlm(run_dir, VlmTrainConfig(**base, max_steps=1))  # stops mid-epoch after step 1 (4 of 8 rows)
    meta1 = run_dir.read_json("checkpoints", "vlm", "final", "train_meta.json")
    assert first.extra["steps"] == 1 and meta1["epochs_done"] == 0
    assert len(meta1["history"][0]["sample_ids"]) == 4
    assert 0 < meta1["trainable_params"] < meta1["total_params"]
    assert run_dir.exists("checkpoints", "vlm", "final", "adapter", "adapter_config.json")

    second = run_vlm(run_dir, VlmTrainConfig(**base))  # same storage: continues at step 2 with the rows not yet seen
    meta2 = run_dir.read_json("checkpoints", "vlm", "final", "train_meta.json")
    assert second.extra["steps"] == 2 and meta2["epochs_done"] == 1
    assert [h["step"] for h in meta2["history"]] == [1, 2]
    assert meta2["history"][0] == meta1["history"][0]
    seen = meta2["history"][0]["sample_ids"] + meta2["history"][1]["sample_ids"]
    assert sorted(seen) == sorted(ids)  # every row once in the epoch, none twice across the restart
