"""VLM evaluation by generation: scene classification, VQA and captioning on the held-out rows.

Rows: `<run>/shards/` with split == `eval.vlm.split` (default test), per task:
- `scene`: rows with a `label`; the prompt is GeoChat's "Classify the image from the following
  classes. Answer in one word or a short phrase." with the class list (the pool's labels in words,
  as training listed them, or `classes`); the answer is normalised and matched to the list
  (`vlm_metrics.match_class`): accuracy overall and per class;
- `vqa`: rows with task == "vqa"; the question with "Answer the question using a single word or
  phrase."; normalised exact match per question type (`meta.question_type`, as the RSVQA reader
  writes it) and averaged over types;
- `caption`: rows with task == "caption" and captions; "Describe the image."; corpus BLEU-4 and
  mean ROUGE-L F against all of the image's captions.
The prompts are the instruction pool's (rsdist/models/instructions.py). A task with no rows in the
split is left out.
Model: a name ('qwen2-vl-tiny', ..., 'hf:<folder>') with optional LoRA adapter files, merged
before generation. Generation: batched, greedy, left-padded, the family's training template with
its generation prompt (`rsdist.models.vlm`). Large sets run on Ray: a Ray Data
`map_batches` over the rows with an elastic actor pool of up to `num_actors` generators
(`gpus_per_actor` GPUs each when `device` means GPUs, bf16 there; the pool goes on with fewer
when a node is lost); `num_actors: 0` runs in-process (on the driver's GPU with device cuda or auto).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import torch

from rsdist.config import ConfigError, VlmEvalConfig
from rsdist.eval.vlm_metrics import caption_metrics, classification_metrics, match_class, vqa_matches, vqa_metrics
from rsdist.core.rundir import RunDir
from rsdist.models.instructions import CAPTION_PROMPT, SCENE_PROMPT, VQA_PROMPT, question_type, readable_label, scene_prompt, vqa_prompt
from rsdist.models.safe_files import CheckpointError, check_adapter_folder
from rsdist.stage import Resources

if TYPE_CHECKING:
    from rsdist.core.raycluster import Demand

__all__ = ["VlmEvalConfig", "SCENE_PROMPT", "VQA_PROMPT", "CAPTION_PROMPT", "eval_rows", "task_inputs", "generate_answers", "evaluate_model"]

ROW_COLUMNS = ["sample_id", "image", "task", "text", "answer", "label", "captions", "split", "meta"]
PROMPTS = {"scene": SCENE_PROMPT, "vqa": VQA_PROMPT, "caption": CAPTION_PROMPT}


# -- prompts and rows ----------------------------------------------------------------------------
def _scorable(batch: pa.RecordBatch, task: str):
    if task == "scene":
        return pc.is_valid(batch.column("label"))
    if task == "vqa":
        return pc.and_(pc.fill_null(pc.equal(batch.column("task"), "vqa"), False), pc.is_valid(batch.column("answer")))
    has_captions = pc.fill_null(pc.greater(pc.list_value_length(batch.column("captions")), 0), False)
    return pc.and_(pc.fill_null(pc.equal(batch.column("task"), "caption"), False), has_captions)


def eval_rows(run: RunDir, task: str, cfg: VlmEvalConfig) -> pa.Table:
    """Shard rows of `cfg.split` the task can score, sorted by sample_id, at most `max_rows` (may be empty)."""
    from rsdist.core.rows import _filtered

    def keep(batch: pa.RecordBatch):
        return pc.and_(pc.fill_null(pc.equal(batch.column("split"), cfg.split), False), _scorable(batch, task))

    rows = _filtered(run, "shards", ROW_COLUMNS, keep).sort_by("sample_id")
    return rows.slice(0, cfg.max_rows) if cfg.max_rows else rows


def task_inputs(rows: pa.Table, task: str, classes: list[str]) -> tuple[pa.Table, dict]:
    """(generation inputs: sample_id, image, prompt; what scoring needs: targets, classes or types)."""
    if task == "scene":
        targets = [readable_label(label) for label in rows.column("label").to_pylist()]
        classes = sorted(set(classes) | set(targets))
        prompts = [scene_prompt(classes)] * rows.num_rows
        scoring = {"targets": targets, "classes": classes}
    elif task == "vqa":
        prompts = [vqa_prompt(q or "") for q in rows.column("text").to_pylist()]
        scoring = {"targets": rows.column("answer").to_pylist(), "types": [question_type(m) for m in rows.column("meta").to_pylist()]}
    else:
        prompts = [CAPTION_PROMPT] * rows.num_rows
        references = rows.column("captions").to_pylist()
        scoring = {"targets": [r[0] for r in references], "references": references}
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
            check_adapter_folder(folder)
            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    if use_gpu and torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16 if bf16 else torch.float32)
    return model.eval(), processor


class VlmGenerator:
    """Ray Data callable (one per actor): pyarrow batch of sample_id, image, prompt, max_new -> sample_id, prediction."""

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


GPU_SETTING = "eval.vlm.device=cuda with eval.vlm.gpus_per_actor"


def generator_resources(cfg: VlmEvalConfig) -> Resources:
    """What each generator actor asks for: `gpus_per_actor` GPUs when `eval.vlm.device` means
    them (cuda, present or not, so an autoscaler adds GPU nodes; auto on a cluster that has or can
    add GPU nodes), else CPUs only."""
    from rsdist.core.raycluster import use_gpus

    return Resources(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if use_gpus(cfg.device) else 0.0)


def generator_demand(cfg: VlmEvalConfig, res: Resources) -> Demand:
    """The generator actors' demand: up to `num_actors` (an elastic pool: it starts with one)."""
    from rsdist.core.raycluster import Demand

    return Demand(res.bundle(), {"CPU": "eval.vlm.cpus_per_actor", "GPU": GPU_SETTING}, count=cfg.num_actors, count_setting="eval.vlm.num_actors",
                  what="generator actors", all_at_once=False)


def driver_uses_gpu(cfg: VlmEvalConfig) -> bool:
    """With num_actors 0 generation runs in the driver: on its GPU with device cuda (which needs
    one) or auto (when it has one), on its CPU otherwise."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.vlm.device: 'cuda' with eval.vlm.num_actors 0 generates in the driver, which has no CUDA device; "
                          "set eval.vlm.num_actors to 1 or more to generate on GPU workers")
    return cfg.device != "cpu" and torch.cuda.is_available()


def check_generator_placement(cfg: VlmEvalConfig) -> None:
    """Refuse, naming the setting, generators that can never run: actors no node can place, or
    cuda in a driver without a CUDA device."""
    from rsdist.core.raycluster import check_demand

    if cfg.num_actors == 0:
        driver_uses_gpu(cfg)
        return
    check_demand(generator_demand(cfg, generator_resources(cfg)))


def generate_all(inputs: pa.Table, cfg: VlmEvalConfig, model: str, seed: int, adapter_files: dict[str, bytes] | None, max_new_tokens: int) -> list[str]:
    """Answers for every input row, in input order: in-process with num_actors 0, else a Ray Data actor pool."""
    kwargs = dict(model=model, seed=seed, adapter_files=adapter_files, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels,
                  max_new_tokens=max_new_tokens, bf16=cfg.bf16)
    if cfg.num_actors == 0:
        generator = VlmGenerator(**kwargs, use_gpu=driver_uses_gpu(cfg))
        parts = [generator(inputs.slice(i, cfg.batch_size)) for i in range(0, inputs.num_rows, cfg.batch_size)]
        out = pa.concat_tables(parts)
    else:
        import ray

        from rsdist.core.raycluster import elastic_actor_pool, ensure_demand

        res = generator_resources(cfg)
        ensure_demand(generator_demand(cfg, res))  # check_demand ran before any stage (vlm_stage.check_resources)
        ds = ray.data.from_arrow(inputs).map_batches(VlmGenerator, batch_size=cfg.batch_size, batch_format="pyarrow",
                                                      fn_constructor_kwargs={**kwargs, "use_gpu": res.num_gpus > 0}, compute=elastic_actor_pool(cfg.num_actors),
                                                      num_cpus=res.num_cpus, num_gpus=res.num_gpus or None)
        out = pa.Table.from_pylist(ds.take_all())
    answers = dict(zip(out.column("sample_id").to_pylist(), out.column("prediction").to_pylist()))
    return [answers[s] for s in inputs.column("sample_id").to_pylist()]


# -- scoring and one model's evaluation ------------------------------------------------------------
def score(task: str, answers: list[str], scoring: dict) -> tuple[dict, dict]:
    """(metrics, per-row columns for the predictions table)."""
    if task == "scene":
        matched = [match_class(a, scoring["classes"]) for a in answers]
        return classification_metrics(answers, scoring["targets"], scoring["classes"]), {"matched": matched, "correct": [m == t for m, t in zip(matched, scoring["targets"])]}
    if task == "vqa":
        correct = vqa_matches(answers, scoring["targets"])
        return vqa_metrics(correct, scoring["types"]), {"question_type": scoring["types"], "correct": correct}
    return caption_metrics(answers, scoring["references"]), {}


def evaluate_model(run: RunDir, cfg: VlmEvalConfig, model: str, seed: int, adapter_files: dict[str, bytes] | None, classes: list[str], which: str) -> dict:
    """Every task of `cfg.tasks` with rows in the split, for one model: {task: {rows, prompt, metrics, seconds}};
    the answers go to `<run>/vlm_eval/<which>_<task>_predictions.parquet`."""
    out = {}
    for task in cfg.tasks:
        rows = eval_rows(run, task, cfg)
        if rows.num_rows == 0:
            continue
        started = time.perf_counter()
        inputs, scoring = task_inputs(rows, task, classes)
        answers = generate_all(inputs, cfg, model, seed, adapter_files, cfg.caption_new_tokens if task == "caption" else cfg.max_new_tokens)
        metrics, columns = score(task, answers, scoring)
        predictions = pa.table({"sample_id": inputs.column("sample_id"), "prompt": inputs.column("prompt"), "prediction": pa.array(answers, pa.string()),
                                "target": pa.array(scoring["targets"], pa.string()), **{k: pa.array(v) for k, v in columns.items()}})
        run.write_table(predictions, "vlm_eval", f"{which}_{task}_predictions.parquet")
        out[task] = {"rows": inputs.num_rows, "prompt": PROMPTS[task], **({"classes": scoring["classes"]} if task == "scene" else {}),
                     "metrics": metrics, "seconds": round(time.perf_counter() - started, 3)}
    return out
