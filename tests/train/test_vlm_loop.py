"""VLM instruction LoRA through Ray Train: checkpoints at steps, resume at the same step and data position."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest
import yaml

from rsdist.core.schema import CANONICAL_SCHEMA, empty_row, make_sample_id
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


def mark_upstream_complete(run) -> None:
    """Markers of the stages before train, so `rsdist vlm train` (the job's train stage alone) runs."""
    from rsdist.stage import MARKER

    for folder in ("shards", "features", "clusters", "selection"):
        run.write_json({"stage": folder, "fingerprint": "constructed", "rows_in": 0, "rows_out": 0, "seconds": 0.0}, folder, MARKER)


def session_processes(sid: int) -> list[int]:
    """Pids of the live (or not yet reaped) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry))
    return pids


def latest_registered_step(snapshot) -> int:
    """The step of the newest checkpoint Ray Train registered in its run snapshot (0 when none or unreadable yet)."""
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return 0
    return latest["metrics"]["step"] if latest else 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; a killed driver takes its local Ray down with it on Linux")
def test_a_killed_vlm_run_resumes_from_its_last_checkpoint_at_the_same_step_and_rows(ray_session, run_dir, tmp_path):
    ids = make_instruction_run(run_dir, n=10)
    mark_upstream_complete(run_dir)
    settings = dict(model="qwen2-vl-tiny", num_workers=1, cpus_per_worker=0.5, batch_size=2, grad_accum=1, epochs=1, lr=5e-3, lora_dropout=0.0,
                    checkpoint_every=1, max_pixels=56 * 56, min_pixels=28 * 28, warmup_fraction=0.0)  # 5 steps of 2 rows
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"train": {"vlm": settings}, "ray": {"address": "local"}}))  # its own Ray, never the test session's
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rsdist.cli", "-q", "vlm", "train", str(config), "--out", str(tmp_path / "run")],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = tmp_path / "run" / "vlm_checkpoints" / "ray" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while latest_registered_step(snapshot) == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    still_running = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started (same session)
    proc.wait()
    killed_log = (tmp_path / "killed.log").read_text()[-2000:]
    assert still_running, f"the run ended (rc {proc.returncode}) before it could be killed: {killed_log}"
    gone_by = time.time() + 60
    while session_processes(proc.pid) and time.time() < gone_by:
        time.sleep(0.5)
    assert not session_processes(proc.pid), "processes of the killed run outlived it"

    saved = latest_registered_step(snapshot)
    assert 1 <= saved < 5, f"the killed run registered checkpoint step {saved}: {killed_log}"
    killed_history = json.loads((snapshot.parent / f"step_{saved:06d}" / "state.json").read_text())["history"]
    assert [h["step"] for h in killed_history] == list(range(1, saved + 1))

    result = run_vlm(run_dir, VlmTrainConfig(**settings))  # same storage path and name, the test session's Ray
    meta = run_dir.read_json("vlm_checkpoints", "final", "train_meta.json")
    assert result.extra["steps"] == 5 and meta["steps"] == 5 and meta["epochs_done"] == 1
    assert [h["step"] for h in meta["history"]] == [1, 2, 3, 4, 5]
    assert meta["history"][:saved] == killed_history  # the killed run's own records, timings included: those steps were not trained again
    assert [h["sample_ids"] for h in meta["history"]] == [ids[i:i + 2] for i in range(0, 10, 2)]  # the data position: the rows that come next
    assert all(0 < h["loss"] < float("inf") for h in meta["history"][saved:])
    assert 0 < meta["trainable_params"] < meta["total_params"]
    assert run_dir.exists("vlm_checkpoints", "final", "adapter", "adapter_config.json")


def train_worker_pids() -> list[int]:
    """Pids of the Ray Train worker actors of the test session's Ray (children of its raylet)."""
    import psutil
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    return [p.pid for p in raylet.children() if p.is_running() and "RayTrainWorker" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_vlm_worker_lost_mid_run_restarts_at_the_registered_step_with_the_same_rows(ray_session, run_dir):
    from pathlib import Path

    ids = make_instruction_run(run_dir, n=10)
    cfg = VlmTrainConfig(model="qwen2-vl-tiny", num_workers=1, cpus_per_worker=0.5, batch_size=2, grad_accum=1, epochs=1, lr=5e-3, lora_dropout=0.0,
                         checkpoint_every=1, max_pixels=56 * 56, min_pixels=28 * 28, warmup_fraction=0.0)  # 5 steps of 2 rows; max_failures at its default
    assert cfg.max_failures == 3  # with 0 the same kill ends the run ("Training failed due to worker errors")
    snapshot = Path(run_dir.path("vlm_checkpoints", "ray", "train", "checkpoint_manager_snapshot.json"))
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_vlm(run_dir, cfg)
        except Exception as e:  # noqa: BLE001  reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.time() + 240
    while latest_registered_step(snapshot) == 0 and thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    pids = train_worker_pids()
    assert thread.is_alive() and len(pids) == 1, f"no single training worker to stop: {pids}, {outcome}"
    os.kill(pids[0], signal.SIGKILL)  # the worker this test's run started
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not end after its worker was lost"
    assert "error" not in outcome, f"the run did not recover from a lost worker: {outcome.get('error')}"
    meta = run_dir.read_json("vlm_checkpoints", "final", "train_meta.json")
    assert outcome["result"].extra["steps"] == 5 and meta["epochs_done"] == 1
    assert [h["step"] for h in meta["history"]] == [1, 2, 3, 4, 5]
    assert [h["sample_ids"] for h in meta["history"]] == [ids[i:i + 2] for i in range(0, 10, 2)]  # one worker: the rows of an uninterrupted run
    assert all(0 < h["loss"] < float("inf") for h in meta["history"])


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
    meta = run_dir.read_json("vlm_checkpoints", "final", "train_meta.json")
    assert result.rows_in == 6 and result.extra["steps"] == 2 and meta["epochs_done"] == 1
    assert [h["sample_ids"] for h in meta["history"]] == [expected[:3], expected[3:]]  # 3 micro-batches of 1 row per step
    assert all(h["loss"] > 0 for h in meta["history"])
    assert meta["settings"]["gradient_checkpointing"] and meta["settings"]["model"] == "idefics3-tiny"
    assert run_dir.exists("vlm_checkpoints", "final", "adapter", "adapter_model.safetensors")


def test_steps_per_epoch_count_a_partial_last_micro_batch():
    from rsdist.train.vlm_loop import optimizer_steps_per_epoch

    assert optimizer_steps_per_epoch(7, 2, 1) == 4  # micro-batches of 2, 2, 2, 1
    assert optimizer_steps_per_epoch(7, 2, 2) == 2
    assert optimizer_steps_per_epoch(5, 2, 2) == 1  # the third micro-batch alone is dropped
    assert optimizer_steps_per_epoch(10, 2, 1) == 5
