"""`rsdist bench scale`: generate, cluster and select on workers, with per-stage time and memory."""

from __future__ import annotations

import json
import os

from rsdist.bench.scale import bench


def test_bench_scale_reports_every_stage_and_the_memory_of_driver_and_workers(ray_session, tmp_path):
    fig = bench(["--rows", "2000", "--dim", "8", "--k", "4", "--methods", "alignment-mmd", "--shard-rows", "1000", "--out", str(tmp_path / "run")])
    assert fig["k"] == 4 and fig["select:alignment-mmd:selected"] == 667
    for stage in ("generate", "cluster", "select:alignment-mmd"):
        assert fig[f"{stage}:seconds"] > 0 and fig[f"{stage}:rows_per_s"] > 0
        assert fig[f"{stage}:driver_rss_mb"] > 0
    assert fig["worker_peak_rss_mb"] > 0 and fig["driver_peak_rss_mb"] >= fig["select:alignment-mmd:driver_rss_mb"] * 0.9
    assert set(fig["select:alignment-mmd:phases"]) >= {"move_seconds", "statistics_seconds", "decide_seconds", "manifest_seconds"}
    assert fig["cluster:init"] == "k-means++" and fig["cluster:inertia"] > 0 and fig["cluster:init_seconds"] >= 0


def test_bench_scale_measures_a_baseline_pool_in_the_same_run(ray_session, tmp_path):
    fig = bench(["--rows", "2000", "--dim", "8", "--k", "4", "--methods", "alignment-mmd", "--shard-rows", "1000", "--baseline-rows", "1000", "--out", str(tmp_path / "run")])
    assert fig["baseline:rows"] == 1000 and fig["baseline:select_path"] == "inprocess" and fig["select_path"] == "distributed"
    assert fig["baseline:select:alignment-mmd:selected"] == 333 and fig["select:alignment-mmd:selected"] == 667
    for stage in ("generate", "cluster", "select:alignment-mmd", "total"):
        assert fig[f"{stage}:per_row_vs_baseline"] > 0
    per_row = (fig["select:alignment-mmd:seconds"] / 2000) / (fig["baseline:select:alignment-mmd:seconds"] / 1000)
    assert abs(fig["select:alignment-mmd:per_row_vs_baseline"] - per_row) < 0.01


def test_bench_scale_compares_each_select_phase_with_a_distributed_baseline(ray_session, tmp_path):
    fig = bench(["--rows", "2000", "--dim", "8", "--k", "4", "--methods", "alignment-mmd", "--shard-rows", "1000", "--mmd-block-rows", "64", "--baseline-rows", "1000", "--baseline-select", "distributed", "--out", str(tmp_path / "run")])
    assert fig["baseline:select_path"] == "distributed"
    for phase in ("move", "statistics", "decide", "manifest"):
        assert fig[f"select:alignment-mmd:{phase}:per_row_vs_baseline"] > 0
    with open(os.path.join(fig["run_dir"], "selection", "selection.json")) as f:
        assert json.load(f)["settings"]["mmd_block_rows"] == 64
