"""Ray Train V2 loop for VLM instruction LoRA, and the stage function that runs it.

Input: `<run>/selection/manifest.parquet` (selected == True, test split excluded) joined with
`<run>/shards/` (image, conversations, text, answer, captions); the joined rows go to Ray Data and
each worker streams its part with `get_dataset_shard("train")`.
Per worker: micro-batches of `batch_size` conversations encoded by `rsdist.train.vlm.encode_batch`,
`grad_accum` micro-batches per optimizer step (AdamW, linear warm-up then decay), DDP through
`prepare_model` (FSDP with `fsdp` on GPU; bf16 autocast with `bf16` on GPU; both untested here).
Every `checkpoint_every` optimizer steps and at the end, every worker reports; rank 0 attaches a
checkpoint: `adapter/` (peft, with the projector when trainable), `trainer.pt` (optimizer,
schedule, epoch, step, micro-batches done in the epoch) and `state.json` (step history with the
sample ids each step trained on). A run with the same storage path and name resumes at the saved
step and skips the micro-batches of the epoch already trained on (exactly the same rows with one
worker, where the order is fixed; with several, Ray's split decides which rows each worker gets).
Output: `<run>/checkpoints/vlm/final/adapter/` + `train_meta.json` (parameter counts, history).
Resources: `num_workers` workers of `cpus_per_worker` CPUs, one GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rsdist.io.rundir import RunDir
from rsdist.raycluster import cluster_gpus
from rsdist.stage import StageResult
from rsdist.train.loop import warmup_then_linear
from rsdist.train.vlm import VlmTrainConfig, apply_lora, encode_batch, parameter_counts

STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"
ADAPTER = "adapter"
STAGE = ("checkpoints", "vlm")
ROW_COLUMNS = ["sample_id", "image", "conversations", "text", "answer", "captions", "split"]


def vlm_training_rows(run: RunDir) -> pa.Table:
    """Selected, non-test shard rows with what encode_batch reads, sorted by sample_id."""
    from rsdist.train.data import _filtered, selected_ids

    ids = selected_ids(run)
    rows = _filtered(run, "shards", ROW_COLUMNS, lambda b: pc.is_in(b.column("sample_id"), value_set=ids))
    if rows.num_rows < len(ids):
        have = set(rows.column("sample_id").to_pylist())
        missing = next(s for s in ids.to_pylist() if s not in have)
        raise ValueError(f"{run.url('selection', 'manifest.parquet')}: selected sample {missing} has no row in {run.url('shards')}")
    rows = rows.filter(pc.invert(pc.fill_null(pc.equal(rows.column("split"), "test"), False)))
    return rows.sort_by("sample_id")


def _save(folder: str, model, optimizer, scheduler, position: dict, history: list[dict]) -> None:
    model.save_pretrained(os.path.join(folder, ADAPTER))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **position}, os.path.join(folder, TRAINER_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({**position, "history": history}, f)


def _restore(model, optimizer, scheduler, checkpoint) -> tuple[dict, list[dict]]:
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    with checkpoint.as_directory() as folder:
        set_peft_model_state_dict(model, load_peft_weights(os.path.join(folder, ADAPTER), device="cpu"))
        state = torch.load(os.path.join(folder, TRAINER_FILE), map_location="cpu", weights_only=False)
        with open(os.path.join(folder, STATE_FILE)) as f:
            history = json.load(f)["history"]
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    return state, history


def vlm_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from rsdist.train.vlm_models import load_vlm

    cfg = VlmTrainConfig(**{k: config[k] for k in (f.name for f in dataclasses.fields(VlmTrainConfig))})
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    base, processor = load_vlm(cfg.model, seed=cfg.seed)
    model = apply_lora(base, cfg)
    counts = parameter_counts(model)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = config["steps_per_epoch"] * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, int(cfg.warmup_fraction * total_steps)))

    position, history = {"epoch": 0, "step": 0, "micro_done": 0}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        position, history = _restore(model, optimizer, scheduler, checkpoint)
        if rank == 0:
            print(f"train vlm: resuming at step {position['step']} (epoch {position['epoch'] + 1}, micro-batch {position['micro_done']})", flush=True)
    use_gpu = device.type == "cuda"
    strategy = "fsdp" if cfg.fsdp and use_gpu else "ddp"
    ddp = ray.train.torch.prepare_model(model, parallel_strategy=strategy)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and use_gpu else torch.autocast("cpu", enabled=False)

    def report(final: bool) -> None:
        metrics = {**position, **counts, "loss": history[-1]["loss"] if history else float("nan"), "final": final}
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                _save(folder, model, optimizer, scheduler, position, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"step_{position['step']:06d}")
        else:
            ray.train.report(metrics)

    shard = ray.train.get_dataset_shard("train")
    stop = cfg.max_steps or math.inf
    while position["epoch"] < cfg.epochs and position["step"] < stop:
        ddp.train()
        micro, losses, ids, started = 0, [], [], time.perf_counter()
        for table in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"):
            micro += 1
            if micro <= position["micro_done"]:
                continue  # trained on before the restart
            rows = table.to_pylist()
            batch = {k: v.to(device) for k, v in encode_batch(processor, rows, cfg.max_pixels, cfg.min_pixels, cfg.max_tokens).items()}
            with autocast:
                loss = ddp(**batch).loss / cfg.grad_accum
            loss.backward()
            losses.append(float(loss.detach()) * cfg.grad_accum)
            ids += [r["sample_id"] for r in rows]
            if micro % cfg.grad_accum:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.update(step=position["step"] + 1, micro_done=micro)
            history.append({"step": position["step"], "epoch": position["epoch"] + 1, "loss": sum(losses) / len(losses), "sample_ids": ids,
                            "seconds": round(time.perf_counter() - started, 3)})
            if rank == 0:
                print(f"train vlm: step {position['step']}/{total_steps} loss {history[-1]['loss']:.4f}", flush=True)
            losses, ids, started = [], [], time.perf_counter()
            if position["step"] >= stop:
                break
            if position["step"] % cfg.checkpoint_every == 0:
                report(final=False)
        else:
            position.update(epoch=position["epoch"] + 1, micro_done=0)  # leftover micro-batches (< grad_accum) are dropped
    report(final=True)


def run_vlm(run: RunDir, cfg: VlmTrainConfig) -> StageResult:
    """Instruction-tune `cfg.model` with LoRA on the selected rows; resume from `<run>/checkpoints/vlm/ray`."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows = vlm_training_rows(run)
    per_worker = rows.num_rows // cfg.num_workers
    if per_worker < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"train.vlm: {rows.num_rows} training rows over {cfg.num_workers} workers is less than one optimizer step (batch_size x grad_accum)")
    steps_per_epoch = per_worker // (cfg.batch_size * cfg.grad_accum)
    protocol = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
    storage = os.path.abspath(run.path(*STAGE, "ray")) if protocol in ("file", "local") else run.url(*STAGE, "ray")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # a fixed row order makes "skip the micro-batches done" exact
    trainer = TorchTrainer(
        vlm_train_loop,
        train_loop_config={**dataclasses.asdict(cfg), "steps_per_epoch": steps_per_epoch},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cluster_gpus() > 0, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(storage_path=storage, name="train", failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
        datasets={"train": ray.data.from_arrow(rows)},
        dataset_config=DataConfig(execution_options=ctx.execution_options),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        run.remove(*STAGE, "final")
        for name in sorted(os.listdir(os.path.join(folder, ADAPTER))):
            with open(os.path.join(folder, ADAPTER, name), "rb") as f:
                run.write_bytes(f.read(), *STAGE, "final", ADAPTER, name)
    meta = {**{k: result.metrics[k] for k in ("trainable_params", "total_params", "trainable_percent")}, "steps": state["step"], "epochs_done": state["epoch"],
            "history": state["history"], "train_rows": rows.num_rows, "seconds": round(time.perf_counter() - started, 3), "settings": dataclasses.asdict(cfg)}
    run.write_json(meta, *STAGE, "final", "train_meta.json")
    return StageResult(rows_in=rows.num_rows, rows_out=rows.num_rows, extra={"steps": state["step"], "trainable_params": meta["trainable_params"], "total_params": meta["total_params"]})
