"""Which epoch checkpoint a restarted worker group resumes from when Ray Train had not registered
the newest one (its node was lost between rank 0's upload and the controller's poll): the newest
complete folder in the run folder, never one whose upload was cut short."""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from rsdist.config import TrainConfig
from rsdist.models.encoders import build_encoder
from rsdist.models.tuned import make_tunable
from rsdist.train.loop import complete_state, epoch_folder, newer_stored_states, write_epoch_checkpoint


def write_epochs(root: str, epochs: int, method: str = "lora") -> None:
    """Epoch checkpoints 1..epochs of a tiny encoder, written as the training loop writes them."""
    settings = {**dataclasses.asdict(TrainConfig(method=method, embed_dim=16, lora_r=4, lora_alpha=8))}
    encoder = make_tunable(build_encoder("tiny", embed_dim=16), settings)
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for epoch in range(1, epochs + 1):
        folder = os.path.join(root, epoch_folder(epoch))
        os.makedirs(folder)
        write_epoch_checkpoint(folder, encoder, optimizer, scheduler, {"epoch": epoch, "history": [], "method": method})


def newer_stored_epochs(root: str, method: str, after: int) -> list[int]:
    return [state["epoch"] for state in newer_stored_states(root, method, after)]


def test_the_complete_epochs_after_ray_trains_own_are_found(tmp_path):
    root = str(tmp_path / "train")
    write_epochs(root, 3)
    assert newer_stored_epochs(root, "lora", after=0) == [1, 2, 3]
    assert newer_stored_epochs("file://" + root, "lora", after=1) == [2, 3]  # the run folder's URI, as the stage passes it
    assert newer_stored_epochs(root, "lora", after=3) == []  # Ray Train's own is the newest: nothing to add
    # an upload cut short: a truncated optimizer state, then a missing adapter folder
    with open(os.path.join(root, epoch_folder(3), "optimizer.pt"), "r+b") as f:
        f.truncate(100)
    assert complete_state(os.path.join(root, epoch_folder(3)), "lora") is None
    assert newer_stored_epochs(root, "lora", after=0) == [1, 2]
    shutil.rmtree(os.path.join(root, epoch_folder(2), "text_adapter"))  # would pass for a heads-only checkpoint
    assert newer_stored_epochs(root, "lora", after=0) == [1]
    assert newer_stored_epochs(str(tmp_path / "none"), "lora", after=0) == []


def test_a_run_folder_on_another_file_system_is_fetched_and_checked(tmp_path):
    """The object-store branch of stored_folder: each folder is downloaded to a temporary one
    (fsspec's in-memory file system stands in for the bucket)."""
    import fsspec

    root = str(tmp_path / "train")
    write_epochs(root, 2)
    with open(os.path.join(root, epoch_folder(2), "optimizer.pt"), "r+b") as f:
        f.truncate(100)  # epoch 2's upload cut short
    memory = fsspec.filesystem("memory")
    memory.put(root, "/bucket/run/train", recursive=True)
    try:
        assert newer_stored_epochs("memory://bucket/run/train", "lora", after=0) == [1]
        assert newer_stored_epochs("memory://bucket/run/train", "lora", after=1) == []
    finally:
        memory.rm("/bucket", recursive=True)
