"""`rsdist bench kmeans` against scikit-learn: one JSON object of figures, rounds alternating sides."""

from __future__ import annotations

import pytest

from rsdist.bench.kmeans import bench, median_round


def test_stage_bench_alternates_rounds_and_reports_the_median_ratio(ray_session, tmp_path):
    fig = bench(["--rows", "3000", "--dim", "16", "--k", "6", "--batch", "512", "--epochs", "2", "--actors", "1", "--rounds", "3", "--seed", "3", "--out", str(tmp_path)])
    assert fig["rounds"] == 3
    assert len(fig["rsdist_round_seconds"]) == 3 and len(fig["sklearn_round_seconds"]) == 3
    assert len(fig["round_wall_ratios"]) == 3
    assert fig["rsdist_seconds"] == sorted(fig["rsdist_round_seconds"])[1]
    assert fig["sklearn_seconds"] == sorted(fig["sklearn_round_seconds"])[1]
    assert fig["wall_ratio"] == pytest.approx(fig["rsdist_seconds"] / fig["sklearn_seconds"], rel=1e-3)
    # Seeded on both sides: the same clustering every round (seed 3: both find all six blobs).
    assert fig["inertia_ratio"] == pytest.approx(1.0, abs=0.05)
    assert fig["rsdist_ari"] > 0.95 and fig["sklearn_ari"] > 0.95


def test_median_round_takes_the_middle_time_of_each_side():
    rounds = [{"rsdist_seconds": s, "rsdist_inertia": i} for s, i in [(3.0, 1.0), (1.0, 2.0), (2.0, 3.0)]]
    middle = median_round(rounds, "rsdist_seconds")
    assert middle["rsdist_seconds"] == 2.0 and middle["rsdist_inertia"] == 3.0
    assert middle["rsdist_round_seconds"] == [3.0, 1.0, 2.0]
    assert median_round(rounds[:1], "rsdist_seconds") == rounds[0]


def test_rounds_below_one_is_a_one_line_error():
    with pytest.raises(SystemExit, match="--rounds 0: must be at least 1"):
        bench(["--rows", "100", "--rounds", "0"])
