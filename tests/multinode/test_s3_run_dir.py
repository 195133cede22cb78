"""Run directories on S3: an S3-compatible server (moto's standalone server) on 127.0.0.1, the
demo (the whole job) with `--out s3://...`, killed and resumed; writes that fail leave no object."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.multinode.nodes import REPO, free_port

moto_server = pytest.importorskip("moto.server", reason="rsdist[cluster] and moto[server] (make test installs them)")


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def test_a_failed_write_leaves_no_object(s3_env):
    from rsdist.core.rundir import RunDir

    run = RunDir("s3://rsdist-writes/run")
    run.write_json({"ok": 1}, "stage", "_SUCCESS.json")
    assert run.read_json("stage", "_SUCCESS.json") == {"ok": 1}

    def half_then_fail(f):
        f.write(b"x" * (6 << 20))  # more than one multipart part is uploaded before the failure
        raise OSError("disk gone")

    with pytest.raises(OSError):
        run._write(run.path("stage", "part-0.parquet"), half_then_fail)
    assert not s3().exists("rsdist-writes/run/stage/part-0.parquet")
    assert [p for p in s3().ls("rsdist-writes/run/stage") if ".tmp-" in p] == []


SETTINGS = {
    "data": {"synthetic_per_class": 6, "test_fraction": 0.2},
    "features": {"encoder": "tiny", "image_size": 32, "batch_size": 16},
    "cluster": {"k": 4, "max_iter": 20},
    "train": {"num_workers": 2, "epochs": 2, "batch_size": 8, "embed_dim": 16},
    "ray": {"num_cpus": 2},
}


def demo_args(run: str) -> list[str]:
    """`rsdist demo --out RUN` with the small settings above (the demo's data: the synthetic set)."""
    sets = [f"{section}.{k}={v}" for section, fields in SETTINGS.items() for k, v in fields.items()]
    return ["demo", "--out", run, "--method", "shift", "--budget", "0.34", *[a for s in sets for a in ("--set", s)]]


def rsdist(args: list[str], env: dict) -> subprocess.Popen:
    full = {**os.environ, **env, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}
    full.pop("RAY_ADDRESS")
    return subprocess.Popen([sys.executable, "-m", "rsdist.cli", *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_demo_on_s3_killed_and_resumed(s3_env):
    """`rsdist demo --out s3://...` on a fresh run directory (its demo set generated there and
    committed by a marker: a folder rename once failed with `The specified key does not exist.`
    and left synthetic_source and synthetic_source.partial behind), SIGKILLed with its local Ray
    right after features, then run again: ingest and features skipped, the rest completes."""
    run = "s3://rsdist-runs/run"
    fs = s3()
    first = rsdist(demo_args(run), s3_env)
    deadline = time.monotonic() + 900
    while not fs.exists("rsdist-runs/run/features/_SUCCESS.json") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        fs.invalidate_cache()
    assert first.poll() is None, first.stdout.read()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the job dies with its local Ray, right after features
    first.wait()
    second = rsdist(demo_args(run), s3_env)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    assert "stage shards: complete for these inputs, skipped" in out
    assert "stage features: complete for these inputs, skipped" in out
    fs.invalidate_cache()
    for stage in ("synthetic_source", "shards", "features", "clusters", "selection", "checkpoints", "eval"):
        assert fs.exists(f"rsdist-runs/run/{stage}/_SUCCESS.json"), stage
    assert fs.exists("rsdist-runs/run/checkpoints/final/heads.safetensors")
    assert not [p for p in fs.find("rsdist-runs/run") if "/.tmp-" in p or ".partial" in p]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("rsdist-runs")) == ["run"]  # no synthetic_source* beside the run directory
    import json

    summary = json.loads(fs.cat("rsdist-runs/run/summary.json"))
    assert summary["stages"]["features"]["rows_out"] == summary["stages"]["shards"]["rows_out"] if "shards" in summary["stages"] else True
    assert summary["metrics"]["mR"] >= 0
