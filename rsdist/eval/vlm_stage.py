"""Eval stage when `train.model` is 'vlm': evaluation by generation of the tuned VLM and, with
`eval.vlm.baseline`, of the untuned base model on the same rows (rsdist/eval/vlm.py).

Input: `<run>/vlm_checkpoints/final/` (`train_meta.json` names the base model and seed,
`adapter/` the LoRA weights) and the held-out rows of `<run>/shards/`.
Output, `<run>/vlm_eval/` (this stage's own folder): `metrics.json` ({"tuned": {task: ...},
"untuned": {task: ...}, "flat": the summary's metrics, "settings"}) and
`<tuned|untuned>_<task>_predictions.parquet` (one row per sample: prompt, answer, target).
Resources: the driver, or up to `eval.vlm.num_actors` Ray Data generator actors of
`cpus_per_actor` CPUs and, when `eval.vlm.device` means GPUs, `gpus_per_actor` GPUs each.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from rsdist.config import EvalConfig
from rsdist.eval.vlm import check_generator_placement, evaluate_model, generator_resources
from rsdist.core.rundir import RunDir
from rsdist.models.instructions import pool_classes
from rsdist.models.safe_files import CheckpointError, check_adapter_folder
from rsdist.stage import Resources, Stage, StageResult

FOLDER = "vlm_eval"
TRAINED = ("vlm_checkpoints", "final")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_adapter(run: RunDir) -> dict[str, bytes]:
    """The trained adapter's files (name -> bytes), shipped to the generator actors: its config and
    safetensors weights, checked here first (CheckpointError naming a file that is not one)."""
    files = {}
    for name in ADAPTER_FILES:
        path = run.path(*TRAINED, "adapter", name)
        if not run.fs.exists(path):
            raise CheckpointError(f"{run.url(*TRAINED, 'adapter', name)}: missing (rsdist reads adapter weights from safetensors only)")
        with run.fs.open(path, "rb") as f:
            files[name] = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            check_adapter_folder(tmp)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(tmp, run.url(*TRAINED, "adapter"))) from None
    return files


def flat_metrics(results: dict) -> dict:
    """The headline figures by name: scene_accuracy, scene_mean_class_accuracy, vqa_accuracy,
    vqa_average_over_types, vqa_<type>_accuracy, caption_bleu4, caption_rouge_l."""
    out = {}
    for task, result in results.items():
        m = result["metrics"]
        if task == "scene":
            out.update(scene_accuracy=m["accuracy"], scene_mean_class_accuracy=m["mean_class_accuracy"])
        elif task == "vqa":
            out.update(vqa_accuracy=m["accuracy"], vqa_average_over_types=m["average_over_types"])
            out.update({f"vqa_{t}_accuracy": v["accuracy"] for t, v in m["per_type"].items()})
        else:
            out.update(caption_bleu4=m["bleu4"], caption_rouge_l=m["rouge_l"])
    return out


def run(run: RunDir, cfg: EvalConfig) -> StageResult:
    if not run.exists(*TRAINED, "train_meta.json"):
        raise FileNotFoundError(f"{run.url(*TRAINED, 'train_meta.json')}: no trained VLM adapter; run the train stage with train.model=vlm first")
    meta = run.read_json(*TRAINED, "train_meta.json")
    model, seed = meta["settings"]["model"], meta["settings"]["seed"]
    classes = list(cfg.vlm.classes) or pool_classes(run)
    tuned = evaluate_model(run, cfg.vlm, model, seed, read_adapter(run), classes, "tuned")
    if not tuned:
        raise ValueError(f"{run.url('shards')}: no rows with split == {cfg.vlm.split!r} for any of eval.vlm.tasks ({', '.join(cfg.vlm.tasks)})")
    untuned = evaluate_model(run, cfg.vlm, model, seed, None, classes, "untuned") if cfg.vlm.baseline else {}
    flat = flat_metrics(tuned)
    flat.update({f"untuned_{k}": v for k, v in flat_metrics(untuned).items()})
    rows = sum(r["rows"] for r in tuned.values())
    run.write_json({"model": model, "seed": seed, "adapter": run.url(*TRAINED, "adapter"), "tuned": tuned, "untuned": untuned, "flat": flat,
                    "settings": dataclasses.asdict(cfg.vlm)}, FOLDER, "metrics.json")
    return StageResult(rows_in=rows, rows_out=rows, extra={"metrics": flat, "tasks": sorted(tuned)})


def resources(cfg: EvalConfig) -> Resources:
    """What each generator actor asks for (the driver alone with eval.vlm.num_actors 0)."""
    return generator_resources(cfg.vlm) if cfg.vlm.num_actors else Resources(num_cpus=1.0)


def check_resources(cfg: EvalConfig) -> None:
    """Refuse, naming the setting, generators that can never run (check_generator_placement)."""
    check_generator_placement(cfg.vlm)


STAGE = Stage(name="eval", folder=FOLDER, reads=("vlm_checkpoints", "shards"), section="eval", resources=resources, run=run, placement=check_resources)
