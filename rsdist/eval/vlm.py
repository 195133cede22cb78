"""VLM evaluation by generation: scene classification and VQA on the run's held-out rows.

Rows: `<run>/shards/` with split == `split` (default test). `scene`: rows with a `label`; the
prompt is GeoChat's "Classify the image from the following classes. Answer in one word or a short
phrase." followed by the class list (the labels in words, or `classes`); the answer is normalised
and matched to the list (`vlm_metrics.match_class`). `vqa`: rows with task == "vqa"; the prompt is
the question (`text`) followed by "Answer the question using a single word or phrase."; the answer
is compared to `answer` by normalised exact match, per question type (`meta.question_type`, as the
RSVQA reader writes it) and averaged over types.
Model: the base model VLM training used (`<run>/checkpoints/vlm/final/train_meta.json`) with its
LoRA adapter (`adapter`), or any model name with `adapter: false`. Generation: batched, greedy,
left-padded, the family's training template with its generation prompt (`rsdist.models.vlm`).
Large sets run on Ray: a Ray Data `map_batches` over the rows with an actor pool of `num_actors`
generators (one GPU each when the cluster has GPUs, bf16 there); `num_actors: 0` runs in-process.
Output: `<run>/eval/vlm_<task>.json` (metrics, the settings and model that produced them) and
`<run>/eval/vlm_<task>_predictions.parquet` (one row per sample: prompt, answer, target).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rsdist.config import ConfigError, _choice, _help, _positive
from rsdist.eval.vlm_metrics import TASKS, classification_metrics, match_class, vqa_matches, vqa_metrics
from rsdist.core.rundir import RunDir

SCENE_PROMPT = "Classify the image from the following classes. Answer in one word or a short phrase."
VQA_PROMPT = "Answer the question using a single word or phrase."
TRAINED = ("checkpoints", "vlm", "final")
ROW_COLUMNS = ["sample_id", "image", "task", "text", "answer", "label", "split", "meta"]


@dataclass
class VlmEvalConfig:
    task: str = _help(f"What to evaluate, one of {TASKS}: scene classification or VQA by generation.", default="scene")
    model: str = _help("Model name ('qwen2-vl-tiny', 'llava-tiny', ..., 'hf:<folder>'); empty = the model the run's VLM training used.", default="")
    adapter: bool = _help("Apply the run's trained LoRA adapter (<run>/checkpoints/vlm/final/adapter); false = the base model.", default=True)
    split: str = _help("Rows of this split are evaluated.", default="test")
    classes: list[str] = _help("scene: the class list in the prompt (empty = the distinct labels of the rows, in words).", default_factory=list)
    max_rows: int = _help("Evaluate at most this many rows (the first by sample_id; 0 = all).", default=0)
    batch_size: int = _help("Rows per generation batch.", default=8)
    max_new_tokens: int = _help("Most tokens generated per answer.", default=16)
    max_pixels: int = _help("Images larger than this many pixels are downscaled to fit (aspect kept); match training.", default=448 * 448)
    min_pixels: int = _help("Images smaller than this many pixels are upscaled to reach it.", default=28 * 28)
    num_actors: int = _help("Ray Data actor pool size of generators (0 = generate in this process, no Ray).", default=1)
    cpus_per_actor: float = _help("CPUs each generator actor asks Ray for.", default=1.0)
    bf16: bool = _help("bf16 weights on GPU (ignored on CPU).", default=True)
    seed: int = _help("Seed of a tiny random model when no trained adapter is used.", default=0)

    def __post_init__(self) -> None:
        _choice("eval.vlm.task", self.task, TASKS)
        for name in ("batch_size", "max_new_tokens", "max_pixels", "min_pixels", "cpus_per_actor"):
            _positive(f"eval.vlm.{name}", getattr(self, name))
        _positive("eval.vlm.max_rows", self.max_rows, allow_zero=True)
        _positive("eval.vlm.num_actors", self.num_actors, allow_zero=True)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"eval.vlm.min_pixels: {self.min_pixels} must be <= eval.vlm.max_pixels={self.max_pixels}")
        if self.task == "vqa" and self.classes:
            raise ConfigError("eval.vlm.classes: only used with eval.vlm.task=scene")


# -- prompts and rows ----------------------------------------------------------------------------
def scene_prompt(classes: list[str]) -> str:
    return f"{SCENE_PROMPT}\nClasses: {', '.join(classes)}."


def vqa_prompt(question: str) -> str:
    return f"{question}\n{VQA_PROMPT}"


def question_type(meta: str | None) -> str | None:
    """`question_type` of a row's meta JSON (RSVQA rows carry one), or None."""
    try:
        return json.loads(meta or "{}").get("question_type")
    except json.JSONDecodeError:
        return None


def eval_rows(run: RunDir, cfg: VlmEvalConfig) -> pa.Table:
    """Shard rows of `cfg.split` the task can score, sorted by sample_id, at most `max_rows`."""
    from rsdist.core.rows import _filtered

    def keep(batch: pa.RecordBatch):
        in_split = pc.fill_null(pc.equal(batch.column("split"), cfg.split), False)
        if cfg.task == "scene":
            scorable = pc.is_valid(batch.column("label"))
        else:
            scorable = pc.and_(pc.fill_null(pc.equal(batch.column("task"), "vqa"), False), pc.is_valid(batch.column("answer")))
        return pc.and_(in_split, scorable)

    rows = _filtered(run, "shards", ROW_COLUMNS, keep).sort_by("sample_id")
    if rows.num_rows == 0:
        what = "a label" if cfg.task == "scene" else "task == 'vqa' and an answer"
        raise ValueError(f"{run.url('shards')}: no rows with split == {cfg.split!r} and {what} to evaluate (eval.vlm.task={cfg.task})")
    return rows.slice(0, cfg.max_rows) if cfg.max_rows else rows


def task_inputs(rows: pa.Table, cfg: VlmEvalConfig) -> tuple[pa.Table, dict]:
    """(generation inputs: sample_id, image, prompt; what scoring needs: targets, classes or types)."""
    from rsdist.core.schema import readable_label

    if cfg.task == "scene":
        targets = [readable_label(label) for label in rows.column("label").to_pylist()]
        classes = list(cfg.classes) or sorted(set(targets))
        prompts = [scene_prompt(classes)] * rows.num_rows
        scoring = {"targets": targets, "classes": classes}
    else:
        prompts = [vqa_prompt(q or "") for q in rows.column("text").to_pylist()]
        scoring = {"targets": rows.column("answer").to_pylist(), "types": [question_type(m) for m in rows.column("meta").to_pylist()]}
    inputs = pa.table({"sample_id": rows.column("sample_id"), "image": rows.column("image"), "prompt": pa.array(prompts, pa.string())})
    return inputs, scoring


# -- generation ----------------------------------------------------------------------------------
def generation_messages(prompt: str, image) -> list[dict]:
    """One user turn: the image (when there is one) then the prompt."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


@torch.no_grad()
def generate_answers(model, processor, images: list, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of one left-padded batch, decoded without special tokens and stripped."""
    from rsdist.models.vlm import end_token_id, family_of

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    conversations = [generation_messages(p, im) for p, im in zip(prompts, images)]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True})
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=end_token_id(family_of(model), tokenizer))
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_for_eval(model_name: str, seed: int, adapter_files: dict[str, bytes] | None, use_gpu: bool, bf16: bool):
    """(model, processor) ready to generate: the base model, the adapter merged in when given."""
    from rsdist.models.vlm import load_vlm

    model, processor = load_vlm(model_name, seed=seed)
    if adapter_files:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as folder:
            for name, data in adapter_files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    if use_gpu and torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16 if bf16 else torch.float32)
    return model.eval(), processor


class VlmGenerator:
    """Ray Data callable (one per actor): pyarrow batch of sample_id, image, prompt -> sample_id, prediction."""

    def __init__(self, model: str, seed: int, adapter_files: dict[str, bytes] | None, max_pixels: int, min_pixels: int, max_new_tokens: int,
                 use_gpu: bool = False, bf16: bool = True):
        self.model, self.processor = load_for_eval(model, seed, adapter_files, use_gpu, bf16)
        self.max_pixels, self.min_pixels, self.max_new_tokens = max_pixels, min_pixels, max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from rsdist.models.vlm import decode_image

        rows = batch.select(["sample_id", "image"]).to_pylist()
        images = [decode_image(r, self.max_pixels, self.min_pixels) for r in rows]
        answers = generate_answers(self.model, self.processor, images, batch.column("prompt").to_pylist(), self.max_new_tokens)
        return pa.table({"sample_id": batch.column("sample_id"), "prediction": pa.array(answers, pa.string())})


def generate_all(inputs: pa.Table, cfg: VlmEvalConfig, model: str, seed: int, adapter_files: dict[str, bytes] | None) -> list[str]:
    """Answers for every input row, in input order: in-process with num_actors 0, else a Ray Data actor pool."""
    kwargs = dict(model=model, seed=seed, adapter_files=adapter_files, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                  max_new_tokens=cfg.max_new_tokens, bf16=cfg.bf16)
    if cfg.num_actors == 0:
        generator = VlmGenerator(**kwargs, use_gpu=torch.cuda.is_available())
        parts = [generator(inputs.slice(i, cfg.batch_size)) for i in range(0, inputs.num_rows, cfg.batch_size)]
        out = pa.concat_tables(parts)
    else:
        import ray

        from rsdist.core.raycluster import cluster_gpus

        gpus = cluster_gpus() > 0
        ds = ray.data.from_arrow(inputs).map_batches(VlmGenerator, batch_size=cfg.batch_size, batch_format="pyarrow",
                                                      fn_constructor_kwargs={**kwargs, "use_gpu": gpus}, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                                                      num_cpus=cfg.cpus_per_actor, num_gpus=1 if gpus else None)
        out = pa.Table.from_pylist(ds.take_all())
    answers = dict(zip(out.column("sample_id").to_pylist(), out.column("prediction").to_pylist()))
    return [answers[s] for s in inputs.column("sample_id").to_pylist()]


# -- the evaluation -------------------------------------------------------------------------------
def resolve_model(run: RunDir, cfg: VlmEvalConfig) -> tuple[str, int, dict[str, bytes] | None]:
    """(model name, seed, adapter files) from the run's VLM training or from the settings."""
    meta = run.read_json(*TRAINED, "train_meta.json") if run.exists(*TRAINED, "train_meta.json") else None
    if cfg.adapter:
        if meta is None:
            raise FileNotFoundError(f"{run.url(*TRAINED, 'train_meta.json')}: no trained VLM adapter (train first, or set eval.vlm.adapter=false)")
        trained = meta["settings"]["model"]
        if cfg.model and cfg.model != trained:
            raise ConfigError(f"eval.vlm.model: {cfg.model!r} differs from the model the adapter was trained on ({trained!r})")
        return trained, meta["settings"]["seed"], read_adapter(run)
    model = cfg.model or (meta["settings"]["model"] if meta else "")
    if not model:
        raise ConfigError("eval.vlm.model: must name a model when the run has no VLM training (e.g. qwen2-vl-tiny or hf:<folder>)")
    return model, cfg.seed, None


def read_adapter(run: RunDir) -> dict[str, bytes]:
    """The trained adapter's files (name -> bytes), shipped to the generator actors."""
    folder = run.path(*TRAINED, "adapter")
    files = {}
    for path in run.fs.ls(folder, detail=False):
        with run.fs.open(path, "rb") as f:
            files[os.path.basename(path.rstrip("/"))] = f.read()
    return files


def score(task: str, answers: list[str], scoring: dict) -> tuple[dict, dict]:
    """(metrics, per-row columns for the predictions table)."""
    if task == "scene":
        matched = [match_class(a, scoring["classes"]) for a in answers]
        return classification_metrics(answers, scoring["targets"], scoring["classes"]), {"matched": matched, "correct": [m == t for m, t in zip(matched, scoring["targets"])]}
    correct = vqa_matches(answers, scoring["targets"])
    return vqa_metrics(correct, scoring["types"]), {"question_type": scoring["types"], "correct": correct}


def run_vlm_eval(run: RunDir, cfg: VlmEvalConfig) -> dict:
    """Evaluate by generation and write `<run>/eval/vlm_<task>.json` + predictions; returns the JSON."""
    started = time.perf_counter()
    model, seed, adapter = resolve_model(run, cfg)
    inputs, scoring = task_inputs(eval_rows(run, cfg), cfg)
    answers = generate_all(inputs, cfg, model, seed, adapter)
    metrics, columns = score(cfg.task, answers, scoring)
    predictions = pa.table({"sample_id": inputs.column("sample_id"), "prompt": inputs.column("prompt"), "prediction": pa.array(answers, pa.string()),
                            "target": pa.array(scoring["targets"], pa.string()), **{k: pa.array(v) for k, v in columns.items()}})
    run.write_table(predictions, "eval", f"vlm_{cfg.task}_predictions.parquet")
    result = {"task": cfg.task, "model": model, "seed": seed, "adapter": run.url(*TRAINED, "adapter") if adapter else None, "rows": inputs.num_rows,
              "prompt": SCENE_PROMPT if cfg.task == "scene" else VQA_PROMPT, **({"classes": scoring["classes"]} if cfg.task == "scene" else {}),
              "metrics": metrics, "seconds": round(time.perf_counter() - started, 3), "settings": dataclasses.asdict(cfg)}
    run.write_json(result, "eval", f"vlm_{cfg.task}.json")
    return result
