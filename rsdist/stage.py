"""What every stage shares: declared resources, a result record, and skip-when-complete.

A stage is a module with a `run(run: RunDir, cfg) -> StageResult` function that reads the previous
stage's output from the run directory and writes its own folder. `run_stage` wraps it: when the
folder holds a `_SUCCESS.json` whose fingerprint matches (same settings, same upstream outputs),
the stage is skipped, so a killed job resumes where it stopped. Otherwise the folder is cleared,
the stage runs, and the marker is written last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rsdist.io.rundir import RunDir

log = logging.getLogger("rsdist")

MARKER = "_SUCCESS.json"
STARTED = "_STARTED.json"


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


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# Defaults that a release changed, as they were before: (dataclass name, field) -> old default.
# A fingerprint counts a field that differs from this value, so a run directory made before the
# change (where the old default was in force and so left out of the fingerprint) is not taken for
# one made with the new default, and a setting that names the old value explicitly still matches it.
FINGERPRINT_DEFAULTS: dict[tuple[str, str], Any] = {
    ("SelectConfig", "method"): "shift",  # then "cluster-random", "coincide-within", now "alignment-mmd" (docs/results.md)
}
# Not listed: SelectConfig.mmd_block_rows arrived with default 4096, which picks exactly as before
# (whole clusters) for clusters of up to 4,096 rows; a run made before it with larger clusters
# keeps its whole-cluster greedy MMD selection, which is the exact version of the blocked one.


def _fingerprint_default(x: Any, f: dataclasses.Field) -> Any:
    return FINGERPRINT_DEFAULTS.get((type(x).__name__, f.name), _default(f))


def _settings(x: Any) -> Any:
    """A dataclass as the fields that differ from their defaults (nested dataclasses likewise);
    for a default a release changed, from the old default (FINGERPRINT_DEFAULTS)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {}
        for f in dataclasses.fields(x):
            value = getattr(x, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = _settings(value)
                if value:
                    out[f.name] = value
            elif value != _fingerprint_default(x, f):
                out[f.name] = value
        return out
    return x


def fingerprint(*parts: Any) -> str:
    """A short hash of settings and upstream fingerprints; equal inputs give equal fingerprints.

    Dataclass settings count by their non-default fields, so a release that adds a setting (at a
    default that keeps the old behaviour) does not invalidate finished stages of existing runs; a
    release that changes a default records the old one in FINGERPRINT_DEFAULTS.
    """
    blob = json.dumps([_settings(p) for p in parts], sort_keys=True, default=str)
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
