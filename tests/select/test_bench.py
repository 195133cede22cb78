"""`rsdist bench select`: seconds per method against random in the same run, blocked greedy MMD, leverage check."""

from __future__ import annotations

from rsdist.select.bench import bench


def test_bench_times_coincide_whole_and_blocked_against_random(ray_session, tmp_path):
    fig = bench(["--rows", "900", "--dim", "8", "--clusters", "3", "--methods", "coincide", "--mmd-block-rows", "64", "--out", str(tmp_path)])
    budget = round(900 / 3)
    assert fig["random_selected"] == budget and fig["coincide_selected"] == budget
    assert fig["coincide_blocked_s"] > 0
    assert fig["coincide_blocked_over_whole"] == round(fig["coincide_blocked_s"] / fig["coincide_s"], 3)
    assert fig["coincide_over_random"] == round(fig["coincide_s"] / fig["random_s"], 2)
    assert fig["leverage_max_abs_diff"] < 1e-8
