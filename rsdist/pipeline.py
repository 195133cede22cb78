"""The job: the stages' declared contracts (rsdist.stage.Stage) in flow order, ingest -> features ->
cluster -> select -> train -> eval -> report.

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


def resolve_data(run: RunDir, data: DataConfig) -> DataConfig:
    """Point 'synthetic' at a generated copy of the demo set inside the run directory."""
    if data.source != "synthetic":
        return data
    from rsdist import synthetic

    if not run.exists(SYNTHETIC_FOLDER, "captions", "train_caps.txt"):
        log.info("generating the SYNTHETIC demo dataset (%d scenes per class)", data.synthetic_per_class)
        tmp = run.url(SYNTHETIC_FOLDER + ".partial")
        run.remove(SYNTHETIC_FOLDER + ".partial")
        synthetic.generate(tmp, per_class=data.synthetic_per_class)
        run.fs.mv(run.path(SYNTHETIC_FOLDER + ".partial"), run.path(SYNTHETIC_FOLDER), recursive=True)
    return dataclasses.replace(data, source=run.url(SYNTHETIC_FOLDER), format="captions-txt")


def job_stages() -> list[Stage]:
    """The job's stages in flow order, as each declares itself (its module's STAGE)."""
    from rsdist.cluster import stage as cluster
    from rsdist.eval import stage as evaluate
    from rsdist.features import stage as features
    from rsdist.ingest import stage as ingest
    from rsdist.select import stage as select
    from rsdist.train import stage as train

    return [ingest.STAGE, features.STAGE, cluster.STAGE, select.STAGE, train.STAGE, evaluate.STAGE]


STAGE_NAMES = ("ingest", "features", "cluster", "select", "train", "eval")


def stage_settings(stage: Stage, cfg: RunConfig, data: DataConfig):
    """The settings section a stage's output depends on (`data` with 'synthetic' resolved)."""
    return data if stage.section == "data" else getattr(cfg, stage.section)


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
    from rsdist.core.raycluster import init_ray
    from rsdist.report import build_summary, write_report

    for name in [*(only or []), *(bodies or {})]:
        if name not in STAGE_NAMES:
            raise ValueError(f"stage: {name!r} is not one of: {', '.join(STAGE_NAMES)}")
    run = run or RunDir(cfg.run_dir)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    data = resolve_data(run, cfg.data)
    run.write_json({"rsdist": rsdist.__version__, **config_to_dict(cfg)}, "config.json")
    stages = job_stages()
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
