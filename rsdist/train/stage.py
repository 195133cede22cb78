"""Train stage: tune the dual encoder on the selected rows with Ray Train (TorchTrainer, DDP), by
`train.method`: 'lora' (peft LoRA on the text tower), 'harma' (HarMA adapters and loss) or 'heads'
(both towers frozen, projection heads only; the text tower's features of every selected caption
are computed once here, before the workers start, and travel with the rows).

Input:
- `<run>/selection/manifest.parquet`: the rows with selected == True (test-split rows are never
  trained on, even if selected),
- `<run>/features/part-*.parquet`: `image_emb`, the image-tower features. The image tower is frozen,
  so training reuses these instead of decoding and encoding the images again,
- `<run>/shards/part-*.parquet`: `captions` (all captions of each image; `text` when empty),
- with `keep_epoch: best-val`, the rows with split == 'val' (features and captions), on which
  every epoch is scored.
Output, `<run>/checkpoints/`:
- `ray/train/`: Ray Train's run folder, one checkpoint per epoch (running the stage again with the
  same run directory resumes after the last finished epoch, with the same result as a run that was
  never interrupted; every file of the checkpoints is read the safe way first, rsdist/models/safe_files.py),
- `final/`: `text_adapter/` (peft LoRA adapter) or `harma.safetensors` (HarMA adapters) or neither (heads),
  `heads.safetensors` (heads + logit_scale, the kept epoch in its header), `train_meta.json` (encoder, embed_dim, method and its settings, per-epoch loss and
  validation mR, the epoch kept, trainable parameters against full fine-tuning, rows, seconds).
  The kept epoch is the last one, or with `keep_epoch: best-val` the one with the best validation mR.
Resources: `num_workers` Ray Train workers of `cpus_per_worker` CPUs each (fractional by default, so
a 2-CPU machine never waits for a slot) and `gpus_per_worker` GPUs each when `train.device` means
GPUs. A lost worker or node restarts the workers from the last epoch checkpoint, up to
`max_failures` times (FailureConfig).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time

from rsdist.config import TrainConfig
from rsdist.core.raycluster import Demand, check_demand, ensure_demand, use_gpus
from rsdist.core.rundir import RunDir
from rsdist.stage import Resources, Stage, StageResult
from rsdist.core.rows import MANIFEST, count_wanted, features_encoder, manifest_summary, rank_items, worker_dataset
from rsdist.models.safe_files import save_tensors
from rsdist.train.loop import STATE_FILE, check_epoch_checkpoint, rank_dataset, train_loop_per_worker
from rsdist.models.tuned import ADAPTER_DIR, HARMA_FILE, HARMA_SETTINGS, HEADS_FILE, load_heads

log = logging.getLogger("rsdist")

FOLDER = "checkpoints"
FINAL = "final"
META_FILE = "train_meta.json"
READ_CPUS = 0.25  # each read / count task of the training rows


def resources(cfg: TrainConfig) -> Resources:
    """What each training worker asks for: GPUs when `train.device` means them (cuda, or auto on
    a cluster that has or can add GPU nodes)."""
    gpus = cfg.gpus_per_worker if use_gpus(cfg.device) else 0.0
    return Resources(num_cpus=cfg.cpus_per_worker, num_gpus=gpus, memory=cfg.memory_per_worker_gb * 1e9)


def worker_demand(cfg: TrainConfig, res: Resources) -> Demand:
    """The training workers' demand: `num_workers` of them, all placed at once (Ray Train)."""
    settings = {"CPU": "train.cpus_per_worker", "GPU": "train.device / train.gpus_per_worker", "memory": "train.memory_per_worker_gb"}
    return Demand(res.bundle(), settings, count=cfg.num_workers, count_setting="train.num_workers")


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, naming the setting, workers the cluster can never place (Ray Train would wait forever)."""
    check_demand(worker_demand(cfg, resources(cfg)))


def storage_path(run: RunDir, *parts: str) -> str:
    """Where Ray Train keeps its run (`<run>/<parts>`, default checkpoints/ray): an absolute local
    path, or the run directory's URI on cloud storage."""
    parts = parts or (FOLDER, "ray")
    protocol = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
    if protocol == "memory":
        # Ray Train workers are other processes: they cannot see the driver's in-memory filesystem.
        raise ValueError(f"{run.uri}: the train stage needs a run directory Ray Train workers can reach (a local path or cloud storage), not memory://")
    if protocol in ("file", "local"):
        return os.path.abspath(run.path(*parts))
    return run.url(*parts)


def loop_config(cfg: TrainConfig, encoder: str, train_rows: int, checkpoint_root: str | None = None) -> dict:
    """The settings every worker gets; steps per epoch follow from the equal split over workers;
    `checkpoint_root`: Ray Train's run folder, where a restarted worker group also looks for an
    epoch checkpoint Ray Train had not registered when a node was lost (loop.newer_stored_states)."""
    per_worker = train_rows // cfg.num_workers
    return {**dataclasses.asdict(cfg), "encoder": encoder, "steps_per_epoch": max(1, math.ceil(per_worker / cfg.batch_size)), "checkpoint_root": checkpoint_root}


VAL_METRIC = "val_mR"


def checkpoint_config(cfg: TrainConfig):
    """Which epoch checkpoints Ray keeps: the newest ones, or with keep_epoch 'best-val' those with
    the best validation mR (Ray always keeps the latest too, so a stopped run resumes)."""
    from ray.train import CheckpointConfig

    if cfg.keep_epoch == "best-val":
        return CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)


def make_trainer(run: RunDir, cfg: TrainConfig, encoder: str, datasets: dict, train_rows: int):
    """A TorchTrainer over `datasets`: `train_<rank>` read by that rank only, "val" (if present)
    by rank 0; none is split by Ray (the rows of each rank are fixed by `rank_items`, so which
    worker trains on which rows does not depend on timing), and every one keeps its order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = resources(cfg)
    ensure_demand(worker_demand(cfg, res))
    storage, filesystem = storage_path(run), None
    if "://" in storage:  # cloud storage: Ray Train writes through the run's own filesystem (its endpoint, its credentials)
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        storage, filesystem = run.path(FOLDER, "ray"), PyFileSystem(FSSpecHandler(run.fs))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, encoder, train_rows, run.url(FOLDER, "ray", "train")),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=res.num_gpus > 0, resources_per_worker=res.bundle()),
        run_config=RunConfig(
            storage_path=storage,
            storage_filesystem=filesystem,
            name="train",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=checkpoint_config(cfg),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def method_settings(cfg: TrainConfig) -> dict:
    """The settings of the chosen tuning method, for train_meta.json."""
    if cfg.method == "harma":
        return {"harma": {k[len("harma_"):]: getattr(cfg, k) for k in (*HARMA_SETTINGS, "harma_margin")}}
    if cfg.method == "heads":
        return {"heads": {"embed_dim": cfg.embed_dim}}
    return {"lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets)}}


def write_final(run: RunDir, checkpoint_dir: str, meta: dict) -> None:
    """Copy the last epoch checkpoint's adapter and heads (without optimizer state) to `final/`."""
    run.remove(FOLDER, FINAL)
    if os.path.exists(os.path.join(checkpoint_dir, HARMA_FILE)):
        with open(os.path.join(checkpoint_dir, HARMA_FILE), "rb") as f:
            run.write_bytes(f.read(), FOLDER, FINAL, HARMA_FILE)
    elif os.path.isdir(os.path.join(checkpoint_dir, ADAPTER_DIR)):
        run.write_local_folder(os.path.join(checkpoint_dir, ADAPTER_DIR), FOLDER, FINAL, ADAPTER_DIR)
    heads, header = load_heads(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, HEADS_FILE)
        save_tensors(heads, path, {"epoch": header["epoch"]})
        with open(path, "rb") as f:
            run.write_bytes(f.read(), FOLDER, FINAL, HEADS_FILE)
    run.write_json(meta, FOLDER, FINAL, META_FILE)


def read_state(checkpoint_dir: str) -> dict:
    """An epoch checkpoint's state.json (epoch, history, parameter counts)."""
    from rsdist.models.safe_files import read_json_file

    return read_json_file(os.path.join(checkpoint_dir, STATE_FILE))


def check_resume_checkpoints(run: RunDir, parts: tuple = (FOLDER, "ray"), prefix: str = "epoch_", check=check_epoch_checkpoint) -> int:
    """Before Ray Train resumes from `<run>/<parts>/train`, read every file of every checkpoint
    folder there (`<prefix>*`) with `check`, the safe way, so a file that is not what rsdist wrote
    ends the stage with one line naming it (CheckpointError) and nothing in it runs. Returns the
    folders checked."""
    root = run.path(*parts, "train")
    if not run.fs.exists(root):
        return 0
    folders = sorted(p for p in run.fs.ls(root, detail=False) if os.path.basename(p.rstrip("/")).startswith(prefix))
    protocol = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
    for folder in folders:
        if protocol in ("file", "local"):
            check(folder)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run.fs.get(folder, os.path.join(tmp, "c"), recursive=True)
            check(os.path.join(tmp, "c"))
    return len(folders)


def count_on_workers(run: RunDir, selected: bool, splits: tuple[str, ...] | None) -> list[tuple[str, int, int]]:
    """Per features file, in order: (path, wanted rows, selected rows), counted by Ray tasks."""
    import ray

    files = run.parquet_files("features")
    if not files:
        raise FileNotFoundError(f"{run.url('features')}: no parquet files (run the features stage first)")
    task = ray.remote(num_cpus=READ_CPUS)(count_wanted)
    counts = ray.get([task.remote(run, f, selected, splits) for f in files])
    return [(f, n, k) for f, (n, k) in zip(files, counts)]


def training_datasets(run: RunDir, cfg: TrainConfig, encoder: str) -> tuple[dict, int, int]:
    """The Ray Datasets the workers read (`train_<rank>`: rank r's equal contiguous share of the
    selected non-test rows in features-file order; `val` with keep_epoch best-val), the training
    rows and the selected rows. Rows are read, filtered and joined with captions by Ray tasks."""
    import ray

    n_selected, missing = ray.get(ray.remote(num_cpus=READ_CPUS)(manifest_summary).remote(run))
    counts = count_on_workers(run, True, None)
    if missing is not None:
        raise ValueError(f"{run.url(*MANIFEST)}: selected sample {missing} has no row in {run.url('features')}")
    n_test = sum(k for _, _, k in counts) - sum(n for _, n, _ in counts)
    if n_test:
        log.warning("train: %d selected rows are in the test split; they are held out and not trained on", n_test)
    n_rows = sum(n for _, n, _ in counts)
    if n_rows < cfg.num_workers:
        raise ValueError(f"train: {n_rows} selected training rows, fewer than train.num_workers={cfg.num_workers}")
    caption_features = (encoder, cfg.seed, cfg.max_text_tokens) if cfg.method == "heads" else None
    ranks = rank_items([(f, n) for f, n, _ in counts], cfg.num_workers)
    datasets = {rank_dataset(r): worker_dataset(run, items, True, None, cfg.read_block_rows, caption_features) for r, items in enumerate(ranks)}
    if cfg.keep_epoch == "best-val":
        val_counts = count_on_workers(run, False, ("val",))
        n_val = sum(n for _, n, _ in val_counts)
        if n_val == 0:
            raise ValueError(f"{run.url('features')}: train.keep_epoch 'best-val' needs validation rows (split == 'val'); set data.val_fraction or give the data a val split")
        log.info("train: %d validation rows score every epoch; the best is kept", n_val)
        items = [{"file": f, "skip": 0, "take": n} for f, n, _ in val_counts if n]
        datasets["val"] = worker_dataset(run, items, False, ("val",), cfg.read_block_rows, caption_features)
    return datasets, n_rows, n_selected


def run(run: RunDir, cfg: TrainConfig) -> StageResult:
    """Train on the selected rows; resume from `<run>/checkpoints/ray` when an earlier run stopped."""
    check_resources(cfg)
    if check_resume_checkpoints(run):
        log.info("train: resuming from the epoch checkpoints in %s", storage_path(run))
    encoder = features_encoder(run)
    datasets, n_rows, n_selected = training_datasets(run, cfg, encoder)
    log.info("train: %d selected rows, %d workers, %d epochs", n_rows, cfg.num_workers, cfg.epochs)
    trainer = make_trainer(run, cfg, encoder, datasets, n_rows)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"train: Ray Train finished without a checkpoint under {storage_path(run)}")
    with result.checkpoint.as_directory() as folder:
        state = read_state(folder)  # the last epoch's: the whole history
    kept = result.get_best_checkpoint(VAL_METRIC, "max") if cfg.keep_epoch == "best-val" else result.checkpoint
    with kept.as_directory() as folder:
        kept_epoch = state["epoch"] if kept is result.checkpoint else read_state(folder)["epoch"]
        history = state["history"]
        meta = {
            "encoder": encoder,
            "embed_dim": cfg.embed_dim,
            "seed": cfg.seed,
            "method": cfg.method,
            **method_settings(cfg),
            "epochs": state["epoch"],
            "keep_epoch": cfg.keep_epoch,
            "kept_epoch": kept_epoch,
            "history": history,
            "epoch_loss": [h["loss"] for h in history],
            "trainable_params": state["trainable_params"],
            "total_params": state["total_params"],
            "full_finetune_params": state["full_finetune_params"],
            "trainable_share_of_full": round(state["trainable_params"] / state["full_finetune_params"], 6),
            "selected_rows": n_selected,
            "train_rows": history[-1]["rows"],
            "num_workers": cfg.num_workers,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "seconds": round(seconds, 3),
            "train_seconds": round(sum(h["seconds"] for h in history), 3),
            "settings": dataclasses.asdict(cfg),
        }
        write_final(run, folder, meta)
    log.info("train: %s, %d epochs (epoch %d kept), final loss %.4f, %d trainable parameters (full fine-tuning: %d)", cfg.method, meta["epochs"], kept_epoch, meta["epoch_loss"][-1], meta["trainable_params"], meta["full_finetune_params"])
    return StageResult(
        rows_in=n_selected,
        rows_out=meta["train_rows"],
        extra={
            "epochs": meta["epochs"],
            "kept_epoch": kept_epoch,
            "final_loss": meta["epoch_loss"][-1],
            "trainable_params": meta["trainable_params"],
            "total_params": meta["total_params"],
            "full_finetune_params": meta["full_finetune_params"],
            "method": cfg.method,
            "train_seconds": meta["train_seconds"],
        },
    )


STAGE = Stage(name="train", folder=FOLDER, reads=("selection", "features", "shards"), section="train", resources=resources, run=run, resumable=True, placement=check_resources)
