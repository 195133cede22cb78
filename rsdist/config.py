"""Typed settings for a run: one dataclass per stage, YAML in, precise one-line errors out.

Every field has a type and a help text (`field(metadata={"help": ...})`) and is checked in
`__post_init__`; a bad value raises ConfigError naming the field and what is allowed, e.g.
`select.method: 'best' is not one of: random, shift`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message names the field."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _choice(name: str, value: Any, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of: {', '.join(allowed)}")


def _number(name: str, value: Any) -> None:
    """A finite int or float (not a bool, not inf or nan)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: {value!r} is not a number")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} is not a finite number")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    _number(name, value)
    if value < 0 if allow_zero else value <= 0:
        raise ConfigError(f"{name}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _fraction(name: str, value: float, lo_open: bool = True) -> None:
    _number(name, value)
    if not (0.0 < value < 1.0 if lo_open else 0.0 <= value < 1.0):
        raise ConfigError(f"{name}: {value!r} must be a fraction in {'(0, 1)' if lo_open else '[0, 1)'}")


HF_SAFE, HF_PICKLE = "hf:", "hf-pickle:"


def hf_folder(name: str) -> tuple[str, bool] | None:
    """(folder, safetensors only) of a local Hugging Face model name, else None: `hf:<folder>` loads
    safetensors weights only; `hf-pickle:<folder>` also loads pickled weights (pytorch_model.bin),
    which can run code: name a folder that way only when you trust whoever wrote it."""
    for scheme, safe in ((HF_SAFE, True), (HF_PICKLE, False)):
        if isinstance(name, str) and name.startswith(scheme) and len(name) > len(scheme):
            return name[len(scheme):], safe
    return None


INGEST_FORMATS = (
    "auto", "captions-txt", "scene-folders", "captions-jsonl", "karpathy-json", "coco-captions",
    "llava-json", "rsvqa", "webdataset", "parquet",
)
INGEST_ENGINES = ("auto", "ray", "local")
PARQUET_ROLES = ("image", "text", "captions", "label", "key", "split", "answer", "task")
ENCODERS = ("composite", "tiny", "clip-tiny", "siglip-tiny", "hf:<folder>", "hf-pickle:<folder>")
PERTURBATIONS = ("noise", "rotate", "crop", "flip", "blur", "jpeg", "token_dropout", "word_shuffle")
FEATURE_DTYPES = ("float32", "float16")
VLM_MODELS = ("none", "qwen2-vl-tiny", "hf:<folder>", "hf-pickle:<folder>")
TINY_VLMS = ("qwen2-vl-tiny", "llava-tiny", "llava-next-tiny", "idefics3-tiny")  # random image-text-to-text models for tests
TUNED_MODELS = ("dual", "vlm")  # train.model: what the job tunes
VLM_VISION = ("frozen", "lora")
VLM_PROJECTOR = ("trainable", "frozen")
VLM_STRATEGIES = ("ddp", "fsdp")
VLM_EVAL_TASKS = ("scene", "vqa", "caption")
VLM_FEATURES = ("coincide", "scalselect")
CLUSTER_SPACES = ("joint", "image", "text")
CLUSTER_MODES = ("minibatch", "lloyd")
CLUSTER_METRICS = ("euclidean", "cosine")
CLUSTER_INITS = ("auto", "k-means++", "k-means||", "random")
CLUSTER_BACKENDS = ("auto", "torch", "cupy", "cuml")
CLUSTER_PRECISIONS = ("auto", "float32", "bfloat16")
SELECT_METHODS = ("shift", "random", "cluster-random", "coincide", "coincide-within", "scalselect", "semdedup", "error-driven", "caption-diversity", "caption-typicality", "typicality-mmd", "alignment-mmd")
ALIGNMENT_DIRECTIONS = ("image-to-text", "both")  # alignment-mmd: the picture predicts the caption, or the mean of both ways
ALIGNMENT_SCORES = ("cosine", "contrastive")  # alignment-mmd: held-out cosine with the own caption, or its log-probability among the cluster's
SELECT_SPACES = ("joint", "image", "text")
DEDUP_KEEP_RULES = ("farthest", "nearest", "first")
QUOTA_RULES = ("proportional", "equal")
KEEP_RULES = ("highest", "lowest", "both")
TRAIN_METHODS = ("lora", "harma", "heads")
KEEP_EPOCH_RULES = ("last", "best-val")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "Where the stage's workers compute, one of auto, cpu, cuda: 'cuda' asks Ray for GPUs whether or not a node has one yet (an autoscaler then adds GPU nodes), 'cpu' never does, 'auto' = cuda when a live node or a node type of the autoscaler (ray.autoscaler_config) has a GPU."


def _memory(name: str, value: float) -> None:
    _positive(name, value, allow_zero=True)


@dataclass
class DataConfig:
    source: str = _help("Where the input data is: a folder or fsspec URI. 'synthetic' generates the demo set.", default="synthetic")
    format: str = _help(f"Input layout, one of {INGEST_FORMATS}; 'auto' detects it.", default="auto")
    images: Optional[str] = _help("Images root when it is not inside `source` (default: <source>/images).", default=None)
    test_fraction: float = _help("Share of samples held out for evaluation when the data has no test split (drawn by a hash of sample_id).", default=0.1)
    test_offset: float = _help("Where the held-out window starts: a sample is held out when the hash fraction h of its sample_id lies in [test_offset, test_offset + test_fraction) (mod 1). Another offset gives another fixed development split (0.1 with test_fraction 0.1: disjoint from the default one).", default=0.0)
    val_fraction: float = _help("Share of samples held out for validation when the data has no split of its own: split 'val', never selected or trained on, read by train.keep_epoch 'best-val'; the window [test_offset + test_fraction, + val_fraction) (mod 1), next to the held-out one. 0 = none.", default=0.0)
    shard_rows: int = _help("Rows per canonical parquet shard.", default=512)
    max_image_bytes: int = _help("Images larger than this are quarantined as too-large.", default=32 * 1024 * 1024)
    captions_per_image: int = _help("captions-txt per-image layout: caption lines per file name (RSICD, UCM and Sydney captions: 5); other counts are an error, not a guess.", default=5)
    synthetic_per_class: int = _help("Unique scenes per class in the generated demo set.", default=40)
    engine: str = _help(f"How ingest reads images, one of {INGEST_ENGINES}: 'ray' = one Ray Data task per shard reads, decodes and writes it, 'local' = this process, 'auto' = Ray when it is up and the source has at least `parallel_min_records` records.", default="auto")
    parallel_min_records: int = _help("With engine 'auto', the fewest records worth a Ray Data pass.", default=2000)
    columns: dict = _help(f"parquet format: source column per role ({', '.join(PARQUET_ROLES)}); a role left out uses the column of its own name.", default_factory=dict)
    sources: list = _help("More sources ingested into the same pool after `source`, each a mapping {source, format (default auto), images (optional)}: e.g. GeoChat/LLaVA instruction JSON, RSVQA and scene folders in one instruction pool. Their rows keep their own source name and sample ids.", default_factory=list)

    def __post_init__(self) -> None:
        _choice("data.format", self.format, INGEST_FORMATS)
        _fraction("data.test_fraction", self.test_fraction)
        _fraction("data.test_offset", self.test_offset, lo_open=False)
        _fraction("data.val_fraction", self.val_fraction, lo_open=False)
        if self.test_fraction + self.val_fraction >= 1:
            raise ConfigError(f"data.val_fraction: {self.val_fraction} plus data.test_fraction={self.test_fraction} must leave a training pool (sum below 1)")
        _positive("data.shard_rows", self.shard_rows)
        _positive("data.max_image_bytes", self.max_image_bytes)
        if not isinstance(self.captions_per_image, int) or isinstance(self.captions_per_image, bool) or self.captions_per_image < 1:
            raise ConfigError(f"data.captions_per_image: {self.captions_per_image!r} must be a whole number >= 1")
        _positive("data.synthetic_per_class", self.synthetic_per_class)
        _choice("data.engine", self.engine, INGEST_ENGINES)
        _positive("data.parallel_min_records", self.parallel_min_records)
        if not isinstance(self.columns, dict):
            raise ConfigError(f"data.columns: expected a mapping of role -> column name, got {type(self.columns).__name__}")
        for role, column in self.columns.items():
            _choice("data.columns", role, PARQUET_ROLES)
            if not isinstance(column, str) or not column:
                raise ConfigError(f"data.columns.{role}: {column!r} must be a column name")
        if not isinstance(self.sources, list):
            raise ConfigError(f"data.sources: expected a list of {{source, format, images}} mappings, got {type(self.sources).__name__}")
        for i, extra in enumerate(self.sources):
            if not isinstance(extra, dict) or not isinstance(extra.get("source"), str) or not extra["source"]:
                raise ConfigError(f"data.sources[{i}]: {extra!r} must be a mapping with a `source` path or URI")
            unknown = sorted(set(extra) - {"source", "format", "images"})
            if unknown:
                raise ConfigError(f"data.sources[{i}].{unknown[0]}: unknown setting; known: source, format, images")
            _choice(f"data.sources[{i}].format", extra.get("format", "auto"), INGEST_FORMATS)
            if extra.get("images") is not None and not isinstance(extra["images"], str):
                raise ConfigError(f"data.sources[{i}].images: {extra['images']!r} must be a path or URI")


@dataclass
class FeaturesConfig:
    encoder: str = _help(f"Encoder, one of {ENCODERS}: 'composite' = EfficientNet-Lite0 + MiniLM (pretrained), 'hf:<folder>' = a local CLIP/SigLIP checkpoint with safetensors weights, 'hf-pickle:<folder>' = the same also allowing pickled weights (pytorch_model.bin, which can run code: trusted folders only), the tiny ones = random weights for tests.", default="composite")
    image_size: int = _help("Square side images are resized to before the image tower (RSICD/AID images are 150 px, so 160 keeps their detail at a third of 224's cost).", default=160)
    batch_size: int = _help("Rows per model batch (each row is 1 + K image forwards).", default=32)
    perturbations: list[str] = _help(f"Perturbations for the shift, any of {PERTURBATIONS}; image ones move image_emb, text ones (token_dropout, word_shuffle) move text_emb.", default_factory=lambda: ["noise", "rotate", "crop"])
    num_actors: int = _help("Model actors in the pool; 0 = decide from the cluster's resources.", default=0)
    threads_per_actor: int = _help("Torch threads of each CPU model actor; the pool then has about CPUs / threads actors per node.", default=1)
    device: str = _help(DEVICE_HELP, default="auto")
    cpus_per_actor: float = _help("CPUs each model actor asks Ray for; 0 = from the nodes: the most that leaves every node hosting actors room for the read tasks (a quarter CPU each).", default=0.0)
    gpus_per_actor: float = _help("GPUs each model actor asks Ray for when the device is cuda.", default=1.0)
    memory_per_actor_gb: float = _help("Memory (GB) each model actor reserves with Ray (Ray's 'memory' resource); 0 = no reservation.", default=0.0)
    dtype: str = _help(f"Stored embedding precision, one of {FEATURE_DTYPES}.", default="float32")
    max_text_tokens: int = _help("Captions are truncated to this many tokens.", default=48)
    seed: int = _help("Seed of the perturbations.", default=0)
    perturb_in: str = _help("Where image perturbations are made, one of auto, actor, cpu: 'actor' = in the model actor just before its forward (one image per row crosses the object store), 'cpu' = in the CPU decode stage (off a GPU's critical path), 'auto' = cpu when the actors have GPUs, else actor.", default="auto")
    vlm: str = _help("Image-text-to-text model whose internal features are stored too, as coincide_emb / scalselect_emb: 'none', 'qwen2-vl-tiny' (random, for tests) or 'hf:<folder>' (a local Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-NeXT, Idefics3 / SmolVLM checkpoint, safetensors weights only; 'hf-pickle:<folder>' also allows pickled weights, which can run code: trusted folders only).", default="none")
    vlm_features: list[str] = _help(f"Which VLM-internal features to store when `vlm` is set, any of {VLM_FEATURES}.", default_factory=lambda: ["coincide", "scalselect"])
    coincide_layers: list[int] = _help("Language-model layers (0-based) whose attention-block outputs make COINCIDE's vector; the forward stops after the last one.", default_factory=lambda: [3, 7, 11, 15, 19])
    scalselect_mass: float = _help("ScalSelect: share of the instruction-to-vision attention the kept vision tokens must hold, in (0, 1].", default=0.9)
    vlm_prompt: str = _help("The user instruction after the image in each sample's chat (its tokens are ScalSelect's user tokens); the assistant turn is the sample's first caption.", default="Describe the image.")

    def __post_init__(self) -> None:
        _choice("features.perturb_in", self.perturb_in, ("auto", "actor", "cpu"))
        if hf_folder(self.encoder) is None:
            _choice("features.encoder", self.encoder, ENCODERS)
        _positive("features.image_size", self.image_size)
        _positive("features.batch_size", self.batch_size)
        if not self.perturbations:
            raise ConfigError("features.perturbations: must name at least one of: " + ", ".join(PERTURBATIONS))
        for p in self.perturbations:
            _choice("features.perturbations", p, PERTURBATIONS)
        _positive("features.num_actors", self.num_actors, allow_zero=True)
        _positive("features.threads_per_actor", self.threads_per_actor)
        _choice("features.device", self.device, DEVICES)
        _positive("features.cpus_per_actor", self.cpus_per_actor, allow_zero=True)
        _positive("features.gpus_per_actor", self.gpus_per_actor)
        _memory("features.memory_per_actor_gb", self.memory_per_actor_gb)
        _choice("features.dtype", self.dtype, FEATURE_DTYPES)
        _positive("features.max_text_tokens", self.max_text_tokens)
        if len(set(self.perturbations)) != len(self.perturbations):
            raise ConfigError(f"features.perturbations: {self.perturbations!r} names one perturbation twice")
        if hf_folder(self.vlm) is None:
            _choice("features.vlm", self.vlm, VLM_MODELS)
        if not self.vlm_features:
            raise ConfigError("features.vlm_features: must name at least one of: " + ", ".join(VLM_FEATURES))
        for f in self.vlm_features:
            _choice("features.vlm_features", f, VLM_FEATURES)
        for layer in self.coincide_layers:
            if not isinstance(layer, int) or layer < 0:
                raise ConfigError(f"features.coincide_layers: {layer!r} must be a layer index >= 0")
        if "coincide" in self.vlm_features and not self.coincide_layers:
            raise ConfigError("features.coincide_layers: must name at least one layer when vlm_features has coincide")
        if not 0.0 < self.scalselect_mass <= 1.0:
            raise ConfigError(f"features.scalselect_mass: {self.scalselect_mass!r} must be in (0, 1]")
        if not self.vlm_prompt.strip():
            raise ConfigError("features.vlm_prompt: must not be empty")


@dataclass
class ClusterConfig:
    k: int = _help("Number of clusters; 0 = about sqrt(N / 2) of the training pool.", default=0)
    space: str = _help(f"Which embedding to cluster, one of {CLUSTER_SPACES}.", default="joint")
    mode: str = _help(f"Update rule, one of {CLUSTER_MODES}: 'minibatch' = Sculley's mini-batch k-means, 'lloyd' = full-batch passes.", default="minibatch")
    metric: str = _help(f"Distance, one of {CLUSTER_METRICS}: 'cosine' = spherical k-means (unit-norm centroids, dist = 1 - cos).", default="euclidean")
    init: str = _help(f"Initialisation, one of {CLUSTER_INITS}: 'auto' = k-means++ on a sample up to k = 1000, k-means|| above.", default="auto")
    init_sample: int = _help("Rows drawn (over all actors) for k-means++ initialisation; 0 = max(3 x batch_size, 3k), as scikit-learn.", default=0)
    init_pool: int = _help("Rows k-means|| initialises on, drawn uniformly over the actors and kept on them (each round passes over them); 0 = max(200,000, 50k). A pool of at most this many rows is used whole.", default=0)
    batch_size: int = _help("Mini-batch rows per iteration (over all actors).", default=1024)
    max_iter: int = _help("Maximum iterations (mini-batches, or full passes in lloyd mode).", default=100)
    tol: float = _help("Stop when the centroids move less than this (mean L2); 0 disables.", default=1e-4)
    max_no_improvement: int = _help("Mini-batch: stop after this many iterations without improvement of the smoothed batch inertia (lloyd mode stops when the inertia changes by less than tol, relative); 0 disables.", default=10)
    overlap: bool = _help("Mini-batch: send the next batch out before merging the current one, so actors assign while the driver updates (each batch meets centroids one update old; docs/cluster.md).", default=True)
    shared_memory: bool = _help("Mini-batch: when every shard actor runs on the driver's node, move centroids and sums through memory-mapped files in /dev/shm instead of Ray's object store (docs/cluster.md); other set-ups use the object store either way.", default=True)
    reassign_ratio: float = _help("Re-seed clusters whose count falls below this fraction of the largest cluster's (empty clusters always are).", default=0.01)
    backend: str = _help(f"Distance arithmetic, one of {CLUSTER_BACKENDS}: 'auto' = torch on the actor's device; cupy / cuml need a GPU actor and rsdist[gpu].", default="auto")
    precision: str = _help(f"Nearest-centroid product of the torch backend, one of {CLUSTER_PRECISIONS}: 'bfloat16' finds the winner in bf16 and recomputes its distance in float32; 'auto' = bfloat16 where the device has native bf16 (AVX512-BF16/AMX CPUs, bf16 GPUs), else float32.", default="auto")
    chunk_mb: int = _help("Memory bound, in MiB, of one rows-by-k distance block.", default=64)
    num_actors: int = _help("Actors owning embedding shards; 0 = decide from the cluster's resources.", default=0)
    cpus_per_actor: float = _help("CPUs each shard actor asks Ray for (fractional keeps small hosts moving).", default=0.5)
    gpus_per_actor: float = _help("GPUs each shard actor asks Ray for when the device is cuda; -1 = one.", default=-1.0)
    device: str = _help(DEVICE_HELP, default="auto")
    memory_per_actor_gb: float = _help("Memory (GB) each shard actor reserves with Ray (Ray's 'memory' resource); 0 = no reservation.", default=0.0)
    seed: int = _help("Seed of initialisation and mini-batch draws.", default=0)

    def __post_init__(self) -> None:
        _positive("cluster.k", self.k, allow_zero=True)
        _choice("cluster.space", self.space, CLUSTER_SPACES)
        _choice("cluster.mode", self.mode, CLUSTER_MODES)
        _choice("cluster.metric", self.metric, CLUSTER_METRICS)
        _choice("cluster.init", self.init, CLUSTER_INITS)
        _positive("cluster.init_sample", self.init_sample, allow_zero=True)
        _positive("cluster.init_pool", self.init_pool, allow_zero=True)
        _positive("cluster.batch_size", self.batch_size)
        _positive("cluster.max_iter", self.max_iter)
        _positive("cluster.tol", self.tol, allow_zero=True)
        _positive("cluster.max_no_improvement", self.max_no_improvement, allow_zero=True)
        _fraction("cluster.reassign_ratio", self.reassign_ratio, lo_open=False)
        _choice("cluster.backend", self.backend, CLUSTER_BACKENDS)
        _choice("cluster.precision", self.precision, CLUSTER_PRECISIONS)
        for name in ("overlap", "shared_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"cluster.{name}: {getattr(self, name)!r} must be true or false")
        _positive("cluster.chunk_mb", self.chunk_mb)
        _positive("cluster.num_actors", self.num_actors, allow_zero=True)
        _positive("cluster.cpus_per_actor", self.cpus_per_actor)
        if self.gpus_per_actor != -1.0:
            _positive("cluster.gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        _choice("cluster.device", self.device, DEVICES)
        _memory("cluster.memory_per_actor_gb", self.memory_per_actor_gb)


@dataclass
class SelectConfig:
    method: str = _help(f"Selection strategy, one of {SELECT_METHODS}. The default, 'alignment-mmd', runs greedy MMD in each cluster among the image-text pairs whose caption a leave-one-out ridge map from the picture predicts best, the budget split over clusters by select.quota (every method: docs/select.md).", default="alignment-mmd")
    budget: float = _help("Samples to keep: a fraction in (0, 1] of the training pool, or a count > 1.", default=1 / 3)
    quota: str = _help(f"How the budget is split over clusters, one of {QUOTA_RULES}.", default="proportional")
    keep: str = _help(f"Which end of the score each cluster keeps, one of {KEEP_RULES}; 'both' (caption-diversity only) alternates between the two ends.", default="highest")
    seed: int = _help("Seed of random choices.", default=0)
    shift_column: str = _help("Features column the 'shift' method ranks by: 'shift' (mean over perturbations) or one 'shift_<perturbation>'.", default="shift")
    space: str = _help(f"Embedding the geometric methods (coincide, scalselect, semdedup, error-driven) work in: one of {SELECT_SPACES}, or the name of any '*_emb' column of features/ (e.g. VLM-internal features).", default="joint")
    tau: float = _help("coincide: temperature of P = softmax(S / (tau D)).", default=0.1)
    max_cosine: float = _help("coincide: centroid pairs with a cosine above this are left out of the transferability S.", default=0.9)
    density_rows: int = _help("coincide: at most this many members of a cluster estimate its density D.", default=512)
    energy: float = _help("scalselect: share of the spectral energy (sum of sigma^2) the kept directions must hold.", default=0.9)
    dedup_threshold: Optional[float] = _help("Near-duplicate filter before any method: rows with a cosine above this to a row kept before them in their cluster are dropped; None = no filter.", default=None)
    dedup_keep: str = _help(f"Which row of a near-duplicate group stays (semdedup and the filter), one of {DEDUP_KEEP_RULES}: farthest from / nearest to the cluster centroid, or first by sample_id.", default="farthest")
    failures: Optional[str] = _help("error-driven: parquet file (any fsspec URI) of failing validation samples: sample_id plus the embedding columns, or sample_ids found in features/; optional 'weight'. Default: <run>/eval/failures.parquet.", default=None)
    teacher: Optional[str] = _help("error-driven: optional 'rsdist.<module>:<function>' that turns failures into retrieval queries and weights: a function of the rsdist package marked with @teacher (e.g. rsdist.select.teachers:each_failure); nothing outside the package is imported (docs/select.md).", default=None)
    within_clusters: bool = _help("scalselect and coincide: spend the budget over clusters by select.quota and rank inside each cluster, instead of by the method's own rule (scalselect: the global top leverage; coincide: its cluster probabilities). Keeps the pool's scene mix.", default=False)
    candidates: float = _help("typicality-mmd and alignment-mmd: each cluster's greedy MMD picks its quota among its candidates x quota images of highest caption typicality / image-text alignment (at least the quota).", default=2.0)
    alignment_direction: str = _help(f"alignment-mmd: which held-out ridge map scores a pair, one of {ALIGNMENT_DIRECTIONS}: the picture predicting the caption, or the mean of that and the caption predicting the picture.", default="image-to-text")
    alignment_score: str = _help(f"alignment-mmd: how a pair's held-out prediction is scored, one of {ALIGNMENT_SCORES}: its cosine with the pair's own caption, or the log-probability of the own caption among the captions of its cluster (a softmax of the prediction's cosines at select.alignment_temperature; the cluster is the contrastive batch, so a caption that fits its cluster-mates' pictures as well as its own scores low). 'contrastive' favours pairs whose caption tells their picture apart from the rest of the cluster; 'cosine' favours pairs whose caption the picture predicts, scene-typical sentences included.", default="cosine")
    alignment_temperature: float = _help("alignment-mmd with alignment_score 'contrastive': the softmax temperature; 0.07 is CLIP's initial one, where the heads' learnable temperature starts.", default=0.07)
    mmd_width: float = _help("coincide, typicality-mmd and alignment-mmd: width w of the greedy MMD's kernel exp(-||x - y||^2 / (2 w^2)) on the unit rows of select.space; 1.0 is COINCIDE's (its density's) kernel, smaller widths spread the picks over more of a cluster's modes.", default=1.0)
    mmd_block_rows: int = _help("coincide, typicality-mmd and alignment-mmd: a cluster of more rows than this picks by greedy MMD in random blocks of at most this many rows (kernel memory block^2, work linear in the cluster size); 0 = whole clusters, an m x m kernel for m rows (80 GB at m = 100,000). 1,024 keeps the work per row of a large pool at that of a small one (docs/scale.md).", default=1024)
    num_tasks: int = _help("coincide: the density seeds follow the plan of this many chunks of clusters (seed + position in its chunk); 0 = twice the cluster's CPUs.", default=0)
    rows_per_task: int = _help("Rows one select task holds: the sample_id range of a split/join task and the cluster group of a strategy task (a larger cluster is a task of its own). A task's memory is about rows_per_task x (bytes of the method's columns per row) x 3, plus the greedy MMD's mmd_block_rows^2 x 8 bytes (docs/select.md, 'Sizing').", default=100_000)
    cpus_per_task: float = _help("CPUs each select task asks Ray for (fractional keeps small hosts moving).", default=0.5)

    def __post_init__(self) -> None:
        _choice("select.method", self.method, SELECT_METHODS)
        _positive("select.budget", self.budget)
        if self.budget > 1 and float(self.budget) != int(self.budget):
            raise ConfigError(f"select.budget: {self.budget!r} must be a fraction in (0, 1] or a whole count")
        _choice("select.quota", self.quota, QUOTA_RULES)
        _choice("select.keep", self.keep, KEEP_RULES)
        if self.keep == "both" and self.method != "caption-diversity":
            raise ConfigError(f"select.keep: 'both' is for method caption-diversity only; {self.method} keeps highest or lowest")
        if self.shift_column != "shift" and not self.shift_column.startswith("shift_"):
            raise ConfigError(f"select.shift_column: {self.shift_column!r} must be 'shift' or 'shift_<perturbation>'")
        if self.space not in SELECT_SPACES and not self.space.endswith("_emb"):
            raise ConfigError(f"select.space: {self.space!r} is not one of: {', '.join(SELECT_SPACES)}, or a '*_emb' column name")
        _positive("select.tau", self.tau)
        if not -1.0 <= self.max_cosine <= 1.0:
            raise ConfigError(f"select.max_cosine: {self.max_cosine!r} must be a cosine in [-1, 1]")
        _positive("select.density_rows", self.density_rows)
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"select.energy: {self.energy!r} must be a fraction in (0, 1]")
        if self.dedup_threshold is not None and not -1.0 < self.dedup_threshold <= 1.0:
            raise ConfigError(f"select.dedup_threshold: {self.dedup_threshold!r} must be a cosine in (-1, 1] or None")
        _choice("select.dedup_keep", self.dedup_keep, DEDUP_KEEP_RULES)
        if self.teacher is not None:
            from rsdist.select.error_driven import teacher_spec_error

            if teacher_spec_error(self.teacher):
                raise ConfigError(teacher_spec_error(self.teacher))
        _positive("select.num_tasks", self.num_tasks, allow_zero=True)
        _positive("select.rows_per_task", self.rows_per_task)
        _positive("select.cpus_per_task", self.cpus_per_task)
        _positive("select.mmd_width", self.mmd_width)
        _positive("select.mmd_block_rows", self.mmd_block_rows, allow_zero=True)
        if not self.candidates >= 1.0:
            raise ConfigError(f"select.candidates: {self.candidates!r} must be at least 1 (candidates per quota place)")
        _choice("select.alignment_direction", self.alignment_direction, ALIGNMENT_DIRECTIONS)
        _choice("select.alignment_score", self.alignment_score, ALIGNMENT_SCORES)
        _positive("select.alignment_temperature", self.alignment_temperature)
        if not isinstance(self.within_clusters, bool):
            raise ConfigError(f"select.within_clusters: {self.within_clusters!r} must be true or false")
        if self.within_clusters and self.method not in ("scalselect", "coincide", "coincide-within"):
            raise ConfigError(f"select.within_clusters: for methods scalselect and coincide only; {self.method} has its own per-cluster rule")


@dataclass
class LoraFields:
    """The LoRA settings every tuned model shares (dual encoder: train.*, VLM: train.vlm.*)."""

    lora_r: int = _help("LoRA rank.", default=8)
    lora_alpha: int = _help("LoRA alpha.", default=16)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)

    def check_lora(self, section: str) -> None:
        _positive(f"{section}.lora_r", self.lora_r)
        _positive(f"{section}.lora_alpha", self.lora_alpha)
        _fraction(f"{section}.lora_dropout", self.lora_dropout, lo_open=False)


@dataclass
class VlmTrainConfig(LoraFields):
    model: str = _help(f"Image-text-to-text model: one of {TINY_VLMS} (random, for tests) or 'hf:<folder>' (a local Qwen2-VL / Qwen2.5-VL, LLaVA-1.5 / LLaVA-NeXT, Idefics3 / SmolVLM checkpoint in safetensors; 'hf-pickle:<folder>' also allows pickled weights, which can run code: trusted folders only).", default="qwen2-vl-tiny")
    vision: str = _help(f"Vision tower, one of {VLM_VISION}: frozen, or LoRA on its blocks' linears.", default="frozen")
    projector: str = _help(f"Vision-language projector, one of {VLM_PROJECTOR}: trained fully (saved with the adapter) or frozen.", default="trainable")
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lm_targets: list[str] = _help("Language-model Linear names that get LoRA (attention + MLP projections).",
                                  default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    max_pixels: int = _help("Images larger than this many pixels are downscaled to fit (aspect kept).", default=448 * 448)
    min_pixels: int = _help("Images smaller than this many pixels are upscaled to reach it.", default=28 * 28)
    max_tokens: int = _help("Sequences are truncated to this many tokens.", default=2048)
    batch_size: int = _help("Conversations per micro-batch per worker.", default=4)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", default=1)
    epochs: int = _help("Passes over the selected rows.", default=1)
    lr: float = _help("AdamW learning rate.", default=2e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    warmup_fraction: float = _help("Share of optimizer steps with linear warm-up; then linear decay to 0.", default=0.03)
    checkpoint_every: int = _help("Optimizer steps between checkpoints (and one at the end).", default=50)
    checkpoints_to_keep: int = _help("Step checkpoints kept (oldest removed).", default=2)
    num_workers: int = _help("Ray Train workers (data parallel, see strategy).", default=1)
    cpus_per_worker: float = _help("CPUs each worker asks Ray for.", default=1.0)
    device: str = _help(DEVICE_HELP, default="auto")
    gpus_per_worker: float = _help("GPUs each worker asks Ray for when the device is cuda.", default=1.0)
    bf16: bool = _help("bf16 autocast of the forward pass on GPU (ignored on CPU).", default=True)
    gradient_checkpointing: bool = _help("Recompute each layer's activations in the backward pass (saves memory, same loss).", default=False)
    strategy: str = _help(f"Data parallelism, one of {VLM_STRATEGIES}: 'ddp' (every worker holds the whole model) or 'fsdp' (torch FSDP2: parameters, "
                          "gradients and optimizer state sharded per layer over the workers, for models that do not fit one GPU).", default="ddp")
    max_failures: int = _help("Worker or node failures Ray Train recovers from, restarting the workers at the last step checkpoint it registered; 0 = the first failure ends the stage.", default=3)
    seed: int = _help("Seed of initialisation and shuffling.", default=0)
    max_steps: int = _help("Stop after this many optimizer steps in all (0 = run every epoch); a later run resumes.", default=0)

    def __post_init__(self) -> None:
        _choice("train.vlm.vision", self.vision, VLM_VISION)
        _choice("train.vlm.projector", self.projector, VLM_PROJECTOR)
        _choice("train.vlm.strategy", self.strategy, VLM_STRATEGIES)
        if not (self.model in TINY_VLMS or hf_folder(self.model)):
            raise ConfigError(f"train.vlm.model: {self.model!r} is not one of: {', '.join(TINY_VLMS)}, hf:<folder>, hf-pickle:<folder>")
        self.check_lora("train.vlm")
        for name in ("max_pixels", "min_pixels", "max_tokens", "batch_size", "grad_accum", "epochs", "checkpoint_every", "checkpoints_to_keep", "num_workers", "cpus_per_worker", "lr"):
            _positive(f"train.vlm.{name}", getattr(self, name))
        _choice("train.vlm.device", self.device, DEVICES)
        _positive("train.vlm.gpus_per_worker", self.gpus_per_worker)
        _positive("train.vlm.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.vlm.max_failures", self.max_failures, allow_zero=True)
        _positive("train.vlm.max_steps", self.max_steps, allow_zero=True)
        _fraction("train.vlm.warmup_fraction", self.warmup_fraction, lo_open=False)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"train.vlm.min_pixels: {self.min_pixels} must be <= train.vlm.max_pixels={self.max_pixels}")
        if not self.lm_targets:
            raise ConfigError("train.vlm.lm_targets: must name at least one module (e.g. q_proj, v_proj)")


@dataclass
class VlmEvalConfig:
    tasks: list[str] = _help(f"What to evaluate by generation, any of {VLM_EVAL_TASKS}: scene classification (rows with a label, GeoChat's prompt with the class list), VQA (task 'vqa' rows, accuracy per question type), captioning (caption rows: BLEU-4 and ROUGE-L against all references). A task without rows in the split is left out.", default_factory=lambda: list(VLM_EVAL_TASKS))
    baseline: bool = _help("Also evaluate the untuned base model, reported next to the tuned one.", default=True)
    split: str = _help("Rows of this split are evaluated.", default="test")
    classes: list[str] = _help("scene: the class list in the prompt (empty = the distinct labels of the pool, in words: the list training used).", default_factory=list)
    max_rows: int = _help("Evaluate at most this many rows per task (the first by sample_id; 0 = all).", default=0)
    batch_size: int = _help("Rows per generation batch.", default=8)
    max_new_tokens: int = _help("Most tokens generated per answer (captions need more than answers: see caption_new_tokens).", default=16)
    caption_new_tokens: int = _help("Most tokens generated per caption.", default=48)
    max_pixels: int = _help("Images larger than this many pixels are downscaled to fit (aspect kept); match training.", default=448 * 448)
    min_pixels: int = _help("Images smaller than this many pixels are upscaled to reach it.", default=28 * 28)
    num_actors: int = _help("Ray Data actor pool size of generators (0 = generate in this process, no Ray).", default=1)
    cpus_per_actor: float = _help("CPUs each generator actor asks Ray for.", default=1.0)
    device: str = _help(DEVICE_HELP + " With num_actors 0 generation runs in the driver: 'cuda' needs a CUDA device there, 'auto' uses one when present.", default="auto")
    gpus_per_actor: float = _help("GPUs each generator actor asks Ray for when the device is cuda.", default=1.0)
    bf16: bool = _help("bf16 weights on GPU (ignored on CPU).", default=True)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("eval.vlm.tasks: must name at least one of: " + ", ".join(VLM_EVAL_TASKS))
        for task in self.tasks:
            _choice("eval.vlm.tasks", task, VLM_EVAL_TASKS)
        for name in ("batch_size", "max_new_tokens", "caption_new_tokens", "max_pixels", "min_pixels", "cpus_per_actor"):
            _positive(f"eval.vlm.{name}", getattr(self, name))
        _positive("eval.vlm.max_rows", self.max_rows, allow_zero=True)
        _positive("eval.vlm.num_actors", self.num_actors, allow_zero=True)
        _choice("eval.vlm.device", self.device, DEVICES)
        _positive("eval.vlm.gpus_per_actor", self.gpus_per_actor)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"eval.vlm.min_pixels: {self.min_pixels} must be <= eval.vlm.max_pixels={self.max_pixels}")


@dataclass
class TrainConfig(LoraFields):
    model: str = _help(f"What the job tunes, one of {TUNED_MODELS}: 'dual' = the CLIP-style dual encoder of features.encoder (settings below), 'vlm' = an image-text-to-text model with instruction LoRA (train.vlm; evaluated by generation, eval.vlm).", default="dual")
    vlm: VlmTrainConfig = _help("VLM instruction LoRA, when train.model is 'vlm'.", default_factory=VlmTrainConfig)
    method: str = _help("Tuning method of the dual encoder: 'lora' (LoRA on the text tower + heads), 'harma' (HarMA gated adapters + heads, HarMA loss) or 'heads' (both towers frozen, only the projection heads learn: a linear probe whose text features are computed once before training).", default="lora")
    num_workers: int = _help("Ray Train workers (data-parallel).", default=2)
    epochs: int = _help("Passes over the selected subset.", default=5)
    batch_size: int = _help("Samples per step per worker.", default=64)
    lr: float = _help("AdamW learning rate.", default=2e-3)
    weight_decay: float = _help("AdamW weight decay.", default=0.01)
    embed_dim: int = _help("Output size of the projection heads.", default=256)
    lora_targets: list[str] = _help("Text-tower modules that get LoRA adapters.", default_factory=lambda: ["query", "key", "value"])
    max_text_tokens: int = _help("Captions are truncated to this many tokens.", default=48)
    cpus_per_worker: float = _help("CPUs each worker asks Ray for (fractional keeps small hosts moving).", default=0.5)
    device: str = _help(DEVICE_HELP, default="auto")
    gpus_per_worker: float = _help("GPUs each worker asks Ray for when the device is cuda.", default=1.0)
    memory_per_worker_gb: float = _help("Memory (GB) each worker reserves with Ray (Ray's 'memory' resource); 0 = no reservation.", default=0.0)
    seed: int = _help("Seed of initialisation and shuffling.", default=0)
    warmup_fraction: float = _help("Share of all steps with a linear learning-rate warm-up; the rest decays linearly to 0.", default=0.1)
    max_logit_scale: float = _help("Upper clamp of the learnable InfoNCE scale (CLIP uses 100).", default=100.0)
    shuffle_buffer: int = _help("Rows in each worker's local shuffle buffer (0 = no shuffling).", default=1024)
    max_failures: int = _help("Worker or node failures Ray Train recovers from, restarting the workers at the last epoch checkpoint; 0 = the first failure ends the stage.", default=3)
    checkpoints_to_keep: int = _help("Epoch checkpoints kept under checkpoints/ray (oldest removed; with keep_epoch 'best-val', the lowest validation mR; the latest is always kept).", default=2)
    keep_epoch: str = _help(f"Which epoch becomes the trained model, one of {KEEP_EPOCH_RULES}: 'last', or 'best-val' = the epoch with the highest mR on the validation rows (split 'val', e.g. from data.val_fraction), measured after every epoch: early stopping without stopping, so `epochs` is the most it trains.", default="last")
    harma_hidden: int = _help("HarMA: adapter width (Linear d->hidden, attention over hidden).", default=128)
    harma_heads: int = _help("HarMA: attention heads in each adapter (must divide harma_hidden and harma_mini_dim).", default=8)
    harma_mini_dim: int = _help("HarMA: width of the shared mini-adapter (0 = none).", default=64)
    harma_gate_init: float = _help("HarMA: initial gate logit (the paper's code uses 0.6).", default=0.6)
    harma_margin: float = _help("HarMA: margin of the weighted triplet loss.", default=0.2)
    read_block_rows: int = _help("Rows per Ray Data block of the training rows the read tasks yield (a block holds rows x (image_dim + captions x caption bytes); docs/train.md gives the sizing rule).", default=4096)

    def __post_init__(self) -> None:
        self.check_lora("train")
        for name in ("num_workers", "epochs", "batch_size", "embed_dim", "max_text_tokens", "max_logit_scale", "checkpoints_to_keep"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _fraction("train.warmup_fraction", self.warmup_fraction, lo_open=False)
        _positive("train.cpus_per_worker", self.cpus_per_worker)
        _choice("train.device", self.device, DEVICES)
        _positive("train.gpus_per_worker", self.gpus_per_worker)
        _memory("train.memory_per_worker_gb", self.memory_per_worker_gb)
        _positive("train.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive("train.max_failures", self.max_failures, allow_zero=True)
        _positive("train.read_block_rows", self.read_block_rows)
        if not self.lora_targets:
            raise ConfigError("train.lora_targets: must name at least one module (e.g. query, key, value)")
        _choice("train.model", self.model, TUNED_MODELS)
        _choice("train.method", self.method, TRAIN_METHODS)
        _choice("train.keep_epoch", self.keep_epoch, KEEP_EPOCH_RULES)
        _positive("train.harma_hidden", self.harma_hidden)
        _positive("train.harma_heads", self.harma_heads)
        _positive("train.harma_mini_dim", self.harma_mini_dim, allow_zero=True)
        _positive("train.harma_margin", self.harma_margin, allow_zero=True)
        _number("train.harma_gate_init", self.harma_gate_init)
        for name in ("harma_hidden", "harma_mini_dim"):
            if getattr(self, name) % self.harma_heads:
                raise ConfigError(f"train.{name}: {getattr(self, name)} must be a multiple of train.harma_heads={self.harma_heads}")


@dataclass
class EvalConfig:
    recall_ks: list[int] = _help("K values of Recall@K.", default_factory=lambda: [1, 5, 10])
    batch_size: int = _help("Rows per encoding batch.", default=128)
    prompt: str = _help("Zero-shot class prompt; '{label}' is replaced by the class name in words.", default="an aerial photograph of {label}")
    max_text_tokens: int = _help("Captions and prompts are truncated to this many tokens (match train.max_text_tokens).", default=48)
    baseline: bool = _help("Also evaluate the untrained model (heads at initialisation, no adapter) for comparison.", default=True)
    read_block_rows: int = _help("Rows per Ray Data block of the held-out rows the read tasks yield; each encoding actor holds one block and its embeddings (docs/train.md gives the sizing rule).", default=4096)
    vlm: VlmEvalConfig = _help("Evaluation by generation, when train.model is 'vlm'.", default_factory=VlmEvalConfig)
    failure_rank: int = _help("With validation rows (split 'val', data.val_fraction): a validation image fails when its own caption is not among the first failure_rank captions retrieved for it, or one of its captions does not retrieve it among the first failure_rank images; the failures (weight = share of its queries missed) go to <run>/eval/failures.parquet for error-driven selection. 0 = write none.", default=5)

    def __post_init__(self) -> None:
        if not self.recall_ks:
            raise ConfigError("eval.recall_ks: must hold at least one K")
        for k in self.recall_ks:
            _positive("eval.recall_ks", k)
        _positive("eval.batch_size", self.batch_size)
        if "{label}" not in self.prompt:
            raise ConfigError(f"eval.prompt: {self.prompt!r} must contain '{{label}}'")
        _positive("eval.max_text_tokens", self.max_text_tokens)
        _positive("eval.failure_rank", self.failure_rank, allow_zero=True)
        _positive("eval.read_block_rows", self.read_block_rows)


@dataclass
class RayConfig:
    address: Optional[str] = _help("Ray cluster address; None starts (or joins) a local Ray sized to the machine.", default=None)
    num_cpus: Optional[int] = _help("CPUs of a local Ray (default: all).", default=None)
    demand_timeout_s: float = _help("How long a stage waits for a node that can hold one of its workers (the autoscaler adding one) before the run ends with an error naming the setting.", default=600.0)
    autoscaler_config: Optional[str] = _help("The cluster launcher YAML the autoscaler runs with; its available_node_types tell which workers can ever be placed and whether 'auto' devices mean GPUs. Default: ~/ray_bootstrap_config.yaml when present (`ray up` puts it on the head).", default=None)

    def __post_init__(self) -> None:
        _positive("ray.demand_timeout_s", self.demand_timeout_s)
        if self.num_cpus is not None:
            _positive("ray.num_cpus", self.num_cpus)
            if not isinstance(self.num_cpus, int):
                raise ConfigError(f"ray.num_cpus: {self.num_cpus!r} must be a whole number of CPUs")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ConfigError(f"ray.address: {self.address!r} must be a cluster address (e.g. auto, ray://host:10001) or null")


@dataclass
class RunConfig:
    run_dir: str = _help("Run directory (any fsspec URI); every stage writes its output here.", default="runs/demo")
    data: DataConfig = _help("Input data.", default_factory=DataConfig)
    features: FeaturesConfig = _help("Embedding and perturbation pass.", default_factory=FeaturesConfig)
    cluster: ClusterConfig = _help("Mini-batch k-means.", default_factory=ClusterConfig)
    select: SelectConfig = _help("Selection strategy and budget.", default_factory=SelectConfig)
    train: TrainConfig = _help("LoRA fine-tuning.", default_factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation.", default_factory=EvalConfig)
    ray: RayConfig = _help("Where to run.", default_factory=RayConfig)


def _build(cls: type, values: Any, path: str) -> Any:
    """Build dataclass `cls` from a plain mapping, naming the full path of any unknown field."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(f"{where}: unknown setting; known: {', '.join(known)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, where)
        else:
            kwargs[key] = _coerce(value, hint, where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0] if args else Any, where) for v in value]
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: {str(value).lower()} is a boolean, not a number")
    if hint in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if hint is float and isinstance(value, (int, float)):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: {value!r} is not a {hint.__name__}")
    return value


def config_from_dict(values: dict) -> RunConfig:
    return _build(RunConfig, values, "")


def load_yaml(path: str) -> dict:
    """A YAML settings file (any fsspec URI) as a dict; malformed YAML is a ConfigError naming the file."""
    import fsspec

    with fsspec.open(path, "r") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings sections, found {type(values).__name__}")
    return values


def load_config(path: str) -> RunConfig:
    """Read a YAML config file into a RunConfig."""
    return config_from_dict(load_yaml(path))


def apply_sets(values: dict, items: list[str], form: str = "section.field=value") -> None:
    """Apply `--set` overrides `dotted.key=value` to the settings dict `values` in place; each
    value is parsed as YAML (numbers, lists, ...); `form` names the expected shape in errors."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected {form}")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        *parents, leaf = dotted.split(".")
        node = values
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {k} is not a section")
        node[leaf] = yaml.safe_load(raw)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
