"""The job: the stages' declared contracts (rsdist.stage.Stage) in flow order, ingest -> features ->
cluster -> select -> train -> eval -> report.

`train.model` decides what train and eval are: the dual encoder's (`checkpoints/`, `eval/`) or,
with 'vlm', instruction LoRA of an image-text-to-text model and evaluation by generation
(`vlm_checkpoints/`, `vlm_eval/`); each stage owns its folder, so one never clears the other's.

Each stage reads earlier stages' output from the run directory and writes its own folder.
A stage's fingerprint hashes its own settings and the fingerprint of the stage before it, so
changing a setting re-runs that stage and everything after it, and nothing before it. A killed
job, run again, skips every stage whose output is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import rsdist
from rsdist.config import DataConfig, RunConfig, config_to_dict
from rsdist.core.rundir import RunDir
from rsdist.stage import Stage, StageResult, completed, fingerprint, run_stage

log = logging.getLogger("rsdist")

SYNTHETIC_FOLDER = "synthetic_source"
SYNTHETIC_VLM_FOLDER = "synthetic_vlm_source"
SYNTHETIC_SOURCES = ("synthetic", "synthetic-vlm")  # data.source values that generate the demo sets
SYNTHETIC_DONE = "_SUCCESS.json"


def resolve_data(run: RunDir, data: DataConfig) -> DataConfig:
    """Point 'synthetic' at a generated copy of the demo set inside the run directory, and
    'synthetic-vlm' at a generated instruction set (scene folders, RSVQA-style questions and
    captions: three sources of one pool)."""
    if data.source == "synthetic-vlm":
        return resolve_instruction_data(run, data)
    if data.source != "synthetic":
        return data
    from rsdist import synthetic

    log.info("the SYNTHETIC demo dataset (%d scenes per class)", data.synthetic_per_class)
    generate_once(run, SYNTHETIC_FOLDER, synthetic.generate, data.synthetic_per_class)
    return dataclasses.replace(data, source=run.url(SYNTHETIC_FOLDER), format="captions-txt")


def generate_once(run: RunDir, folder: str, generate, per_class: int) -> None:
    """Generate a demo set into `folder` unless it is already there: written in place, then
    committed by a marker (a folder rename is not atomic, or not a rename at all, on object
    stores); a generation cut short is redone from scratch."""
    if run.exists(folder, SYNTHETIC_DONE):
        return
    run.remove(folder)
    generate(run.url(folder), per_class=per_class)
    run.write_json({"per_class": per_class}, folder, SYNTHETIC_DONE)


def resolve_instruction_data(run: RunDir, data: DataConfig) -> DataConfig:
    from rsdist import synthetic

    log.info("the SYNTHETIC instruction set (%d scenes per class and part)", data.synthetic_per_class)
    generate_once(run, SYNTHETIC_VLM_FOLDER, synthetic.generate_instructions, data.synthetic_per_class)
    parts = [(run.url(SYNTHETIC_VLM_FOLDER, name), fmt) for name, fmt in synthetic.INSTRUCTION_PARTS.items()]
    (first, fmt), *rest = parts
    return dataclasses.replace(data, source=first, format=fmt, sources=[{"source": s, "format": f} for s, f in rest])


def job_stages(cfg: RunConfig | None = None) -> list[Stage]:
    """The job's stages in flow order, as each declares itself (its module's STAGE); with
    train.model 'vlm', the VLM's train and eval stages."""
    from rsdist.cluster import stage as cluster
    from rsdist.eval import stage as evaluate
    from rsdist.features import stage as features
    from rsdist.ingest import stage as ingest
    from rsdist.select import stage as select
    from rsdist.train import stage as train

    if cfg is not None and cfg.train.model == "vlm":
        from rsdist.eval import vlm_stage as vlm_evaluate
        from rsdist.train import vlm_stage as vlm_train

        return [ingest.STAGE, features.STAGE, cluster.STAGE, select.STAGE, vlm_train.STAGE, vlm_evaluate.STAGE]
    return [ingest.STAGE, features.STAGE, cluster.STAGE, select.STAGE, train.STAGE, evaluate.STAGE]


STAGE_NAMES = ("ingest", "features", "cluster", "select", "train", "eval")


def stage_settings(stage: Stage, cfg: RunConfig, data: DataConfig):
    """The settings section a stage's output depends on (`data` with 'synthetic' resolved)."""
    return data if stage.section == "data" else getattr(cfg, stage.section)


def check_resources(cfg: RunConfig, only: list[str] | None = None) -> None:
    """Before any stage runs: refuse, naming the setting, workers or actors of the stages to run that
    the Ray cluster can never place (each stage's `placement` check; Ray would wait for them forever)."""
    for stage in job_stages(cfg):
        if stage.placement is not None and (only is None or stage.name in only):
            stage.placement(getattr(cfg, stage.section))


def check_inputs(run: RunDir, stage: Stage) -> None:
    """Every folder the stage reads must hold a complete output."""
    for folder in stage.reads:
        if completed(run, folder) is None:
            raise RuntimeError(f"{run.url(folder)}: stage {stage.name} reads it, but it has no complete output; run the stage that writes it first")


def run_pipeline(cfg: RunConfig, only: list[str] | None = None, force: bool = False, run: RunDir | None = None,
                 write_summary: bool = True, bodies: dict[str, Callable[[RunDir], StageResult]] | None = None) -> dict:
    """Run the stages (all, or only those named, whose upstream output must then be complete).

    `run` overrides the run directory built from cfg.run_dir (an experiment passes a cell that
    inherits the upstream folders of a base run). Returns the summary, written to <run>/summary.json
    and report.md unless `write_summary` is False (an experiment preparing its shared base run
    leaves that run's own summary alone). `bodies` replaces a stage's body by one that writes the
    same output another way, under the same fingerprint (an experiment's second split takes its
    features from the first split's run: rsdist/features/resplit.py).
    """
    from rsdist.core.raycluster import check_job_run_dir, in_job_working_dir, init_ray
    from rsdist.report import build_summary, write_report

    for name in [*(only or []), *(bodies or {})]:
        if name not in STAGE_NAMES:
            raise ValueError(f"stage: {name!r} is not one of: {', '.join(STAGE_NAMES)}")
    check_job_run_dir(cfg.run_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=in_job_working_dir(cfg.data.source), images=in_job_working_dir(cfg.data.images)))
    run = run or RunDir(cfg.run_dir)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.demand_timeout_s, cfg.ray.autoscaler_config)
    check_resources(cfg, only)
    data = resolve_data(run, cfg.data)
    run.write_json({"rsdist": rsdist.__version__, **config_to_dict(cfg)}, "config.json")
    stages = job_stages(cfg)
    records: dict[str, dict] = {}
    upstream = rsdist.__version__
    started = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        settings = stage_settings(stage, cfg, data)
        fp = fingerprint(stage.name, settings, upstream)
        if only is not None and stage.name not in only:
            done = completed(run, stage.folder)
            if done is None:
                if any(STAGE_NAMES.index(o) > STAGE_NAMES.index(stage.name) for o in only):
                    raise RuntimeError(f"{run.url(stage.folder)}: stage {stage.name} has no complete output; run `rsdist {stage.name}` first")
                continue
            records[stage.name] = {**done, "skipped": True}
            upstream = done["fingerprint"]
            continue
        log.info("[%d/%d] %s", i, len(stages), stage.name)
        check_inputs(run, stage)
        body = (bodies or {}).get(stage.name) or (lambda run, stage=stage, settings=settings: stage.run(run, settings))
        resources = dataclasses.asdict(stage.resources(settings))
        log.info("stage %s: each worker asks for %s", stage.name, resources)
        records[stage.name] = {**run_stage(run, stage.folder, fp, lambda body=body: body(run), force=force, resumable=stage.resumable), "resources": resources}
        upstream = fp
    summary = build_summary(run, cfg, records, wall_seconds=time.perf_counter() - started)
    if not write_summary:
        return summary
    run.write_json(summary, "summary.json")
    write_report(run, summary)
    log.info("summary: %s", run.url("summary.json"))
    return summary
