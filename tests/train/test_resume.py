"""A training run killed after an epoch and run again gives what an uninterrupted run gives: the
same per-epoch losses and validation mR, the same kept epoch, the same weights (same seed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rsdist.config import TrainConfig
from rsdist.core.rundir import RunDir
from rsdist.models.safe_files import load_tensors
from rsdist.train import stage as train
from tests.train.runs import make_run

SETTINGS = dict(num_workers=2, epochs=4, batch_size=8, lr=5e-3, embed_dim=16, lora_r=4, lora_alpha=8, cpus_per_worker=0.5, shuffle_buffer=16,
                warmup_fraction=0.25, keep_epoch="best-val", checkpoints_to_keep=1)

TRAIN = """
import json, sys
import ray
from rsdist.config import TrainConfig
from rsdist.core.rundir import RunDir
from rsdist.train import stage

ray.init(address=sys.argv[1], log_to_driver=False)
stage.run(RunDir(sys.argv[2]), TrainConfig(**json.loads(sys.argv[3])))
"""


def registered_epoch(snapshot: str) -> int:
    """The epoch of the newest checkpoint Ray Train registered (0 when none or unreadable yet)."""
    try:
        with open(snapshot) as f:
            latest = json.load(f)["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def kill_after_epoch(run: RunDir, address: str, epoch: int, log_path) -> int:
    """Train `run` in another driver process and SIGKILL it once epoch `epoch` is checkpointed; the epoch it had reached."""
    snapshot = os.path.join(train.storage_path(run), "train", "checkpoint_manager_snapshot.json")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", TRAIN, address, run.uri, json.dumps(SETTINGS)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, start_new_session=True)
    try:
        deadline = time.time() + 300
        while registered_epoch(snapshot) < epoch and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the kill: {open(log_path).read()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return registered_epoch(snapshot)


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def final_tensors(run: RunDir) -> dict[str, torch.Tensor]:
    final = run.path("checkpoints", "final")
    return {**load_tensors(os.path.join(final, "heads.safetensors")),
            **{f"lora.{k}": v for k, v in load_tensors(os.path.join(final, "text_adapter", "adapter_model.safetensors")).items()}}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a process group")
def test_a_killed_run_resumed_equals_the_uninterrupted_run(ray_session, tmp_path):
    whole, killed = RunDir(str(tmp_path / "whole")), RunDir(str(tmp_path / "killed"))
    for run in (whole, killed):
        make_run(run, n_train=24, n_test=4, select=16, n_val=8)

    reached = kill_after_epoch(killed, ray_session.get_runtime_context().gcs_address, 2, tmp_path / "killed.log")
    assert 2 <= reached < SETTINGS["epochs"], f"killed at epoch {reached}"
    assert not killed.exists("checkpoints", "final")
    resumed = train.run(killed, TrainConfig(**SETTINGS))  # Ray Train resumes after the last checkpointed epoch
    uninterrupted = train.run(whole, TrainConfig(**SETTINGS))

    a = whole.read_json("checkpoints", "final", "train_meta.json")
    b = killed.read_json("checkpoints", "final", "train_meta.json")
    assert [h["epoch"] for h in b["history"]] == list(range(1, SETTINGS["epochs"] + 1))
    assert comparable(b["history"]) == comparable(a["history"])  # losses and validation mR, epoch by epoch, exactly
    assert b["kept_epoch"] == a["kept_epoch"] and resumed.extra["kept_epoch"] == uninterrupted.extra["kept_epoch"]
    ta, tb = final_tensors(whole), final_tensors(killed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
