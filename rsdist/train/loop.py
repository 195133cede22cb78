"""The Ray Train loop each worker runs: LoRA, HarMA or heads only (`method`) on the selected rows,
one checkpoint per epoch.

Each worker streams its own dataset, `ray.train.get_dataset_shard("train_<rank>")`: Ray Data read
tasks that take the rank's equal contiguous share of the selected rows from the run directory (the
shares are equal, so every worker takes the same number of steps, which DDP needs). Per step it
draws one caption per image (seeded by seed, epoch and sample id, so the several captions of an
image are all used across epochs; with method 'heads' the rows carry the frozen text tower's features
of every caption, so the tower is not run), and minimises symmetric InfoNCE within its local batch (method
'lora') or the HarMA loss, InfoNCE + weighted triplet (method 'harma').
With `keep_epoch: best-val`, rank 0 also measures mR on the validation rows (dataset "val", given
whole to every worker, read once) after each epoch and reports it as `val_mR`, by which Ray keeps
the best checkpoints.
After each epoch every worker calls `ray.train.report` once; only rank 0 attaches a checkpoint:
`text_adapter/` or `harma.safetensors`, `heads.safetensors` (heads, logit_scale), `optimizer.pt`
(AdamW state: tensors and numbers only, read back with `weights_only=True`) and `state.json`
(epoch, history, the schedule's state, parameter counts). On start, `ray.train.get_checkpoint()`
gives the last finished epoch of an earlier run (or of this run's worker group before a failure)
with the same storage path and name; training continues after it, or after the newer complete
epoch checkpoints in the run folder that Ray Train had not yet registered when a node was lost
(`newer_stored_states`; rank 0 decides, every rank follows, and those epochs are reported again).

A resumed run trains exactly as an uninterrupted one: every random draw of an epoch (dropout in
the text tower, LoRA dropout) comes from a generator seeded at the start of that epoch from
(seed, rank, epoch) (`epoch_seed`), the captions and the shuffle are seeded by epoch, and the
optimizer and schedule state are restored; so no random state needs to be saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import time

import numpy as np
import torch

from rsdist.core.metrics import retrieval_metrics
from rsdist.models.encoders import build_encoder
from rsdist.core.rows import pick_caption, pick_caption_index
from rsdist.models.harma import harma_loss
from rsdist.train.loss import info_nce
from rsdist.models.safe_files import load_torch_state, read_json_file, save_torch_state
from rsdist.models.tuned import ContrastivePair, clamp_logit_scale, count_parameters, load_adapter_weights, load_heads, make_tunable, save_trained

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of worker `rank` in `epoch` (0-based): the same whether or not the run was
    resumed before that epoch."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def warmup_then_linear(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _all_reduce_sum(values: list[float]) -> list[float]:
    """Sum numbers over all workers (identity when not distributed)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def check_epoch_checkpoint(folder: str) -> dict:
    """Read every file of an epoch checkpoint the safe way (CheckpointError naming a bad one);
    return its state.json."""
    from rsdist.models.tuned import check_checkpoint

    state = read_json_file(os.path.join(folder, STATE_FILE))
    check_checkpoint(folder)
    load_torch_state(os.path.join(folder, OPTIMIZER_FILE))
    return state


def write_epoch_checkpoint(folder: str, encoder, optimizer, scheduler, state: dict) -> None:
    """An epoch checkpoint: the adapter and heads (save_trained), optimizer.pt and state.json
    (`state`: epoch, history, method, parameter counts; plus the schedule's state)."""
    save_trained(encoder, folder, {"epoch": state["epoch"]})
    save_torch_state({"optimizer": optimizer.state_dict()}, os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({**state, "scheduler": scheduler.state_dict()}, f, indent=2)


def _restore(encoder, optimizer, scheduler, folder: str) -> tuple[int, list[dict]]:
    """Load an epoch checkpoint folder into the model and optimizer; return (epochs done, history)."""
    state = read_json_file(os.path.join(folder, STATE_FILE))
    heads, _ = load_heads(folder)
    load_adapter_weights(encoder, folder)
    saved = load_torch_state(os.path.join(folder, OPTIMIZER_FILE))
    encoder.load_head_state(heads)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


def epoch_folder(epoch: int) -> str:
    """The name of the checkpoint folder of `epoch` (1-based) in Ray Train's run folder."""
    return f"epoch_{epoch:04d}"


def folder_epoch(name: str) -> int:
    """The epoch an `epoch_NNNN` checkpoint folder holds (0 for any other name)."""
    head, _, number = os.path.basename(name.rstrip("/")).partition("_")
    return int(number) if head == "epoch" and number.isdigit() else 0


@contextlib.contextmanager
def stored_folder(root: str, name: str):
    """A checkpoint folder of Ray Train's run folder `root` (any fsspec URI) as a local folder:
    itself on a file system, a downloaded copy on an object store."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        yield os.path.join(path, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(posixpath.join(path, name), os.path.join(tmp, name), recursive=True)
        yield os.path.join(tmp, name)


def complete_state(folder: str, method: str) -> dict | None:
    """The state.json of a checkpoint folder when every file of it is there and reads the safe way
    (a folder whose upload was cut short by a lost node is not), else None."""
    from rsdist.models.safe_files import CheckpointError
    from rsdist.models.tuned import check_checkpoint

    try:
        state = read_json_file(os.path.join(folder, STATE_FILE))
        if check_checkpoint(folder) != method or state.get("method", "lora") != method:
            return None  # e.g. the adapter folder is missing: it would pass for a heads-only checkpoint
        load_torch_state(os.path.join(folder, OPTIMIZER_FILE))
        int(state["epoch"])
        return state
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None


def newer_stored_states(root: str, method: str, after: int) -> list[dict]:
    """The state.json of each complete epoch checkpoint in Ray Train's run folder `root` after
    epoch `after`, in order, as long as they follow one another (rank 0 uploads them one by one);
    each folder is fetched once.

    Ray Train counts a checkpoint once its controller has collected every worker's report of that
    epoch (it polls every few seconds); a node lost between rank 0's upload and that poll leaves
    complete checkpoints Ray Train does not offer (`get_checkpoint` gives the one before, or none),
    and the restarted workers would redo those epochs."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    found, states = {folder_epoch(n) for n in names}, []
    epoch = after + 1
    while epoch in found:
        with stored_folder(root, epoch_folder(epoch)) as folder:
            state = complete_state(folder, method)
        if state is None or int(state["epoch"]) != epoch:
            break
        states.append(state)
        epoch += 1
    return states


def agreed(value):
    """Rank 0's `value` (any picklable object), on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


COUNTS = ("trainable_params", "total_params", "full_finetune_params")


def missed_reports(config: dict, registered: int, rank: int) -> list[dict]:
    """The reports Ray Train did not register: for each complete epoch checkpoint in the run folder
    after the last one it registered (newer_stored_states), the metrics rank 0 reported with it,
    read back from its state.json; every rank gets rank 0's list."""
    reports = []
    root = config.get("checkpoint_root")
    if rank == 0 and root:
        for state in newer_stored_states(root, config.get("method", "lora"), registered):
            reports.append({**state["history"][-1], **{k: state[k] for k in COUNTS}})
    return agreed(reports)


def report_again(config: dict, record: dict, rank: int) -> None:
    """Report an epoch whose checkpoint Ray Train had not registered, with the metrics and the
    checkpoint of the first time (rank 0 sends a copy of the stored folder), so Ray Train keeps
    and scores the epochs of a resumed run as those of a run never interrupted."""
    import shutil

    import ray.train

    if rank != 0:
        ray.train.report(record)
        return
    name = epoch_folder(record["epoch"])
    with stored_folder(config["checkpoint_root"], name) as folder, tempfile.TemporaryDirectory() as tmp:
        copy = shutil.copytree(folder, os.path.join(tmp, name))
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(copy), checkpoint_dir_name=name)


def restore_checkpoint(encoder, optimizer, scheduler, config: dict, rank: int) -> tuple[int, list[dict]]:
    """Load the checkpoint training resumes from into the model, optimizer and schedule: Ray
    Train's latest, or the newest complete one after it in the run folder, whose epochs are then
    reported again (report_again). (0, []) when there is none; else (epochs done, history)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    missed = missed_reports(config, folder_epoch(checkpoint.path) if checkpoint is not None else 0, rank)
    if missed:
        with stored_folder(config["checkpoint_root"], epoch_folder(missed[-1]["epoch"])) as folder:
            done = _restore(encoder, optimizer, scheduler, folder)
    elif checkpoint is not None:
        with checkpoint.as_directory() as folder:
            done = _restore(encoder, optimizer, scheduler, folder)
    else:
        return 0, []
    if rank == 0:
        note = f" ({unregistered_epochs(missed)} written before a node was lost, not yet registered by Ray Train)" if missed else ""
        print(f"train: resuming after epoch {done[0]}/{config['epochs']}{note}", flush=True)
    for record in missed:
        report_again(config, record, rank)
    return done


def unregistered_epochs(missed: list[dict]) -> str:
    """'epoch 3' or 'epochs 2-3': the epochs of `missed` records, for the resume line."""
    first, last = missed[0]["epoch"], missed[-1]["epoch"]
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def loss_function(config: dict):
    """(image, text, logit_scale) -> loss for the configured method."""
    if config.get("method", "lora") == "harma":
        margin = config["harma_margin"]
        return lambda image, text, scale: harma_loss(image, text, scale, margin=margin)
    return info_nce


def _batch_tensors(batch: dict, encoder, seed: int, epoch: int, max_tokens: int, device) -> tuple[torch.Tensor, dict]:
    """Image features and this epoch's caption per row: as stored text features when the batch
    carries `caption_feats` (frozen text tower), else as tokens for the text tower."""
    feats = torch.from_numpy(np.stack(batch["image_emb"]).astype(np.float32, copy=False))
    if "caption_feats" in batch:
        dim = encoder.text_dim
        picked = []
        for flat, sid in zip(batch["caption_feats"], batch["sample_id"]):
            per_caption = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
            picked.append(per_caption[pick_caption_index(len(per_caption), seed, epoch, sid)])
        return feats.to(device), {"text_features": torch.from_numpy(np.stack(picked)).to(device)}
    texts = [pick_caption(caps, seed, epoch, sid) for caps, sid in zip(batch["captions"], batch["sample_id"])]
    tokens = encoder.tokenize(texts, max_tokens)
    return feats.to(device), {k: v.to(device) for k, v in tokens.items()}


def load_validation(shard, text_dim: int) -> dict:
    """The validation rows as arrays: image features, every caption (as stored text-tower features
    when the rows carry `caption_feats`, else as text) and the row each caption belongs to."""
    images, features, texts, owner = [], [], [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for i, emb in enumerate(batch["image_emb"]):
            if "caption_feats" in batch:
                per_caption = np.asarray(batch["caption_feats"][i], dtype=np.float32).reshape(-1, text_dim)
                features.append(per_caption)
            else:
                per_caption = [str(c) for c in batch["captions"][i]]
                texts += per_caption
            owner += [len(images)] * len(per_caption)
            images.append(np.asarray(emb, dtype=np.float32))
    return {"image_emb": np.stack(images), "caption_feats": np.concatenate(features) if features else None,
            "captions": texts, "text_image": np.asarray(owner)}


@torch.no_grad()
def validation_mR(encoder, val: dict, max_tokens: int, device, batch_size: int = 256) -> float:
    """mR of the encoder as it is now on the validation rows (load_validation's arrays)."""
    was_training = encoder.training
    encoder.eval()
    images = encoder.project_image(torch.from_numpy(val["image_emb"]).to(device))
    if val["caption_feats"] is not None:
        text = encoder.project_text(torch.from_numpy(val["caption_feats"]).to(device))
    else:
        parts = []
        for start in range(0, len(val["captions"]), batch_size):
            tokens = encoder.tokenize(val["captions"][start:start + batch_size], max_tokens)
            parts.append(encoder.project_text(encoder.encode_text_features(**{k: v.to(device) for k, v in tokens.items()})))
        text = torch.cat(parts)
    encoder.train(was_training)
    return retrieval_metrics((images @ text.t()).float().cpu().numpy(), val["text_image"])["mR"]


def rank_dataset(rank: int) -> str:
    """The name of the dataset rank `rank` trains on (see rsdist.train.stage.training_datasets)."""
    return f"train_{rank}"


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] + 1000 * rank)

    encoder = build_encoder(config["encoder"], embed_dim=config["embed_dim"], seed=config["seed"])
    full = count_parameters(encoder)[1]  # what full fine-tuning would train
    make_tunable(encoder, config)
    trainable, total = count_parameters(encoder)
    compute_loss = loss_function(config)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    total_steps = config["steps_per_epoch"] * config["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps, int(config["warmup_fraction"] * total_steps)))

    start_epoch, history = restore_checkpoint(encoder, optimizer, scheduler, config, rank)
    # DDP wraps after the restore, so all ranks start from the same (restored) weights.
    model = ray.train.torch.prepare_model(ContrastivePair(encoder))

    shard = ray.train.get_dataset_shard(rank_dataset(rank))
    validate = rank == 0 and config.get("keep_epoch") == "best-val"
    val = load_validation(ray.train.get_dataset_shard("val"), encoder.text_dim) if validate else None
    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        torch.manual_seed(epoch_seed(config["seed"], rank, epoch))
        started = time.perf_counter()
        loss_sum, rows, steps = 0.0, 0, 0
        batches = shard.iter_batches(
            batch_size=config["batch_size"],
            batch_format="numpy",
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] * 7919 + epoch if config["shuffle_buffer"] else None,
        )
        for batch in batches:
            feats, tokens = _batch_tensors(batch, encoder, config["seed"], epoch, config["max_text_tokens"], device)
            image, text, scale = model(feats, **tokens)
            loss = compute_loss(image, text, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clamp_logit_scale(encoder, config["max_logit_scale"])
            loss_sum += float(loss.detach()) * len(feats)
            rows += len(feats)
            steps += 1
        loss_total, rows_total = _all_reduce_sum([loss_sum, rows])
        record = {
            "epoch": epoch + 1,
            "loss": loss_total / max(rows_total, 1),
            "rows": int(rows_total),
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 3),
            "logit_scale": float(encoder.logit_scale.detach().exp()),
        }
        if validate:
            record["val_mR"] = validation_mR(encoder, val, config["max_text_tokens"], device)
        history.append(record)
        metrics = {**record, "trainable_params": trainable, "total_params": total, "full_finetune_params": full}
        if rank == 0:
            val_note = f", validation mR {record['val_mR']:.2f}" if validate else ""
            print(f"train: epoch {epoch + 1}/{config['epochs']} loss {record['loss']:.4f} on {record['rows']} rows, {record['seconds']:.1f}s{val_note}", flush=True)
            with tempfile.TemporaryDirectory() as folder:
                state = {"epoch": epoch + 1, "history": history, "method": config.get("method", "lora"), "trainable_params": trainable, "total_params": total, "full_finetune_params": full}
                write_epoch_checkpoint(folder, encoder, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=epoch_folder(epoch + 1))
        else:
            ray.train.report(metrics)
