"""A killed ingest resumes to the same result; the Ray Data path equals the in-process one."""

from __future__ import annotations

import os

import pytest

from rsdist.config import DataConfig
from rsdist.ingest import stage as ingest
from rsdist.core.rundir import RunDir
from rsdist.stage import fingerprint, run_stage
from tests.conftest import SHARED_DATA
from tests.ingest.conftest import write_captions_txt


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the stage can swallow it."""


def _stage(run: RunDir, data: DataConfig) -> dict:
    return run_stage(run, "shards", fingerprint(data), lambda: ingest.run(run, data), resumable=True)


def _snapshot(run: RunDir):
    rows = run.read_table("shards", columns=["sample_id", "split", "meta"]).to_pylist()
    quarantine = sorted(tuple(q.values()) for q in run.read_table("shards", "quarantine").to_pylist())
    report = run.read_json("shards", "ingest_report.json")
    return rows, quarantine, report


def test_killed_ingest_resumes_without_duplicates(tmp_path, monkeypatch):
    source = str(tmp_path / "ds")
    write_captions_txt(source, n_per_class=6, classes=("Forest", "Harbor", "Desert"), broken=True)
    data = DataConfig(source=source, engine="local", shard_rows=3)

    clean = RunDir(str(tmp_path / "clean"))
    _stage(clean, data)

    run = RunDir(str(tmp_path / "killed"))
    original = RunDir.write_json
    marker_writes = []

    def write_json_then_die(self, obj, *parts):
        if "_chunks" in parts and parts[-1].startswith("part-"):
            marker_writes.append(obj["chunk"])
            if len(marker_writes) == 3:  # shard 2 is on disk, its marker never lands
                raise Killed()
        return original(self, obj, *parts)

    monkeypatch.setattr(RunDir, "write_json", write_json_then_die)
    with pytest.raises(Killed):
        _stage(run, data)
    monkeypatch.setattr(RunDir, "write_json", original)
    assert len(run.parquet_files("shards")) == 3 and not run.exists("shards", "_SUCCESS.json")

    record = _stage(run, data)
    assert record["skipped"] is False
    assert _snapshot(run) == _snapshot(clean)
    assert record["rows_in"] == 24 and record["rows_out"] == 18
    assert _stage(run, data)["skipped"] is True


def test_ray_data_path_matches_local(tmp_path, ray_session):
    source = str(tmp_path / "ds")
    write_captions_txt(source, n_per_class=20, classes=("Forest", "Harbor"), broken=True)
    local = RunDir(str(tmp_path / "local"))
    viaray = RunDir(str(tmp_path / "ray"))
    ingest.run(local, DataConfig(source=source, engine="local", shard_rows=16))
    ingest.run(viaray, DataConfig(source=source, engine="ray", shard_rows=16))
    assert _snapshot(viaray) == _snapshot(local)
    assert [os.path.basename(f) for f in viaray.parquet_files("shards")] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


RSICD = os.path.join(SHARED_DATA, "rsicd-aid")


@pytest.mark.skipif(not os.path.isdir(RSICD), reason=f"real data not present at {RSICD}")
def test_rsicd_aid_ingests_completely(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    data = DataConfig(source=RSICD, engine="local", shard_rows=2048)
    record = _stage(run, data)
    assert record["format"] == "captions-txt" and record["rows_in"] == record["rows_out"] == 6006
    assert record["quarantined"] == 0 and record["splits"]["train"] + record["splits"]["test"] == 6006
    first = next(run.iter_batches("shards", batch_size=5)).to_pylist()
    assert {r["width"] for r in first} == {150} and {r["image_format"] for r in first} == {"jpeg"}
    assert first[0]["label"] == "Airport" and len(first[0]["captions"]) == 5
    labels = {x for b in run.iter_batches("shards", columns=["label"]) for x in b.column("label").to_pylist()}
    assert len(labels) == 30
