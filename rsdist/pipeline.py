"""Wires the stages from a config: ingest -> features -> cluster -> select -> train -> eval -> report.

Each stage reads the previous stage's output from the run directory and writes its own folder.
A stage's fingerprint hashes its own settings and the fingerprint of the stage before it, so
changing a setting re-runs that stage and everything after it, and nothing before it. A killed
job, run again, skips every stage whose output is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import rsdist
from rsdist.config import DataConfig, RunConfig, config_to_dict
from rsdist.io.rundir import RunDir
from rsdist.stage import StageResult, completed, fingerprint, run_stage

log = logging.getLogger("rsdist")

SYNTHETIC_FOLDER = "synthetic_source"


@dataclass(frozen=True)
class StageSpec:
    """One step of the pipeline: its name, its output folder, what its output depends on, its body."""

    name: str
    folder: str
    settings: object
    body: Callable[[RunDir], StageResult]
    resumable: bool = False


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


def stage_specs(cfg: RunConfig, data: DataConfig) -> list[StageSpec]:
    """The pipeline's stages in order, with the settings each one's output depends on."""
    from rsdist.cluster import stage as cluster
    from rsdist.eval import stage as evaluate
    from rsdist.features import stage as features
    from rsdist.io import ingest
    from rsdist.select import stage as select
    from rsdist.train import stage as train

    encoder = cfg.features.encoder
    return [
        StageSpec("ingest", "shards", data, lambda run: ingest.run(run, data), resumable=True),
        StageSpec("features", "features", cfg.features, lambda run: features.run(run, cfg.features), resumable=True),
        StageSpec("cluster", "clusters", cfg.cluster, lambda run: cluster.run(run, cfg.cluster), resumable=True),
        StageSpec("select", "selection", cfg.select, lambda run: select.run(run, cfg.select)),
        StageSpec("train", "checkpoints", cfg.train, lambda run: train.run(run, cfg.train, encoder), resumable=True),
        StageSpec("eval", "eval", cfg.eval, lambda run: evaluate.run(run, cfg.eval, encoder)),
    ]


STAGE_NAMES = ("ingest", "features", "cluster", "select", "train", "eval")


def check_resources(cfg: RunConfig, only: list[str] | None = None) -> None:
    """Before any stage runs: refuse, naming the setting, workers or actors of the stages to run
    that the Ray cluster can never place (Ray would otherwise wait for them forever)."""
    from rsdist.cluster import stage as cluster
    from rsdist.train import stage as train

    if only is None or "cluster" in only:
        cluster.check_resources(cfg.cluster)
    if only is None or "train" in only:
        train.check_resources(cfg.train)


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
    from rsdist.raycluster import init_ray
    from rsdist.report import build_summary, write_report

    for name in [*(only or []), *(bodies or {})]:
        if name not in STAGE_NAMES:
            raise ValueError(f"stage: {name!r} is not one of: {', '.join(STAGE_NAMES)}")
    run = run or RunDir(cfg.run_dir)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    check_resources(cfg, only)
    data = resolve_data(run, cfg.data)
    run.write_json({"rsdist": rsdist.__version__, **config_to_dict(cfg)}, "config.json")
    specs = [dataclasses.replace(s, body=(bodies or {}).get(s.name, s.body)) for s in stage_specs(cfg, data)]
    records: dict[str, dict] = {}
    upstream = rsdist.__version__
    started = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        fp = fingerprint(spec.name, spec.settings, upstream)
        if only is not None and spec.name not in only:
            done = completed(run, spec.folder)
            if done is None:
                if any(STAGE_NAMES.index(o) > STAGE_NAMES.index(spec.name) for o in only):
                    raise RuntimeError(f"{run.url(spec.folder)}: stage {spec.name} has no complete output; run `rsdist {spec.name}` first")
                continue
            records[spec.name] = {**done, "skipped": True}
            upstream = done["fingerprint"]
            continue
        log.info("[%d/%d] %s", i, len(specs), spec.name)
        records[spec.name] = run_stage(run, spec.folder, fp, lambda spec=spec: spec.body(run), force=force, resumable=spec.resumable)
        upstream = fp
    summary = build_summary(run, cfg, records, wall_seconds=time.perf_counter() - started)
    if not write_summary:
        return summary
    run.write_json(summary, "summary.json")
    write_report(run, summary)
    log.info("summary: %s", run.url("summary.json"))
    return summary
