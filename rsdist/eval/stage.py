"""Eval stage: retrieval R@1/5/10 both ways, mR, and zero-shot scene accuracy on the held-out rows.

Input:
- `<run>/features/part-*.parquet`: rows with split == "test" (never selected or trained on):
  `image_emb` (image-tower features; the tower is frozen, so they go straight to the image head)
  and `label`; the set of classes is every label in the features,
- `<run>/shards/part-*.parquet`: all captions of each test image,
- `<run>/checkpoints/final/`: the trained adapter (LoRA `text_adapter/` or HarMA `harma.safetensors`, found
  by what the folder holds) and heads (`train_meta.json` gives embed_dim and the method).
Output: `<run>/eval/metrics.json`: the metrics of the trained model, those of the untrained model
(heads at initialisation, no adapter) when `eval.baseline`, and the settings that produced them;
with validation rows (split 'val', `data.val_fraction`), also `<run>/eval/failures.parquet`: the
trained model's failures there, which `error-driven` selection reads (rsdist.eval.failures).
Resources: the driver process, CPU; encoding is batched (`eval.batch_size`) under no_grad.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rsdist.config import EvalConfig
from rsdist.eval.failures import failure_table
from rsdist.core.metrics import class_prompts, classification_accuracy, retrieval_metrics
from rsdist.core.rundir import RunDir
from rsdist.models.text_cache import frozen_text_features
from rsdist.stage import Resources, Stage, StageResult
from rsdist.core.rows import features_encoder, split_rows
from rsdist.core.tables import embedding_matrix
from rsdist.models.tuned import load_trained

log = logging.getLogger("rsdist")

FOLDER = "eval"
FINAL = ("checkpoints", "final")

RESOURCES = Resources(num_cpus=1.0)


def held_out_rows(run: RunDir) -> pa.Table:
    """Held-out rows: sample_id, label, image_emb, captions."""
    return require_held_out(run, split_rows(run, "test"))


def held_out_and_validation_rows(run: RunDir) -> tuple[pa.Table, pa.Table]:
    """The held-out rows and the validation rows (split 'val', possibly none), from one read."""
    rows = split_rows(run, ("test", "val"))
    is_test = pc.equal(rows.column("split"), "test")
    return require_held_out(run, rows.filter(is_test)), rows.filter(pc.invert(is_test))


def require_held_out(run: RunDir, test: pa.Table) -> pa.Table:
    """`test`, or one clear error when the run has no held-out rows."""
    if test.num_rows == 0:
        raise ValueError(f"{run.url('features')}: no rows with split == 'test' to evaluate on")
    return test


def class_names(run: RunDir) -> list[str]:
    """Every label present in the features (the zero-shot candidates), sorted."""
    labels = set()
    for batch in run.iter_batches("features", columns=["label"], batch_size=8192):
        labels.update(v for v in batch.column("label").to_pylist() if v)
    return sorted(labels)


@torch.no_grad()
def encode_texts(encoder, texts: list[str], batch_size: int, max_tokens: int, frozen=None) -> torch.Tensor:
    """Projected text embeddings; with `frozen` (a FrozenTextFeatures of this encoder's untuned
    text tower) the tower features come from that cache."""
    if frozen is not None:
        return encoder.project_text(torch.from_numpy(frozen.of(texts)))
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = encoder.tokenize(texts[start:start + batch_size], max_tokens)
        out.append(encoder.project_text(encoder.encode_text_features(**tokens)))
    return torch.cat(out)


@torch.no_grad()
def encode_images(encoder, image_emb: np.ndarray, batch_size: int) -> torch.Tensor:
    feats = torch.from_numpy(image_emb)
    return torch.cat([encoder.project_image(feats[s:s + batch_size]) for s in range(0, len(feats), batch_size)])


def image_matrix(rows: pa.Table) -> np.ndarray:
    return embedding_matrix(rows.column("image_emb"), "image_emb", "eval")


def similarity(encoder, rows: pa.Table, cfg: EvalConfig, frozen=None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(projected images, image x caption similarity, caption -> image index) of `rows`
    (image_emb, captions); `frozen`: see encode_texts."""
    captions = rows.column("captions").to_pylist()
    texts = [c for caps in captions for c in caps]
    text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    images = encode_images(encoder, image_matrix(rows), cfg.batch_size)
    text = encode_texts(encoder, texts, cfg.batch_size, cfg.max_text_tokens, frozen)
    return images, (images @ text.t()).numpy(), text_image


def evaluate_model(encoder, rows: pa.Table, classes: list[str], cfg: EvalConfig, frozen=None) -> dict:
    """Retrieval and zero-shot metrics of `encoder` on `rows` (sample_id, label, image_emb, captions);
    `frozen`: see encode_texts (only for an encoder whose text tower is not tuned)."""
    images, sim, text_image = similarity(encoder, rows, cfg, frozen)
    metrics = retrieval_metrics(sim, text_image, cfg.recall_ks)
    metrics.update(images=int(rows.num_rows), texts=int(len(text_image)))

    labels = rows.column("label").to_pylist()
    known = [i for i, label in enumerate(labels) if label in classes]
    if classes and known:
        prompts = encode_texts(encoder, class_prompts(classes, cfg.prompt), cfg.batch_size, cfg.max_text_tokens, frozen)
        scores = (images[known] @ prompts.t()).numpy()
        index = {c: i for i, c in enumerate(classes)}
        zs = classification_accuracy(scores, np.array([index[labels[i]] for i in known]), classes)
        metrics.update(zero_shot_acc=zs["accuracy"], zero_shot_per_class=zs["per_class"], zero_shot_count=zs["count"])
    return metrics


def local_checkpoint(run: RunDir, tmp: str) -> str:
    """A local path of `<run>/checkpoints/final` (downloaded first when the run is remote)."""
    protocol = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
    if protocol in ("file", "local"):
        return run.path(*FINAL)
    target = os.path.join(tmp, "final")
    run.fs.get(run.path(*FINAL), target, recursive=True)
    return target


def evaluate_checkpoint(run: RunDir, cfg: EvalConfig, encoder: str, checkpoint: str | None, embed_dim: int, seed: int = 0) -> dict:
    """Metrics on the run's held-out rows of a local checkpoint folder, or of the untrained model
    (heads at their seeded initialisation, no adapter) when `checkpoint` is None."""
    model = load_trained(encoder, embed_dim, checkpoint, seed=seed)
    return evaluate_model(model, held_out_rows(run), class_names(run), cfg)


def write_validation_failures(run: RunDir, rows: pa.Table, encoder, cfg: EvalConfig, frozen=None) -> dict | None:
    """The trained model's failures on the run's validation `rows` (split 'val') as
    `eval/failures.parquet` (rsdist.eval.failures), and its mR there; None without validation rows
    or with `eval.failure_rank` 0 (run_stage empties eval/ before each evaluation, so no earlier
    failures file is left for `error-driven` to read)."""
    if cfg.failure_rank == 0 or rows.num_rows == 0:
        return None
    _, sim, text_image = similarity(encoder, rows, cfg, frozen)
    table = failure_table(rows.column("sample_id").to_pylist(), sim, text_image, cfg.failure_rank)
    run.write_table(table, FOLDER, "failures.parquet")
    log.info("eval: %d of %d validation images fail at rank %d -> %s", table.num_rows, rows.num_rows, cfg.failure_rank, run.url(FOLDER, "failures.parquet"))
    return {"images": rows.num_rows, "failures": table.num_rows, "failure_rank": cfg.failure_rank, "mR": retrieval_metrics(sim, text_image, cfg.recall_ks)["mR"]}


def run(run: RunDir, cfg: EvalConfig) -> StageResult:
    """Evaluate `<run>/checkpoints/final` (and the untrained model) on the held-out rows."""
    encoder = features_encoder(run)
    if not run.exists(*FINAL, "train_meta.json"):
        raise FileNotFoundError(f"{run.url(*FINAL)}: no trained checkpoint (run the train stage first)")
    meta = run.read_json(*FINAL, "train_meta.json")
    if meta.get("encoder", encoder) != encoder:
        raise ValueError(f"features.encoder: {encoder!r} but the checkpoint was trained with {meta['encoder']!r}")
    (rows, val_rows), classes = held_out_and_validation_rows(run), class_names(run)
    log.info("eval: %d held-out images, %d captions, %d classes", rows.num_rows, sum(len(c) for c in rows.column("captions").to_pylist()), len(classes))
    started = time.perf_counter()
    # The text tower is untuned for 'heads' checkpoints and the untrained baseline: reuse its features.
    heads_only = meta.get("method") == "heads"
    frozen = frozen_text_features(encoder, meta.get("seed", 0), cfg.max_text_tokens) if (heads_only or cfg.baseline) else None
    with tempfile.TemporaryDirectory() as tmp:
        model = load_trained(encoder, meta["embed_dim"], local_checkpoint(run, tmp), seed=meta.get("seed", 0))
        trained = evaluate_model(model, rows, classes, cfg, frozen if heads_only else None)
        validation = write_validation_failures(run, val_rows, model, cfg, frozen if heads_only else None)
    log.info("eval: trained mR %.2f, zero-shot %.2f%%", trained["mR"], trained.get("zero_shot_acc", float("nan")))
    report = {"trained": trained, "settings": {**dataclasses.asdict(cfg), "encoder": encoder, "embed_dim": meta["embed_dim"], "method": meta.get("method", "lora"), "checkpoint": run.url(*FINAL), "trained_epochs": meta.get("epochs"), "kept_epoch": meta.get("kept_epoch", meta.get("epochs"))}}
    if validation is not None:
        report["validation"] = validation
    if cfg.baseline:
        report["untrained"] = evaluate_model(load_trained(encoder, meta["embed_dim"], None, seed=meta.get("seed", 0)), rows, classes, cfg, frozen)
        log.info("eval: untrained mR %.2f, zero-shot %.2f%%", report["untrained"]["mR"], report["untrained"].get("zero_shot_acc", float("nan")))
    report["seconds"] = round(time.perf_counter() - started, 3)
    run.write_json(report, FOLDER, "metrics.json")
    flat = {k: v for k, v in trained.items() if not isinstance(v, dict)}
    if cfg.baseline:
        flat["untrained_mR"] = report["untrained"]["mR"]
        if "zero_shot_acc" in report["untrained"]:
            flat["untrained_zero_shot_acc"] = report["untrained"]["zero_shot_acc"]
    return StageResult(rows_in=rows.num_rows, rows_out=rows.num_rows, extra={"metrics": flat})


STAGE = Stage(name="eval", folder=FOLDER, reads=("checkpoints", "features", "shards"), section="eval", resources=lambda cfg: RESOURCES, run=run)
