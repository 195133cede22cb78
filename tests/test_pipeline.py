"""The whole job on a tiny synthetic set with the tiny encoder: contracts between stages, resume."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from rsdist.config import config_from_dict
from rsdist.core.rundir import RunDir
from rsdist.pipeline import run_pipeline
from rsdist.select.budget import budget_count

pytestmark = pytest.mark.slow


def tiny_settings(run_dir: str) -> dict:
    return {
        "run_dir": run_dir,
        "data": {"source": "synthetic", "synthetic_per_class": 6, "test_fraction": 0.2},
        "features": {"encoder": "tiny", "image_size": 32, "batch_size": 16},
        "cluster": {"k": 4, "max_iter": 20},
        "select": {"method": "shift", "budget": 0.34},
        "train": {"num_workers": 2, "epochs": 2, "batch_size": 8, "embed_dim": 16},
    }


def test_whole_pipeline_counts_add_up(ray_session, tmp_path):
    summary = run_pipeline(config_from_dict(tiny_settings(str(tmp_path / "run"))))
    st = summary["stages"]
    assert list(st) == ["ingest", "features", "cluster", "select", "train", "eval"]
    run = RunDir(str(tmp_path / "run"))
    images = len(run.fs.cat(run.path("synthetic_source", "captions", "train_filename.txt")).split())
    assert st["ingest"]["rows_in"] == images == st["ingest"]["rows_out"] + st["ingest"].get("quarantined", 0)
    assert st["features"]["rows_in"] == st["features"]["rows_out"] == st["ingest"]["rows_out"]
    splits = st["ingest"]["splits"]
    assert st["cluster"]["rows_out"] == splits["train"]
    pool = splits["train"]
    assert summary["selection"]["pool"] == pool
    assert summary["selection"]["selected"] == budget_count(0.34, pool) == st["train"]["rows_in"]
    metrics = summary["metrics"]
    for key in ("i2t_r1", "t2i_r10", "mR"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert run.exists("report.md") and run.exists("summary.json")
    # test rows are never selected
    manifest = run.read_table("selection", "manifest.parquet").to_pandas()
    feats = run.read_table("features", columns=["sample_id", "split"]).to_pandas()
    test_ids = set(feats.loc[feats.split == "test", "sample_id"])
    assert test_ids and not test_ids & set(manifest.sample_id)


def test_bad_rows_are_quarantined_and_counted(ray_session, tmp_path):
    from rsdist import synthetic

    src = tmp_path / "src"
    synthetic.generate(str(src), per_class=4, size=32)
    (src / "images/Forest/synthetic_forest_1.jpg").write_bytes(b"not an image")
    (src / "images/Lake/synthetic_lake_2.jpg").unlink()
    settings = tiny_settings(str(tmp_path / "run"))
    settings["data"] = {"source": str(src), "format": "captions-txt", "test_fraction": 0.2}
    cfg = config_from_dict(settings)
    summary = run_pipeline(cfg, only=["ingest"])
    ing = summary["stages"]["ingest"]
    assert ing["quarantined"] == 2
    assert set(ing["quarantined_by_reason"]) == {"unreadable-image", "missing-image"}
    assert ing["rows_in"] == ing["rows_out"] + 2
    q = RunDir(cfg.run_dir).read_table("shards", "quarantine").to_pandas()
    assert len(q) == 2 and set(q.reason) == {"unreadable-image", "missing-image"}


def test_run_killed_after_features_resumes_without_redoing_it(ray_session, tmp_path):
    run_uri = str(tmp_path / "run")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_settings(run_uri)))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "rsdist.cli", "-q", "run", str(cfg_path)], env=env, start_new_session=True)
    marker = tmp_path / "run" / "features" / "_SUCCESS.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the job did not get through the features stage"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    features_mtime = marker.stat().st_mtime
    summary = run_pipeline(config_from_dict(tiny_settings(run_uri)))
    assert summary["stages"]["ingest"]["skipped"] and summary["stages"]["features"]["skipped"]
    assert marker.stat().st_mtime == features_mtime
    assert not summary["stages"]["eval"]["skipped"]
    assert "mR" in summary["metrics"]


def test_changed_selection_setting_reruns_from_select_only(ray_session, tmp_path):
    settings = tiny_settings(str(tmp_path / "run"))
    run_pipeline(config_from_dict(settings), only=["ingest", "features", "cluster", "select"])
    settings["select"]["method"] = "random"
    summary = run_pipeline(config_from_dict(settings), only=["ingest", "features", "cluster", "select"])
    st = summary["stages"]
    assert st["ingest"]["skipped"] and st["features"]["skipped"] and st["cluster"]["skipped"]
    assert not st["select"]["skipped"] and summary["selection"]["method"] == "random"
