"""`rsdist bench select`: seconds per method against random in the same run, leverage and greedy MMD checks."""

from __future__ import annotations

from rsdist.bench.select import bench, mmd_check


def test_bench_times_methods_against_random_and_checks_leverage(ray_session, tmp_path):
    fig = bench(["--rows", "900", "--dim", "8", "--clusters", "3", "--methods", "coincide", "--mmd-rows", "0", "--out", str(tmp_path)])
    budget = round(900 / 3)
    assert fig["random_selected"] == budget and fig["coincide_selected"] == budget
    assert fig["coincide_over_random"] == round(fig["coincide_s"] / fig["random_s"], 2)
    assert fig["leverage_max_abs_diff"] < 1e-8
    assert "mmd_whole_s" not in fig


def test_mmd_check_blocked_pick_is_close_to_whole_and_far_better_than_random():
    fig = mmd_check(1200, 16, 0.2, 300, seed=1)
    assert fig["mmd_picks"] == 240 and fig["mmd_block_rows"] == 300
    assert fig["mmd_whole_kernel_mb"] == round(1200**2 * 8 / 2**20, 1)
    assert fig["mmd_blocked_kernel_mb"] == round(300**2 * 8 / 2**20, 1)
    assert fig["mmd2_whole"] <= fig["mmd2_blocked"] < fig["mmd2_random"] / 2
