"""Ray Train V2 loop for VLM instruction LoRA, and the stage function that runs it.

Input: `<run>/selection/manifest.parquet` (selected == True) joined with `<run>/shards/`. The
driver reads only the `sample_id` and `split` columns to find the training ids (selected, present,
not test); Ray Data read tasks stream each shard file in record batches and keep those rows only
(image, conversations, text, answer, captions), so neither the driver nor a worker holds the pool;
each worker streams its part with `get_dataset_shard("train")`.
Per worker: `grad_accum` micro-batches of `batch_size` conversations (`encode_batch`) per optimizer
step, their loss normalised by the step's supervised tokens (`accumulate_gradients`: the same
update as one batch of all rows); AdamW, linear warm-up then decay. `strategy`: `ddp` through
`prepare_model` (unused parameters allowed: text-only batches leave the vision side without
gradients), or `fsdp` (torch FSDP2 `fully_shard` on every language-model decoder layer, then the whole
model; the vision tower and projector stay whole on each worker, their gradients averaged by hand). bf16 autocast on GPU (`bf16`); gradient checkpointing (`gradient_checkpointing`).
Every `checkpoint_every` optimizer steps and at the end, every worker reports; the adapter and
optimizer state are gathered in full (a collective, needed under FSDP) and rank 0 attaches a
checkpoint: `adapter/` (peft safetensors, with the projector when trainable), `optimizer.pt`
(optimizer state keyed by parameter name: tensors and numbers only, read back with
`weights_only=True`) and `state.json` (schedule state, epoch, step, micro-batches done in the
epoch, step history with the sample ids each step trained on). Before a resume the driver reads
every file of every checkpoint the safe way (rsdist/models/safe_files.py); a file that is not what
rsdist wrote ends the run with one line naming it. Every optimizer step draws its random numbers
(LoRA dropout) from a generator seeded by (seed, rank, step), so a resumed run draws what an
uninterrupted one would. A run with the same storage path and name
(`<run>/vlm_checkpoints/ray`, `train`) resumes at the saved step and skips the micro-batches of the
epoch already trained on: exactly the same rows with one worker, where the order is fixed; with
several, Ray's split decides which rows each worker gets. Worker failures restart from the last
checkpoint up to `max_failures` times (`FailureConfig`).
Output: `<run>/vlm_checkpoints/final/adapter/` + `train_meta.json` (parameter counts, history:
the loss of every optimizer step, the training loss curve of the report).
Rows become conversations by `rsdist.models.instructions.row_turns`, with the pool's scene classes
(`pool_classes`, read once by the driver from the shards' label column) in the classification prompt.
Resources: `num_workers` workers of `cpus_per_worker` CPUs and, when `device` means GPUs (cuda, or
auto on a cluster that has or can add GPU nodes), `gpus_per_worker` GPUs each (worker_resources).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rsdist.core.rundir import RunDir
from rsdist.core.raycluster import Demand, ensure_demand, use_gpus
from rsdist.models.safe_files import check_adapter_folder, load_torch_state, read_json_file, save_torch_state
from rsdist.stage import Resources, StageResult
from rsdist.train.loop import warmup_then_linear
from rsdist.train.stage import check_resume_checkpoints, storage_path
from rsdist.train.vlm import VlmTrainConfig, accumulate_gradients, apply_lora, enable_gradient_checkpointing, encode_batch, parameter_counts

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER = "adapter"
FOLDER = ("vlm_checkpoints",)
ROW_COLUMNS = ["sample_id", "image", "task", "conversations", "text", "answer", "captions", "label"]


# -- rows: manifest x shards, streamed --------------------------------------------------------------
def vlm_training_ids(run: RunDir) -> pa.Array:
    """Ids of the selected, non-test shard rows in shard order; reads only sample_id and split."""
    from rsdist.core.rows import _filtered, check_selected_found, selected_ids

    ids = selected_ids(run)
    rows = _filtered(run, "shards", ["sample_id", "split"], lambda b: pc.is_in(b.column("sample_id"), value_set=ids))
    check_selected_found(run, ids, rows.column("sample_id"), "shards")
    rows = rows.filter(pc.invert(pc.fill_null(pc.equal(rows.column("split"), "test"), False)))
    return rows.column("sample_id").combine_chunks()


def read_training_rows(batch: pa.Table, run: RunDir, ids: pa.Array) -> Iterator[pa.Table]:
    """Ray Data read task: the rows of one shard file (`batch["file"]`) whose sample_id is in `ids`,
    streamed in record batches."""
    import pyarrow.parquet as pq

    for path in batch.column("file").to_pylist():
        with run.fs.open(path, "rb") as f:
            for records in pq.ParquetFile(f).iter_batches(batch_size=256, columns=ROW_COLUMNS):
                kept = pa.Table.from_batches([records]).filter(pc.is_in(records.column("sample_id"), value_set=ids))
                if kept.num_rows:
                    yield kept


def vlm_training_dataset(run: RunDir, ids: pa.Array):
    """Lazy Ray Dataset of the training rows: one read task per shard file, in file order."""
    import ray.data

    files = run.parquet_files("shards")
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_training_rows, batch_size=1, batch_format="pyarrow", fn_kwargs={"run": run, "ids": ids})


# -- model: parallel wrapping, checkpoints ------------------------------------------------------------
def _move_outside(module, keep, device) -> None:
    """Move `module` to `device` except the subtree `keep` (left where it is)."""
    for child in module.children():
        if child is keep:
            continue
        if any(m is keep for m in child.modules()):
            _move_outside(child, keep, device)
        else:
            child.to(device)
    for name, param in module.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        module._buffers[name] = buffer.to(device)


def shard_with_fsdp(model, device, mixed_precision: bool):
    """FSDP2 over the language model: each decoder layer is one sharded unit, the embeddings and
    head the root unit. The vision tower and projector stay whole on every worker (FSDP ignores
    them; `sync_replicated_grads` averages their gradients): a text-only batch skips them, and a
    sharded unit that some workers run and others skip would leave the collectives mismatched."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from rsdist.models.vlm import family_of

    lm = model.get_submodule("base_model.model." + family_of(model).lm)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(lm.modules()):
        if type(module).__name__ in layer_names:
            fully_shard(module, mp_policy=policy)
    _move_outside(model, lm, device)
    model.replicated_params = replicated_params(model, lm)
    return fully_shard(model, mp_policy=policy, ignored_params=set(model.replicated_params))


def replicated_params(model, lm) -> list:
    """Trainable and frozen parameters outside the language model and its output head."""
    inside = {id(p) for p in lm.parameters()} | {id(p) for p in model.get_output_embeddings().parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def sync_replicated_grads(params: list) -> None:
    """Average the gradients of FSDP-ignored trainable parameters over the workers (a missing
    gradient counts as zero, so every worker joins every all-reduce)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def wrap_model(model, cfg: VlmTrainConfig, device, use_gpu: bool):
    """The module the loop calls: DDP through Ray (a no-op with one worker) or FSDP2 shards."""
    import ray.train.torch

    if cfg.strategy == "fsdp":
        return shard_with_fsdp(model, device, mixed_precision=cfg.bf16 and use_gpu)
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs={"find_unused_parameters": True})


def gradient_sync(wrapped):
    """sync(last) for accumulate_gradients: DDP all-reduces on the last micro-batch only."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return lambda last: contextlib.nullcontext() if last else wrapped.no_sync()
    return None


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state gathered in full on rank 0 (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _save(folder: str, model, weights: dict, optimizer_state: dict, scheduler, position: dict, history: list[dict]) -> None:
    model.save_pretrained(os.path.join(folder, ADAPTER), state_dict=weights, safe_serialization=True)
    save_torch_state({"optimizer": optimizer_state}, os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({**position, "scheduler": scheduler.state_dict(), "history": history}, f)


def check_step_checkpoint(folder: str) -> dict:
    """Read every file of a step checkpoint the safe way (CheckpointError naming a bad one); return its state.json."""
    state = read_json_file(os.path.join(folder, STATE_FILE))
    check_adapter_folder(os.path.join(folder, ADAPTER))
    load_torch_state(os.path.join(folder, OPTIMIZER_FILE))
    return state


def _restore_adapter(model, folder: str) -> tuple[dict, list[dict]]:
    """Adapter weights into the (not yet wrapped) model; the trainer state (optimizer, schedule,
    position) and history."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    state = check_step_checkpoint(folder)
    set_peft_model_state_dict(model, load_peft_weights(os.path.join(folder, ADAPTER), device="cpu"))
    state["optimizer"] = load_torch_state(os.path.join(folder, OPTIMIZER_FILE))["optimizer"]
    return state, state.pop("history")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of worker `rank` for optimizer step `step` (1-based), resumed or not."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def _restore_optimizer(model, optimizer, scheduler, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state.pop("scheduler"))


def micro_batches(shard, cfg: VlmTrainConfig, skip: int) -> Iterator[tuple[int, list[dict]]]:
    """(1-based index, rows) of the worker's micro-batches in this epoch, the first `skip` left out."""
    for index, table in enumerate(shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"), start=1):
        if index > skip:
            yield index, table.to_pylist()


def vlm_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from rsdist.models.vlm import load_vlm

    cfg = VlmTrainConfig(**{k: config[k] for k in (f.name for f in dataclasses.fields(VlmTrainConfig))})
    classes = config.get("classes") or None
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    base, processor = load_vlm(cfg.model, seed=cfg.seed)
    model = apply_lora(base, cfg)
    counts = parameter_counts(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    position, history, state = {"epoch": 0, "step": 0, "micro_done": 0}, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, history = _restore_adapter(model, folder)
        position = {k: state[k] for k in position}
        if rank == 0:
            print(f"train vlm: resuming at step {position['step']} (epoch {position['epoch'] + 1}, micro-batch {position['micro_done']})", flush=True)
    wrapped = wrap_model(model, cfg, device, use_gpu)  # moves the model to the device (FSDP: one layer at a time)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = config["steps_per_epoch"] * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, int(cfg.warmup_fraction * total_steps)))
    if state is not None:
        _restore_optimizer(model, optimizer, scheduler, state)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and use_gpu else None
    sync = gradient_sync(wrapped)

    def report(final: bool) -> None:
        weights, optimizer_state = _full_state(model, optimizer)
        metrics = {**position, **counts, "loss": history[-1]["loss"] if history else float("nan"), "final": final}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                _save(folder, model, weights, optimizer_state, scheduler, position, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"step_{position['step']:06d}")
        else:
            ray.train.report(metrics)

    shard = ray.train.get_dataset_shard("train")
    stop = cfg.max_steps or math.inf
    while position["epoch"] < cfg.epochs and position["step"] < stop:
        wrapped.train()
        pending, started = [], time.perf_counter()
        for index, rows in micro_batches(shard, cfg, skip=position["micro_done"]):
            if not pending:
                torch.manual_seed(step_seed(cfg.seed, rank, position["step"] + 1))
            pending.append(rows)
            if len(pending) < cfg.grad_accum:
                continue
            batches = [{k: v.to(device) for k, v in encode_batch(processor, r, cfg.max_pixels, cfg.min_pixels, cfg.max_tokens, classes).items()} for r in pending]
            loss = accumulate_gradients(wrapped, batches, sync=sync, autocast=autocast)
            if cfg.strategy == "fsdp":
                sync_replicated_grads(model.replicated_params)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.update(step=position["step"] + 1, micro_done=index)
            history.append({"step": position["step"], "epoch": position["epoch"] + 1, "loss": loss,
                            "sample_ids": [r["sample_id"] for rows_ in pending for r in rows_], "seconds": round(time.perf_counter() - started, 3)})
            if rank == 0:
                print(f"train vlm: step {position['step']}/{total_steps} loss {loss:.4f}", flush=True)
            pending, started = [], time.perf_counter()
            if position["step"] >= stop:
                break
            if position["step"] % cfg.checkpoint_every == 0:
                report(final=False)
        else:
            position.update(epoch=position["epoch"] + 1, micro_done=0)  # leftover micro-batches (< grad_accum) are dropped
    report(final=True)


def worker_resources(cfg: VlmTrainConfig) -> Resources:
    """What each training worker asks for: `gpus_per_worker` GPUs when `train.vlm.device` means
    them (cuda, present or not, so an autoscaler adds GPU nodes; auto on a cluster that has or can
    add GPU nodes), else CPUs only."""
    gpus = cfg.gpus_per_worker if use_gpus(cfg.device) else 0.0
    return Resources(num_cpus=cfg.cpus_per_worker, num_gpus=gpus)


GPU_SETTING = "train.vlm.device=cuda with train.vlm.gpus_per_worker"


def worker_demand(cfg: VlmTrainConfig, res: Resources) -> Demand:
    """The training workers' demand: `num_workers` of them, all placed at once (Ray Train)."""
    return Demand(res.bundle(), {"CPU": "train.vlm.cpus_per_worker", "GPU": GPU_SETTING}, count=cfg.num_workers, count_setting="train.vlm.num_workers")


def optimizer_steps_per_epoch(rows_per_worker: int, batch_size: int, grad_accum: int) -> int:
    """The loop's steps per epoch: the last micro-batch may be partial, leftover micro-batches
    (fewer than grad_accum) are dropped."""
    return math.ceil(rows_per_worker / batch_size) // grad_accum


def run_vlm(run: RunDir, cfg: VlmTrainConfig) -> StageResult:
    """Instruction-tune `cfg.model` with LoRA on the selected rows; resume from `<run>/vlm_checkpoints/ray`."""
    import ray.data

    from rsdist.models.instructions import pool_classes
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = worker_resources(cfg)
    ensure_demand(worker_demand(cfg, res))
    check_resume_checkpoints(run, (*FOLDER, "ray"), "step_", check_step_checkpoint)
    ids = vlm_training_ids(run)
    per_worker = len(ids) // cfg.num_workers
    if per_worker < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"train.vlm: {len(ids)} training rows over {cfg.num_workers} workers is less than one optimizer step (batch_size x grad_accum)")
    steps_per_epoch = optimizer_steps_per_epoch(per_worker, cfg.batch_size, cfg.grad_accum)
    storage = storage_path(run, *FOLDER, "ray")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # a fixed row order makes "skip the micro-batches done" exact
    trainer = TorchTrainer(
        vlm_train_loop,
        train_loop_config={**dataclasses.asdict(cfg), "steps_per_epoch": steps_per_epoch, "classes": pool_classes(run)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=res.num_gpus > 0, resources_per_worker=res.bundle()),
        run_config=RunConfig(storage_path=storage, name="train", failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
        datasets={"train": vlm_training_dataset(run, ids)},
        dataset_config=DataConfig(execution_options=ctx.execution_options),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        run.remove(*FOLDER, "final")
        run.write_local_folder(os.path.join(folder, ADAPTER), *FOLDER, "final", ADAPTER)
    meta = {**{k: result.metrics[k] for k in ("trainable_params", "total_params", "trainable_percent")}, "steps": state["step"], "epochs_done": state["epoch"],
            "history": state["history"], "train_rows": len(ids), "seconds": round(time.perf_counter() - started, 3), "settings": dataclasses.asdict(cfg)}
    run.write_json(meta, *FOLDER, "final", "train_meta.json")
    losses = [h["loss"] for h in state["history"]]
    extra = {"model": cfg.model, "steps": state["step"], "trainable_params": meta["trainable_params"], "total_params": meta["total_params"],
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}
    return StageResult(rows_in=len(ids), rows_out=len(ids), extra=extra)
