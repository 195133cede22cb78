"""The whole job on a tiny synthetic set with the tiny encoder: contracts between stages, resume."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def resumed_job(ray_session, tmp_path_factory):
    """The whole job on the tiny settings, killed once its features stage is committed and run again
    to the end: one run of every stage that the resume test, the counts test and the changed-setting
    test all read (what they read is taken here, before the changed-setting test reruns select)."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    run_uri = str(tmp_path / "run")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_settings(run_uri)))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "rsdist.cli", "-q", "run", str(cfg_path)], env=env, start_new_session=True)
    marker = tmp_path / "run" / "features" / "_SUCCESS.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed_after_features = marker.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_after_features, "the job did not get through the features stage"
    features_mtime = marker.stat().st_mtime
    summary = run_pipeline(config_from_dict(tiny_settings(run_uri)))
    run = RunDir(run_uri)
    return SimpleNamespace(
        uri=run_uri, summary=summary, features_mtime=features_mtime, features_mtime_after=marker.stat().st_mtime,
        wrote_report=run.exists("report.md") and run.exists("summary.json"),
        manifest=run.read_table("selection", "manifest.parquet").to_pandas(),
        features=run.read_table("features", columns=["sample_id", "split"]).to_pandas(),
    )


def test_whole_pipeline_counts_add_up(resumed_job):
    summary = resumed_job.summary
    st = summary["stages"]
    assert list(st) == ["ingest", "features", "cluster", "select", "train", "eval"]
    run = RunDir(resumed_job.uri)
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
    assert resumed_job.wrote_report
    # test rows are never selected
    manifest, feats = resumed_job.manifest, resumed_job.features
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


def test_run_killed_after_features_resumes_without_redoing_it(resumed_job):
    summary = resumed_job.summary
    assert summary["stages"]["ingest"]["skipped"] and summary["stages"]["features"]["skipped"]
    assert resumed_job.features_mtime_after == resumed_job.features_mtime
    assert not summary["stages"]["eval"]["skipped"]
    assert "mR" in summary["metrics"]


def test_changed_selection_setting_reruns_from_select_only(resumed_job):
    settings = tiny_settings(resumed_job.uri)  # the settings the shared run was made with, then another method
    settings["select"]["method"] = "random"
    summary = run_pipeline(config_from_dict(settings), only=["ingest", "features", "cluster", "select"])
    st = summary["stages"]
    assert st["ingest"]["skipped"] and st["features"]["skipped"] and st["cluster"]["skipped"]
    assert not st["select"]["skipped"] and summary["selection"]["method"] == "random"


def test_vlm_demo_runs_the_whole_job_and_a_second_run_skips_every_stage(ray_session, tmp_path, capsys):
    """`rsdist demo --vlm` (a smaller synthetic instruction set): scene folders, RSVQA-style
    questions and captions ingested as one pool -> features -> clusters -> selection -> instruction
    LoRA of a tiny Qwen2-VL on Ray Train -> evaluation by generation of the tuned and the untuned
    model -> summary and report; the same command again skips every stage."""
    import json

    from rsdist.cli import main

    out = tmp_path / "demo-vlm"
    argv = ["-q", "demo", "--vlm", "--out", str(out), "--set", "data.synthetic_per_class=2", "--set", "data.test_fraction=0.25",
            "--set", "features.encoder=tiny", "--set", "features.image_size=32", "--set", "features.perturbations=[noise]",
            "--set", "cluster.k=3", "--set", "train.vlm.epochs=1", "--set", "eval.vlm.max_rows=3"]
    assert main(argv) == 0
    run = RunDir(str(out))
    first = run.read_json("summary.json")
    assert sorted(first["stages"]) == ["cluster", "eval", "features", "ingest", "select", "train"]
    assert not any(s["skipped"] for s in first["stages"].values())
    ingest = run.read_json("shards", "ingest_report.json")
    assert ingest["format"] == "scene-folders" and [s["format"] for s in ingest["sources"]] == ["rsvqa", "captions-txt"]
    tasks = set(run.read_table("shards", "part-00000.parquet", columns=["task"]).column("task").to_pylist())
    assert {"classification", "vqa", "caption"} <= tasks
    assert first["tuned_model"] == "qwen2-vl-tiny" and first["stages"]["train"]["rows_in"] <= first["selection"]["selected"]
    assert run.exists("vlm_checkpoints", "final", "adapter", "adapter_model.safetensors")
    assert not run.exists("checkpoints") and not run.exists("eval")  # the dual encoder's folders are not the VLM's
    evaluated = run.read_json("vlm_eval", "metrics.json")
    assert sorted(evaluated["tuned"]) == sorted(evaluated["untuned"]) == ["caption", "scene", "vqa"]
    metrics = first["metrics"]
    for key in ("scene_accuracy", "vqa_accuracy", "caption_bleu4"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics["untuned_" + key] <= 1
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "Evaluation by generation" in report and "| VQA accuracy |" in report and "report/vlm_training.png" in report
    assert run.exists("report", "vlm_training.png")
    capsys.readouterr()

    assert main(argv) == 0
    second = run.read_json("summary.json")
    assert all(s["skipped"] for s in second["stages"].values())
    assert second["metrics"] == metrics
    assert json.loads(capsys.readouterr().out.splitlines()[0])["metrics"] == metrics
