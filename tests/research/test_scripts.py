"""The analysis scripts of research/ stay runnable and the experiment configs stay valid."""

import glob
import os
import subprocess
import sys

import pytest

from rsdist.experiment import load_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPTS = os.path.join(ROOT, "research", "scripts")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "research", "configs", "*.yaml"))))
def test_experiment_configs_are_valid(path):
    cfg, exp = load_experiment(path)
    assert exp.methods and exp.budgets
    assert cfg.run_dir


def _png(pixels) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_shift_texture_correlates_shift_with_image_gradient(tmp_path):
    """Pool images from flat to noisy, with shift set to fall as texture grows: Spearman is strongly
    negative over the pool rows only (a held-out row that would break the order is left out)."""
    import json

    import numpy as np
    import pyarrow as pa

    from rsdist.core.rundir import RunDir

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    images = [np.full((48, 64), 128.0), np.full((48, 64), 30.0), 100 + 0.5 * x,  # flat, flat, gentle ramp
              128 + 60 * np.sign(np.sin(x / 6.0)), 128 + rng.normal(0, 25, (48, 64)),  # wide stripes, mild noise
              128 + 90 * np.sign(np.sin((x + y) / 2.0)), 128 + rng.normal(0, 80, (48, 64))]  # fine stripes, strong noise
    images = [np.stack([im] * 3, axis=-1) for im in images]  # texture 0, 0, 0.0005, 0.007, 0.03, 0.04, 0.1
    ids = [f"s{i}" for i in range(len(images) + 1)]
    images.append(np.full((48, 64, 3), 128.0))  # held out, flat, given the lowest shift
    shift = [1.0 - i / len(images) for i in range(len(images) - 1)] + [0.0]
    run = RunDir(str(tmp_path / "run"))
    run.write_table(pa.table({"sample_id": ids, "image": [_png(im) for im in images],
                              "split": ["train"] * (len(ids) - 1) + ["test"]}), "shards", "part-00000.parquet")
    features = {"sample_id": pa.array(ids), "split": pa.array(["train"] * (len(ids) - 1) + ["test"])}
    for name, noise in (("shift", 0.0), ("shift_noise", 0.01), ("shift_rotate", 0.02), ("shift_crop", 0.03)):
        features[name] = pa.array(np.array(shift) + noise * rng.standard_normal(len(ids)), type=pa.float32())
    # two feature files in shard order, as the features stage writes them
    table = pa.table(features)
    run.write_table(table.slice(0, 4), "features", "part-00000.parquet")
    run.write_table(table.slice(4), "features", "part-00001.parquet")

    script = os.path.abspath(os.path.join(SCRIPTS, "shift_texture.py"))
    out = subprocess.run([sys.executable, script, run.uri], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["n"] == len(ids) - 1
    assert set(figures["correlations"]) == {"shift", "shift_noise", "shift_rotate", "shift_crop"}
    assert figures["correlations"]["shift"]["spearman"] < -0.95
    assert all(f["n"] == len(ids) - 1 for f in figures["correlations"].values())
    assert "| shift | " in out.stdout

    limited = subprocess.run([sys.executable, script, run.uri, "--limit", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert limited.returncode == 0, limited.stderr
    assert json.loads(limited.stdout.strip().splitlines()[-1])["n"] == 3


def test_schedule_curve_groups_cells_by_epochs(tmp_path):
    """Cells of two experiment folders trained for different epochs are grouped by method, budget
    and epochs (from the train stage's record); mean and sd over seeds; the plot is written."""
    import json

    def cell(folder: str, name: str, epochs: int, mr: float, zs: float) -> None:
        path = tmp_path / folder / "cells" / name
        path.mkdir(parents=True)
        summary = {"metrics": {"mR": mr, "zero_shot_acc": zs}, "stages": {"train": {"epochs": epochs}}}
        (path / "summary.json").write_text(json.dumps(summary))

    cell("short", "random_b0.33_s0", 5, 25.0, 73.0)
    cell("short", "random_b0.33_s1", 5, 27.0, 75.0)
    cell("short", "full_b1_s0", 5, 28.0, 78.0)
    cell("long", "random_b0.33_s0", 10, 23.0, 70.0)
    (tmp_path / "long" / "cells" / "unfinished_b0.2_s0").mkdir()  # no summary yet: ignored
    script = os.path.join(SCRIPTS, "schedule_curve.py")
    png = tmp_path / "curve.png"
    out = subprocess.run([sys.executable, script, str(tmp_path / "short"), str(tmp_path / "long"), "--out", str(png)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    groups = {(g["method"], g["budget"], g["epochs"]): g for g in json.loads(out.stdout.strip().splitlines()[-1])["groups"]}
    assert set(groups) == {("random", 0.33, 5), ("full", 1.0, 5), ("random", 0.33, 10)}
    short = groups[("random", 0.33, 5)]
    assert short["seeds"] == 2 and short["mR_mean"] == 26.0 and abs(short["mR_sd"] - 1.414) < 1e-3 and short["zero_shot_acc_mean"] == 74.0
    assert groups[("random", 0.33, 10)]["mR_sd"] == 0.0 and png.stat().st_size > 1000
    only = subprocess.run([sys.executable, script, str(tmp_path / "short"), "--methods", "full"], capture_output=True, text=True)
    assert [g["method"] for g in json.loads(only.stdout.strip().splitlines()[-1])["groups"]] == ["full"]
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode != 0 and "nowhere" in bad.stderr


def test_seed_differences_pairs_methods_with_random_by_seed(tmp_path):
    """Cells of two results.json files are paired with random's cell of the same seed; the first
    file wins on a repeated cell; differences, random's sd and seeds above are reported."""
    import json

    def results(name: str, cells: list[tuple[str, float, int, float]]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"cells": [{"method": m, "budget": b, "seed": s, "metrics": {"mR": v}} for m, b, s, v in cells]}))
        return str(path)

    first = results("a.json", [("random", 0.2, 0, 20.0), ("random", 0.2, 1, 22.0), ("random", 0.2, 2, 21.0), ("mmd", 0.2, 0, 23.0), ("mmd", 0.2, 1, 23.0), ("random", 0.33, 0, 30.0)])
    second = results("b.json", [("mmd", 0.2, 0, 99.0), ("mmd", 0.2, 2, 20.5), ("alone", 0.2, 0, 25.0)])
    script = os.path.join(SCRIPTS, "seed_differences.py")
    png = tmp_path / "seeds.png"
    out = subprocess.run([sys.executable, script, first, second, "--budget", "0.2", "--out", str(png)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(fig) == {"mmd"}  # "alone" shares one seed with random: no sd, left out
    mmd = fig["mmd"]
    assert mmd["seeds"] == [0, 1, 2] and mmd["differences"] == [3.0, 1.0, -0.5]  # seed 0 from the first file
    assert abs(mmd["mean"] - 3.5 / 3) < 1e-9 and mmd["random_sd"] == 1.0 and mmd["seeds_above"] == 2
    assert png.stat().st_size > 1000
    some = subprocess.run([sys.executable, script, first, second, "--budget", "0.2", "--seeds", "1-2"], capture_output=True, text=True)
    assert json.loads(some.stdout.strip().splitlines()[-1])["mmd"]["seeds"] == [1, 2]
    none = subprocess.run([sys.executable, script, second, "--budget", "0.2"], capture_output=True, text=True)
    assert none.returncode != 0 and "no random cells" in none.stderr
    # two development splits: pairs by (split, seed), never across splits
    split = results("c.json", [])
    cells = [("random", 0.0, 0, 20.0), ("random", 0.0, 1, 22.0), ("random", 0.5, 0, 10.0), ("random", 0.5, 1, 14.0),
             ("mmd", 0.0, 0, 21.0), ("mmd", 0.0, 1, 23.0), ("mmd", 0.5, 0, 12.0), ("mmd", 0.5, 1, 13.0)]
    (tmp_path / "c.json").write_text(json.dumps({"cells": [{"method": m, "budget": 0.2, "seed": s, "test_offset": o, "metrics": {"mR": v}} for m, o, s, v in cells]}))
    two = subprocess.run([sys.executable, script, split, "--budget", "0.2", "--out", str(tmp_path / "two.png")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    mmd = json.loads(two.stdout.strip().splitlines()[-1])["mmd"]
    assert mmd["test_offsets"] == [0.0, 0.0, 0.5, 0.5] and mmd["seeds"] == [0, 1, 0, 1] and mmd["differences"] == [1.0, 1.0, 2.0, -1.0]
    assert abs(mmd["random_sd"] - 5 ** 0.5) < 1e-9  # pooled within splits
    assert (tmp_path / "two.png").stat().st_size > 1000
    # --pools: a second file reusing split 0.0 is its own held-out set (keyed 10 + 0.0), not a repeat
    (tmp_path / "d.json").write_text(json.dumps({"cells": [{"method": m, "budget": 0.2, "seed": s, "test_offset": 0.0, "metrics": {"mR": v}} for m, s, v in [("random", 0, 30.0), ("random", 1, 31.0), ("mmd", 0, 33.0), ("mmd", 1, 31.0)]]}))
    merged = subprocess.run([sys.executable, script, split, str(tmp_path / "d.json"), "--budget", "0.2"], capture_output=True, text=True)
    assert json.loads(merged.stdout.strip().splitlines()[-1])["mmd"]["differences"] == [1.0, 1.0, 2.0, -1.0]  # the first file wins
    pooled = subprocess.run([sys.executable, script, split, str(tmp_path / "d.json"), "--budget", "0.2", "--pools"], capture_output=True, text=True)
    assert pooled.returncode == 0, pooled.stderr
    mmd = json.loads(pooled.stdout.strip().splitlines()[-1])["mmd"]
    assert mmd["test_offsets"] == [0.0, 0.0, 0.5, 0.5, 10.0, 10.0] and mmd["differences"] == [1.0, 1.0, 2.0, -1.0, 3.0, 0.0]
    assert abs(mmd["random_sd"] - ((2 + 8 + 0.5) / 3) ** 0.5) < 1e-9  # pooled within the three held-out sets
    # one pool's cells in two files (a method's new cells, and the random cells they pair with): joined by a comma
    (tmp_path / "e.json").write_text(json.dumps({"cells": [{"method": "mmd", "budget": 0.2, "seed": s, "test_offset": 0.0, "metrics": {"mR": v}} for s, v in [(0, 33.0), (1, 31.0)]]}))
    (tmp_path / "f.json").write_text(json.dumps({"cells": [{"method": "random", "budget": 0.2, "seed": s, "test_offset": 0.0, "metrics": {"mR": v}} for s, v in [(0, 30.0), (1, 31.0)]]}))
    joined = subprocess.run([sys.executable, script, split, f"{tmp_path / 'e.json'},{tmp_path / 'f.json'}", "--budget", "0.2", "--pools"], capture_output=True, text=True)
    assert json.loads(joined.stdout.strip().splitlines()[-1])["mmd"] == mmd


def test_alignment_probes_compares_each_probe_with_the_default(run_dir):
    """On a constructed pool: the default agrees with itself exactly, and every probe's ranking
    and selections are reported as fractions."""
    import json

    from tests.select.test_stage import write_inputs

    write_inputs(run_dir)
    script = os.path.join(SCRIPTS, "alignment_probes.py")
    out = subprocess.run([sys.executable, script, run_dir.root, "--budgets", "0.25"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["pool"] == 60 and fig["image-to-text"] == {"spearman": 1.0, "overlap_0.25": 1.0}
    for name in ("text-to-image", "both", "kernel", "contrastive", "jitter"):
        assert -1.0 <= fig[name]["spearman"] <= 1.0 and 0.0 <= fig[name]["overlap_0.25"] <= 1.0
