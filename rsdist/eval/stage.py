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
Also `<run>/eval/embeddings/{trained,untrained}/`: the projected rows (image, every caption) the
metrics are computed from.
How it runs: Ray tasks count each features file's held-out and validation rows; a Ray Data pass
reads them (read tasks: the wanted rows of one features file, captions joined from the shard of the
same name, blocks of `eval.read_block_rows` rows), projects them in `ProjectRows` actors (the model
loaded once per actor, encoding batched by `eval.batch_size` under no_grad) and writes them to
eval/embeddings/<model>/; one Ray task then reads them back in the features order, computes the
retrieval metrics on the full similarity matrix, the zero-shot accuracy and the validation failures,
and returns the metrics. The driver holds file names, counts and the metrics dict, never rows.
Memory: a projection actor holds one block; the metrics task the embeddings of the held-out set and
its images x captions similarity (4 bytes x images x captions; docs/train.md).
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
from rsdist.models.tuned import check_checkpoint, load_trained

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
    return embedding_metrics(encoder, images, sim, text_image, rows.column("label").to_pylist(), classes, cfg, frozen)


def embedding_metrics(encoder, images: torch.Tensor, sim: np.ndarray, text_image: np.ndarray, labels: list, classes: list[str], cfg: EvalConfig, frozen=None) -> dict:
    """Retrieval metrics of an image x caption similarity and zero-shot accuracy of the projected
    `images` against the class prompts (encoded by `encoder`)."""
    metrics = retrieval_metrics(sim, text_image, cfg.recall_ks)
    metrics.update(images=int(len(images)), texts=int(len(text_image)))
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


# -- evaluation on Ray workers ------------------------------------------------------------------------
EMBEDDINGS = "embeddings"  # eval/embeddings/<model>/: projected held-out (and validation) rows
READ_CPUS = 0.25
METRICS_CPUS = 0.5


class ProjectRows:
    """Ray Data actor: loads the trained model (or the untrained one) once and maps a block of rows
    (sample_id, split, label, image_emb, captions, item, pos) to its projected image and captions."""

    def __init__(self, run: RunDir, encoder: str, embed_dim: int, seed: int, trained: bool, frozen_text: bool, cfg: EvalConfig):
        with tempfile.TemporaryDirectory(prefix="rsdist-eval-") as tmp:  # the weights are in memory once loaded
            self.model = load_trained(encoder, embed_dim, local_checkpoint(run, tmp) if trained else None, seed=seed)
        self.frozen = frozen_text_features(encoder, seed, cfg.max_text_tokens) if frozen_text else None
        self.cfg = cfg

    def __call__(self, rows: pa.Table) -> pa.Table:
        captions = rows.column("captions").to_pylist()
        images = encode_images(self.model, image_matrix(rows), self.cfg.batch_size).numpy().astype(np.float32)
        text = encode_texts(self.model, [c for caps in captions for c in caps], self.cfg.batch_size, self.cfg.max_text_tokens, self.frozen).numpy().astype(np.float32)
        ends = np.cumsum([len(c) for c in captions])
        flat = [part.reshape(-1) for part in np.split(text, ends[:-1])] if captions else []
        return pa.table({
            "sample_id": rows.column("sample_id"), "split": rows.column("split"), "label": rows.column("label"),
            "item": rows.column("item"), "pos": rows.column("pos"),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images.shape[1]),
            "text": pa.array(flat, type=pa.list_(pa.float32())),
            "n_captions": pa.array([len(c) for c in captions], pa.int32()),
        })


def count_split_rows(run: RunDir, splits: tuple[str, ...]) -> list[tuple[str, int]]:
    """Per features file: its rows of `splits`, counted by Ray tasks."""
    import ray

    from rsdist.core.rows import count_wanted

    files = run.parquet_files("features")
    if not files:
        raise FileNotFoundError(f"{run.url('features')}: no parquet files (run the features stage first)")
    task = ray.remote(num_cpus=READ_CPUS)(count_wanted)
    return [(f, n) for f, (n, _) in zip(files, ray.get([task.remote(run, f, False, splits) for f in files]))]


def project_on_workers(run: RunDir, cfg: EvalConfig, counts: list[tuple[str, int]], splits: tuple[str, ...], name: str, encoder: str, meta: dict, trained: bool, frozen_text: bool) -> None:
    """One Ray Data pass: read the rows of `splits` (read tasks), project them (ProjectRows actors)
    and write them to eval/embeddings/<name>/ (write tasks). The driver sees no row."""
    import pyarrow.fs as pafs
    import ray

    from rsdist.core.raycluster import elastic_actor_pool
    from rsdist.core.rows import worker_dataset

    items = [{"file": f, "skip": 0, "take": n} for f, n in counts if n]
    ds = worker_dataset(run, items, False, splits, cfg.read_block_rows)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    ds = ds.map_batches(
        ProjectRows, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs={"run": run, "encoder": encoder, "embed_dim": meta["embed_dim"], "seed": meta.get("seed", 0), "trained": trained, "frozen_text": frozen_text, "cfg": cfg},
        compute=elastic_actor_pool(min(len(items), int(cpus // 2))), num_cpus=0.5)
    run.remove(FOLDER, EMBEDDINGS, name)
    ds.write_parquet(run.path(FOLDER, EMBEDDINGS, name), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(run.fs)))


def read_embeddings(run: RunDir, name: str) -> pa.Table:
    """eval/embeddings/<name>/ in the features order (item, pos)."""
    import pyarrow.parquet as pq

    folder = run.path(FOLDER, EMBEDDINGS, name)
    files = sorted(p for p in run.fs.find(folder) if p.endswith(".parquet"))
    tables = []
    for f in files:
        with run.fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables)
    return table.sort_by([("item", "ascending"), ("pos", "ascending")])


def embedded_similarity(rows: pa.Table) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(projected images, image x caption similarity, caption -> image index) of stored embeddings."""
    images = torch.from_numpy(image_matrix(rows.rename_columns(["image_emb" if c == "image" else c for c in rows.column_names])))
    counts = rows.column("n_captions").to_numpy()
    flat = rows.column("text").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    text = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(int(counts.sum()), -1))
    return images, (images @ text.t()).numpy(), np.repeat(np.arange(len(counts)), counts)


def metrics_on_worker(run: RunDir, cfg: EvalConfig, encoder: str, meta: dict, name: str, trained: bool, frozen_text: bool, failures: bool) -> dict:
    """Ray task: the metrics of the embeddings eval/embeddings/<name>/ (held-out rows), plus with
    `failures` the validation failures written to eval/failures.parquet. Returns small dicts only."""
    rows = read_embeddings(run, name)
    is_test = pc.equal(rows.column("split"), "test")
    test, val = rows.filter(is_test), rows.filter(pc.invert(is_test))
    with tempfile.TemporaryDirectory() as tmp:
        model = load_trained(encoder, meta["embed_dim"], local_checkpoint(run, tmp) if trained else None, seed=meta.get("seed", 0))
        frozen = frozen_text_features(encoder, meta.get("seed", 0), cfg.max_text_tokens) if frozen_text else None
        images, sim, text_image = embedded_similarity(test)
        out = {"metrics": embedding_metrics(model, images, sim, text_image, test.column("label").to_pylist(), class_names(run), cfg, frozen)}
    if failures and cfg.failure_rank and val.num_rows:
        _, sim, text_image = embedded_similarity(val)
        table = failure_table(val.column("sample_id").to_pylist(), sim, text_image, cfg.failure_rank)
        run.write_table(table, FOLDER, "failures.parquet")
        log.info("eval: %d of %d validation images fail at rank %d -> %s", table.num_rows, val.num_rows, cfg.failure_rank, run.url(FOLDER, "failures.parquet"))
        out["validation"] = {"images": val.num_rows, "failures": table.num_rows, "failure_rank": cfg.failure_rank, "mR": retrieval_metrics(sim, text_image, cfg.recall_ks)["mR"]}
    return out


def evaluate_on_workers(run: RunDir, cfg: EvalConfig, encoder: str, meta: dict, name: str, trained: bool, frozen_text: bool, splits: tuple[str, ...], counts: list[tuple[str, int]]) -> dict:
    """Project the rows on workers, then compute the metrics in one worker task."""
    import ray

    project_on_workers(run, cfg, counts, splits, name, encoder, meta, trained, frozen_text)
    task = ray.remote(num_cpus=METRICS_CPUS)(metrics_on_worker)
    return ray.get(task.remote(run, cfg, encoder, meta, name, trained, frozen_text, "val" in splits))


def run(run: RunDir, cfg: EvalConfig) -> StageResult:
    """Evaluate `<run>/checkpoints/final` (and the untrained model) on the held-out rows, on Ray
    workers: read and projection tasks write the embeddings to eval/embeddings/, one task computes
    the metrics; the driver gets the metrics only."""
    encoder = features_encoder(run)
    if not run.exists(*FINAL, "train_meta.json"):
        raise FileNotFoundError(f"{run.url(*FINAL)}: no trained checkpoint (run the train stage first)")
    meta = run.read_json(*FINAL, "train_meta.json")
    if meta.get("encoder", encoder) != encoder:
        raise ValueError(f"features.encoder: {encoder!r} but the checkpoint was trained with {meta['encoder']!r}")
    with tempfile.TemporaryDirectory() as tmp:
        check_checkpoint(local_checkpoint(run, tmp))  # every file read the safe way here, before any worker loads it
    counts = count_split_rows(run, ("test", "val"))
    test_counts = count_split_rows(run, ("test",))
    n_test = sum(n for _, n in test_counts)
    if n_test == 0:
        raise ValueError(f"{run.url('features')}: no rows with split == 'test' to evaluate on")
    log.info("eval: %d held-out images, %d validation images", n_test, sum(n for _, n in counts) - n_test)
    started = time.perf_counter()
    heads_only = meta.get("method") == "heads"
    result = evaluate_on_workers(run, cfg, encoder, meta, "trained", True, heads_only, ("test", "val"), counts)
    trained = result["metrics"]
    validation = result.get("validation")
    log.info("eval: trained mR %.2f, zero-shot %.2f%%", trained["mR"], trained.get("zero_shot_acc", float("nan")))
    report = {"trained": trained, "settings": {**dataclasses.asdict(cfg), "encoder": encoder, "embed_dim": meta["embed_dim"], "method": meta.get("method", "lora"), "checkpoint": run.url(*FINAL), "trained_epochs": meta.get("epochs"), "kept_epoch": meta.get("kept_epoch", meta.get("epochs"))}}
    if validation is not None:
        report["validation"] = validation
    if cfg.baseline:
        report["untrained"] = evaluate_on_workers(run, cfg, encoder, meta, "untrained", False, True, ("test",), test_counts)["metrics"]
        log.info("eval: untrained mR %.2f, zero-shot %.2f%%", report["untrained"]["mR"], report["untrained"].get("zero_shot_acc", float("nan")))
    report["seconds"] = round(time.perf_counter() - started, 3)
    run.write_json(report, FOLDER, "metrics.json")
    flat = {k: v for k, v in trained.items() if not isinstance(v, dict)}
    if cfg.baseline:
        flat["untrained_mR"] = report["untrained"]["mR"]
        if "zero_shot_acc" in report["untrained"]:
            flat["untrained_zero_shot_acc"] = report["untrained"]["zero_shot_acc"]
    return StageResult(rows_in=n_test, rows_out=n_test, extra={"metrics": flat})


STAGE = Stage(name="eval", folder=FOLDER, reads=("checkpoints", "features", "shards"), section="eval", resources=lambda cfg: RESOURCES, run=run)
