"""The cluster entry script and the example configs stay runnable."""

import glob
import os
import subprocess
import sys

import pytest

from rsdist.config import load_config
from rsdist.experiment import load_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))))
def test_example_configs_are_valid(path):
    if "experiment" in os.path.basename(path):
        cfg, exp = load_experiment(path)
        assert exp.methods and exp.budgets
    else:
        cfg = load_config(path)
    assert cfg.run_dir


def test_entry_script_runs_from_any_working_directory(tmp_path):
    """`ray job submit --working-dir .` runs the script with the repo as cwd; it must find rsdist itself."""
    script = os.path.abspath(os.path.join(ROOT, "jobs", "select_and_tune.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "config" in out.stdout and "--out" in out.stdout
    bad = subprocess.run([sys.executable, script, str(tmp_path / "missing.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
