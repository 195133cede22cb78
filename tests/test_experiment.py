import dataclasses
import statistics
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest

from rsdist.config import ConfigError, config_from_dict
from rsdist.experiment import ExperimentConfig, aggregate, build_base, split_config, cell_config, load_experiment, paired_against_random, paired_by_split, pooled_sd, render_paired, run_experiment
from rsdist.core.rundir import RunDir
from rsdist.select.budget import budget_count
from tests.test_pipeline import tiny_settings


def _cell(method, budget, seed, mr, secs=1.0, kept_epoch=5):
    return {"method": method, "budget": budget, "seed": seed, "epochs": 5, "kept_epoch": kept_epoch, "select_seconds": 0.1, "train_seconds": secs, "metrics": {"mR": mr}}


def test_aggregate_mean_sd_and_relative_to_full():
    cells = [_cell("full", 1.0, 0, 20.0), _cell("full", 1.0, 1, 22.0), _cell("random", 0.2, 0, 10.0, kept_epoch=2), _cell("random", 0.2, 1, 12.0, kept_epoch=5)]
    table = {(r["method"], r["budget"]): r for r in aggregate(cells, ["mR"])}
    assert table[("random", 0.2)]["epochs"] == 5 and table[("random", 0.2)]["kept_epoch_mean"] == 3.5  # keep_epoch 'best-val'
    assert table[("full", 1.0)]["kept_epoch_mean"] == 5
    assert table[("full", 1.0)]["mR_mean"] == 21.0
    assert table[("random", 0.2)]["mR_mean"] == 11.0
    assert table[("random", 0.2)]["mR_sd"] == pytest.approx(2 ** 0.5)
    assert table[("random", 0.2)]["mR_rel_full"] == pytest.approx(11.0 / 21.0)


def test_paired_against_random_matches_seeds():
    random_mr = {0: 10.0, 1: 12.0, 2: 11.0}
    method_mr = {0: 11.0, 1: 12.5, 2: 10.5, 3: 30.0}  # seed 3 has no random cell: left out
    cells = [_cell("random", 0.2, s, v) for s, v in random_mr.items()] + [_cell("m", 0.2, s, v) for s, v in method_mr.items()]
    cells += [_cell("full", 1.0, 0, 20.0), _cell("m", 0.5, 0, 5.0)]  # no random at 0.5: no row
    (row,) = paired_against_random(cells, ["mR"])
    assert (row["method"], row["budget"], row["seeds"]) == ("m", 0.2, 3)
    assert row["mR_diff"] == pytest.approx((1.0 + 0.5 - 0.5) / 3)
    assert row["mR_diff_sd"] == pytest.approx(statistics.stdev([1.0, 0.5, -0.5]))
    assert row["mR_random_sd"] == pytest.approx(1.0)
    assert row["mR_diff_in_random_sd"] == pytest.approx(row["mR_diff"] / 1.0)
    assert row["mR_seeds_above"] == 2
    text = render_paired([row], ["mR"])
    assert "| m | 0.2 | 3 | +0.33 | 0.76 | +0.3 | 2 / 3 |" in text


def test_variants_and_protocols():
    exp = ExperimentConfig(methods=["random", {"label": "dedup", "method": "cluster-random", "dedup_threshold": 0.95}], budgets=[0.25], protocol="steps")
    cfg = config_from_dict({"run_dir": "/tmp/e", "train": {"epochs": 2}})
    cell = cell_config(cfg, exp, exp.methods[1], 0.25, 3)
    assert cell.select.method == "cluster-random" and cell.select.dedup_threshold == 0.95 and cell.select.seed == 3
    assert cell.train.epochs == 8 and cell.train.seed == 3  # same steps as full data: epochs / budget
    assert cell.run_dir == "/tmp/e/cells/dedup_b0.25_s3"
    for bad in ({"methods": ["best"]}, {"methods": [{"method": "random", "budgt": 1}]}, {"budgets": [1.5]}, {"protocol": "time"}):
        with pytest.raises(ConfigError):
            ExperimentConfig(**bad)


def test_error_driven_variant_takes_the_failures_of_its_pilot_cell_of_the_same_seed():
    pilot = "cells/random_b0.1_s{seed}/eval/failures.parquet"
    exp = ExperimentConfig(methods=["random", {"label": "errors", "method": "error-driven", "failures": pilot}], budgets=[0.1, 0.2], test_offsets=[0.5])
    cfg = split_config(config_from_dict({"run_dir": "/tmp/e"}), 0.5)
    cell = cell_config(cfg, exp, exp.methods[1], 0.2, 3)
    assert cell.select.failures == "/tmp/e/splits/o0.5/cells/random_b0.1_s3/eval/failures.parquet"
    assert cell_config(cfg, exp, {"label": "e", "method": "error-driven", "failures": "s3://b/f{seed}.parquet"}, 0.2, 1).select.failures == "s3://b/f1.parquet"
    assert cell_config(cfg, exp, {"label": "e", "method": "error-driven", "failures": "/data/f.parquet"}, 0.2, 1).select.failures == "/data/f.parquet"


def test_epochs_by_budget_gives_each_budget_its_schedule():
    cfg = config_from_dict({"run_dir": "/tmp/e", "train": {"epochs": 10}})
    exp = ExperimentConfig(methods=["random"], budgets=[0.2, 0.33], epochs_by_budget={1: 2, "0.33": 5})
    full = {"label": "full", "method": "random"}
    assert cell_config(cfg, exp, full, 1.0, 0).train.epochs == 2
    assert cell_config(cfg, exp, exp.methods[0], 0.33, 0).train.epochs == 5
    assert cell_config(cfg, exp, exp.methods[0], 0.2, 0).train.epochs == 10  # not listed: train.epochs
    for bad, message in (
        ({"epochs_by_budget": {0.5: 3}}, r"budget 0.5 is not one of experiment.budgets"),
        ({"epochs_by_budget": {0.2: 0}}, r"epochs_by_budget.0.2: 0 must be a whole number"),
        ({"epochs_by_budget": {0.2: 3}, "protocol": "steps"}, r"only with protocol 'epochs'"),
        ({"epochs_by_budget": [3]}, r"must be a mapping"),
    ):
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig(budgets=[0.2], **bad)


def test_pairs_are_taken_on_the_same_split_and_random_sd_is_pooled_within_splits():
    def cell(method, offset, seed, mr):
        return {**_cell(method, 0.2, seed, mr), "test_offset": offset}

    # split 0.5's held-out set is harder: every cell on it is ~10 lower, which must not count as spread
    cells = [cell("random", 0.0, 0, 20.0), cell("random", 0.0, 1, 22.0), cell("random", 0.5, 0, 10.0), cell("random", 0.5, 1, 14.0),
             cell("m", 0.0, 0, 21.0), cell("m", 0.0, 1, 23.0), cell("m", 0.5, 0, 12.0), cell("m", 0.5, 1, 13.0)]
    (row,) = paired_against_random(cells, ["mR"])
    assert (row["seeds"], row["splits"]) == (4, 2)
    assert row["mR_diff"] == pytest.approx((1 + 1 + 2 - 1) / 4)
    assert row["mR_random_sd"] == pytest.approx(((2 + 8) / 2) ** 0.5)  # squared deviations 1+1 and 4+4 over 4 - 2 dof
    assert row["mR_seeds_above"] == 3
    assert "| m | 0.2 | 4 |" in render_paired([row], ["mR"]) and "split x seed" in render_paired([row], ["mR"])
    by_split = paired_by_split(cells, ["mR"])
    assert [(r["test_offset"], r["mR_diff"], r["mR_random_sd"]) for r in by_split] == [(0.0, 1.0, pytest.approx(2 ** 0.5)), (0.5, 0.5, pytest.approx(8 ** 0.5))]
    assert "| m | 0.2 | 0.5 | 2 | +0.50 |" in render_paired(by_split, ["mR"], title="per split")
    table = {r["method"]: r for r in aggregate(cells, ["mR"])}
    assert table["random"]["mR_mean"] == 16.5 and table["random"]["mR_sd"] == pytest.approx(5 ** 0.5)  # sd within splits, too
    assert pooled_sd([[1.0, 3.0]]) == pytest.approx(statistics.stdev([1.0, 3.0])) and pooled_sd([[1.0], []]) == 0.0


def test_test_offsets_are_checked():
    assert ExperimentConfig(test_offsets=[0, 0.5]).test_offsets == [0.0, 0.5]
    for bad, message in (({"test_offsets": [1.0]}, r"test_offsets: 1.0 must be an offset in \[0, 1\)"),
                         ({"test_offsets": [0.1, 0.1]}, r"repeats an offset"), ({"test_offsets": 0.5}, r"must be a list"),
                         ({"features_from": 3}, r"experiment.features_from: 3 must be a run directory")):
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig(**bad)


@pytest.fixture(scope="module")
def experiment(ray_session, tmp_path_factory):
    """One experiment on two development splits: per split a full-data cell and an error-driven cell
    at budget 0.5 whose pilot is that split's full-data cell (its validation failures at rank 1).
    Read by the tests below, which check the shared bases and resume, and the error-driven cells."""
    tmp_path = tmp_path_factory.mktemp("experiment")
    settings = tiny_settings(str(tmp_path / "exp"))
    settings["data"].update(synthetic_per_class=10, val_fraction=0.25)
    settings["train"].update(epochs=1, num_workers=1)  # one Ray Train worker: four cells start quicker
    settings["eval"] = {"baseline": False, "failure_rank": 1}
    pilot = "cells/full_b1_s{seed}/eval/failures.parquet"
    settings["experiment"] = {"methods": [{"label": "errors", "method": "error-driven", "failures": pilot}], "budgets": [0.5], "seeds": [0], "test_offsets": [0.0, 0.5]}
    cfg, exp = load_experiment(write_yaml(tmp_path / "exp.yaml", settings))
    return SimpleNamespace(tmp_path=tmp_path, cfg=cfg, exp=exp, report=run_experiment(cfg, exp))


@pytest.mark.slow
def test_experiment_runs_cells_on_shared_bases_of_two_splits_and_resumes(experiment):
    cfg, exp, report, tmp_path = experiment.cfg, experiment.exp, experiment.report, experiment.tmp_path
    assert [(c["method"], c["budget"], c["test_offset"]) for c in report["cells"]] == [("full", 1.0, 0.0), ("errors", 0.5, 0.0), ("full", 1.0, 0.5), ("errors", 0.5, 0.5)]
    for full, half in (report["cells"][:2], report["cells"][2:]):
        assert full["selected"] == full["pool"] and half["selected"] == budget_count(0.5, half["pool"])
    out = RunDir(cfg.run_dir)
    assert out.exists("results.json") and out.exists("experiment.md") and out.exists("budget_curve.png")
    first, second = (RunDir(f"{cfg.run_dir}/splits/{name}/base") for name in ("o0", "o0.5"))
    assert not out.exists("splits", "o0.5", "cells", "errors_b0.5_s0", "features")  # cells inherit their base's upstream folders
    assert out.exists("splits", "o0.5", "cells", "errors_b0.5_s0", "eval")
    assert not first.exists("summary.json")  # the base run's own summary is left alone
    assert "taken_from" not in first.read_json("features", "_SUCCESS.json")
    assert second.read_json("features", "_SUCCESS.json")["taken_from"] == first.url("features")
    held_out = [set(r.read_table("features", columns=["sample_id", "split"]).filter(pc.field("split") == "test").column("sample_id").to_pylist())
                for r in (first, second)]
    assert held_out[0] and held_out[1] and not held_out[0] & held_out[1]  # disjoint held-out windows
    assert report["vs_random_by_split"] == []  # no random cells: nothing to pair (pairing: the tests above)
    again = run_experiment(cfg, exp)
    assert again["cells"] == report["cells"]  # finished cells are not recomputed
    # another experiment's base (experiment.features_from) takes its features from a finished base
    other = build_base(split_config(dataclasses.replace(cfg, run_dir=str(tmp_path / "other")), 0.25), features_from=first.uri)
    assert RunDir(other).read_json("features", "_SUCCESS.json")["taken_from"] == first.url("features")
    assert RunDir(other).exists("clusters", "_SUCCESS.json")


@pytest.mark.slow
def test_error_driven_cell_spends_its_budget_near_the_failures_of_its_pilot_cell(experiment):
    import pyarrow.parquet as pq

    for split, (pilot, errors) in (("o0", experiment.report["cells"][:2]), ("o0.5", experiment.report["cells"][2:])):
        assert (pilot["method"], errors["method"]) == ("full", "errors")
        out = RunDir(f"{experiment.cfg.run_dir}/splits/{split}")
        failures = pq.read_table(out.path("cells", "full_b1_s0", "eval", "failures.parquet"))
        assert failures.num_rows > 0  # the pilot (trained on the split's whole pool, one epoch) misses some validation images at rank 1
        manifest = out.read_table("cells", "errors_b0.5_s0", "selection", "manifest.parquet").to_pylist()
        kept = [r for r in manifest if r["selected"]]
        assert len(kept) == errors["selected"] == budget_count(0.5, len(manifest))
        # every kept row names the pilot's failure it was retrieved for
        named = {r["reason"].split("near ")[1].split(" (cosine")[0] for r in kept}
        assert named <= set(failures.column("sample_id").to_pylist())
        validation = out.read_json("cells", "full_b1_s0", "eval", "metrics.json")["validation"]
        assert validation["failures"] == failures.num_rows and validation["failure_rank"] == 1


def write_yaml(path, settings: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(settings))
    return str(path)
