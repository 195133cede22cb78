"""The stage contract, and what every stage shares: resources, a result record, skip-when-complete.

A stage is a module that declares itself once as `STAGE = Stage(...)`: its name, the one folder of
the run directory it owns (nothing else writes or clears it), the folders it reads, the section of
the settings tree it takes, what one of its workers asks Ray for, and its `run(run, settings)`.
`rsdist.pipeline` builds the job from these declarations: it checks that what a stage reads is
complete, records the stage's resources, and calls `run_stage`. When the stage's folder holds a
`_SUCCESS.json` whose fingerprint matches (same settings, same upstream outputs), the stage is
skipped, so a killed job resumes where it stopped. Otherwise the folder is cleared (kept, for a
resumable stage interrupted with the same fingerprint), the stage runs, and the marker is written
last. A stage learns what an earlier one decided (the encoder, dimensions) from the run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rsdist.core.rundir import RunDir

log = logging.getLogger("rsdist")

MARKER = "_SUCCESS.json"
STARTED = "_STARTED.json"
# Part of every fingerprint: a release that changes what a stage writes for the same settings bumps
# it, and run directories made before re-run each stage once.
CONTRACT_VERSION = 2


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks Ray for. Fractional CPUs keep reads flowing on small hosts."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: float = 0.0  # bytes reserved with Ray's 'memory' resource; 0 = none

    def bundle(self) -> dict[str, float]:
        """As a Ray resource bundle (the resources asked for only)."""
        out = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory}
        return {k: float(v) for k, v in out.items() if v > 0}


@dataclass
class StageResult:
    """What a stage reports: rows it consumed and produced, and anything else worth a summary."""

    rows_in: int
    rows_out: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage of the job, declared once in its module as `STAGE`; the pipeline reads nothing else."""

    name: str  # the stage's name on the command line and in summary.json
    folder: str  # the one run-directory folder it owns: it writes only there, and only it clears it
    reads: tuple[str, ...]  # the folders of earlier stages it reads (each must hold a complete output)
    section: str  # the section of the settings tree (RunConfig attribute) its output depends on
    resources: Callable[[Any], Resources]  # settings -> what one worker (task, actor, Train worker) asks for
    run: Callable[[RunDir, Any], StageResult]  # (run directory, settings) -> counts; writes `folder`
    resumable: bool = False  # keeps the partial output of an interrupted run with the same fingerprint
    placement: Callable[[Any], None] | None = None  # settings -> DemandError naming a request of workers the Ray cluster can never place (raycluster.check_demand)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _settings(x: Any) -> Any:
    """A dataclass as the fields that differ from their defaults (nested dataclasses likewise)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {}
        for f in dataclasses.fields(x):
            value = getattr(x, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = _settings(value)
                if value:
                    out[f.name] = value
            elif value != _default(f):
                out[f.name] = value
        return out
    return x


def fingerprint(*parts: Any) -> str:
    """A short hash of settings and upstream fingerprints; equal inputs give equal fingerprints.

    Dataclass settings count by their non-default fields, so a release that adds a setting (at a
    default that keeps the old behaviour) does not invalidate finished stages of existing runs; a
    release that changes a default, or what a stage writes, bumps CONTRACT_VERSION.
    """
    blob = json.dumps([CONTRACT_VERSION, *(_settings(p) for p in parts)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def completed(run: RunDir, name: str, fp: str | None = None) -> dict | None:
    """The stage's marker when its output is complete (and matches `fp` if given), else None."""
    if not run.exists(name, MARKER):
        return None
    record = run.read_json(name, MARKER)
    if fp is not None and record.get("fingerprint") != fp:
        return None
    return record


def run_stage(run: RunDir, name: str, fp: str, body: Callable[[], StageResult], force: bool = False, resumable: bool = False) -> dict:
    """Run `body` as stage `name` unless its complete output for fingerprint `fp` is already there.

    A `resumable` stage keeps the partial output of an interrupted run with the same fingerprint
    (it must itself skip the parts already written); any other stage starts from an empty folder.
    """
    done = None if force else completed(run, name, fp)
    if done is not None:
        log.info("stage %s: complete for these inputs, skipped (%d rows)", name, done["rows_out"])
        return {**done, "skipped": True}
    started = run.read_json(name, STARTED) if run.exists(name, STARTED) else {}
    if force or not resumable or started.get("fingerprint") != fp:
        run.remove(name)
    run.makedirs(name)
    run.write_json({"stage": name, "fingerprint": fp}, name, STARTED)
    log.info("stage %s: running", name)
    start = time.perf_counter()
    result = body()
    record = {
        "stage": name,
        "fingerprint": fp,
        "rows_in": int(result.rows_in),
        "rows_out": int(result.rows_out),
        "seconds": round(time.perf_counter() - start, 3),
        **result.extra,
    }
    run.write_json(record, name, MARKER)
    log.info("stage %s: %d rows in, %d out, %.1fs", name, record["rows_in"], record["rows_out"], record["seconds"])
    return {**record, "skipped": False}
