"""Train stage when `train.model` is 'vlm': instruction LoRA of an image-text-to-text model on the
selected rows with Ray Train (rsdist/train/vlm_loop.py).

Input: `<run>/selection/manifest.parquet` (selected, non-test rows) and `<run>/shards/` (each row
as an instruction: rsdist/models/instructions.py).
Output, `<run>/vlm_checkpoints/` (this stage's own folder; the dual encoder's train stage writes
`checkpoints/`): `ray/train/` (step checkpoints; a re-run with the same settings resumes at the
last one) and `final/` (`adapter/`, peft LoRA with the projector when trainable; `train_meta.json`:
parameter counts, the loss of every step, rows, seconds, settings).
Resources: `train.vlm.num_workers` Ray Train workers of `cpus_per_worker` CPUs and, when
`train.vlm.device` means GPUs (cuda, present or not, so an autoscaler adds GPU nodes; auto on a
cluster that has or can add them), `gpus_per_worker` GPUs each.
"""

from __future__ import annotations

from rsdist.config import TrainConfig
from rsdist.core.raycluster import check_demand
from rsdist.core.rundir import RunDir
from rsdist.stage import Resources, Stage, StageResult
from rsdist.train.vlm_loop import FOLDER as _FOLDER
from rsdist.train.vlm_loop import worker_demand, worker_resources

FOLDER = _FOLDER[0]


def resources(cfg: TrainConfig) -> Resources:
    """What each training worker asks for."""
    return worker_resources(cfg.vlm)


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, naming the setting, training workers the cluster can never place."""
    check_demand(worker_demand(cfg.vlm, resources(cfg)))


def run(run: RunDir, cfg: TrainConfig) -> StageResult:
    from rsdist.train.vlm_loop import run_vlm

    return run_vlm(run, cfg.vlm)


STAGE = Stage(name="train", folder=FOLDER, reads=("selection", "shards"), section="train", resources=resources, run=run, resumable=True, placement=check_resources)
