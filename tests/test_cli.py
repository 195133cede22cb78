import subprocess
import sys

import pytest

from rsdist.cli import build_config, main


def test_set_overrides_and_flags_are_validated():
    cfg = build_config(None, {"select.budget": 0.2, "run_dir": "/tmp/r"}, ["train.epochs=3", "features.perturbations=[noise, flip]"])
    assert cfg.select.budget == 0.2 and cfg.train.epochs == 3 and cfg.features.perturbations == ["noise", "flip"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--budget", "2.5"], "select.budget: 2.5"),
        (["demo", "--method", "best"], "select.method: 'best' is not one of"),
        (["demo", "--set", "train.epochs=0"], "train.epochs: 0 must be > 0"),
        (["run", "/nonexistent/config.yaml"], "/nonexistent/config.yaml"),
        (["demo", "--vlm", "--set", "train.vlm.model=gpt-tiny"], "train.vlm.model: 'gpt-tiny' is not one of"),
        (["vlm", "train", "--set", "eval.vlm.tasks=[ocr]"], "eval.vlm.tasks: 'ocr' is not one of: scene, vqa, caption"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsdist: error:") and message in err and "\n" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "rsdist.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("demo", "run", "ingest", "features", "cluster", "select", "train", "eval", "bench"):
        assert cmd in out


def test_demo_vlm_is_the_one_job_with_a_tiny_vlm_on_a_synthetic_instruction_set():
    from rsdist.cli import demo_config, make_parser

    cfg = demo_config(make_parser().parse_args(["demo", "--vlm", "--set", "train.vlm.epochs=2"]))
    assert cfg.train.model == "vlm" and cfg.train.vlm.model == "qwen2-vl-tiny" and cfg.train.vlm.epochs == 2
    assert cfg.data.source == "synthetic-vlm" and cfg.run_dir == "runs/demo-vlm" and cfg.select.method == "alignment-mmd"
    assert demo_config(make_parser().parse_args(["demo"])).train.model == "dual"
