"""DDP and FSDP2 on two CPU processes (gloo): the same losses and the same trained adapter, with one
worker's batches text-only (the vision side unused there) and vision LoRA + a trainable projector."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(strategy: str, rank: int) -> tuple[list[float], dict]:
    from rsdist.train.vlm import VlmTrainConfig, accumulate_gradients, apply_lora, encode_batch
    from rsdist.train.vlm_loop import _full_state, gradient_sync, shard_with_fsdp, sync_replicated_grads
    from rsdist.models.vlm import load_vlm
    from tests.train.test_vlm import ROWS

    base, processor = load_vlm("llava-tiny", seed=0)
    torch.manual_seed(0)
    model = apply_lora(base, VlmTrainConfig(model="llava-tiny", vision="lora", projector="trainable", lora_dropout=0.0))
    if strategy == "fsdp":
        wrapped = shard_with_fsdp(model, torch.device("cpu"), mixed_precision=False)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    rows = ROWS if rank == 0 else [ROWS[1], ROWS[1]]  # rank 1: text-only rows
    batches = [encode_batch(processor, rows, max_pixels=56 * 56), encode_batch(processor, ROWS[1:], max_pixels=56 * 56)]
    losses = []
    for _ in range(STEPS):
        losses.append(accumulate_gradients(wrapped, batches, sync=gradient_sync(wrapped)))
        if strategy == "fsdp":
            sync_replicated_grads(model.replicated_params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights, _ = _full_state(model, optimizer)
    return losses, weights


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        results = {s: _train(s, rank) for s in ("ddp", "fsdp")}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_like_ddp_on_two_workers(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        (ddp_losses, ddp_weights), (fsdp_losses, fsdp_weights) = results["ddp"], results["fsdp"]
        assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
        if rank == 0:  # the full adapter is gathered on rank 0 only
            assert fsdp_weights.keys() == ddp_weights.keys()
            assert any("vision_tower" in k and "lora_B" in k for k in fsdp_weights) and any("multi_modal_projector" in k for k in fsdp_weights)
            for k in ddp_weights:
                torch.testing.assert_close(fsdp_weights[k], ddp_weights[k], rtol=1e-4, atol=1e-5, msg=k)
            assert any(float(v.abs().sum()) > 0 for k, v in fsdp_weights.items() if "lora_B" in k)  # trained: lora_B starts at zero

