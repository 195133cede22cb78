import pytest

from rsdist.config import ConfigError, RunConfig, apply_sets, config_from_dict, config_to_dict, load_config


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.select.budget == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"select": {"method": "best"}}, "select.method: 'best' is not one of:"),
        ({"select": {"budget": 0}}, "select.budget: 0"),
        ({"select": {"budget": 12.5}}, "select.budget: 12.5"),
        ({"eval": {"failure_rank": -1}}, "eval.failure_rank: -1 must be >= 0"),
        ({"select": {"alignment_direction": "reverse"}}, "select.alignment_direction: 'reverse' is not one of:"),
        ({"select": {"alignment_score": "rank"}}, "select.alignment_score: 'rank' is not one of:"),
        ({"select": {"alignment_temperature": 0}}, "select.alignment_temperature"),
        ({"train": {"epochs": "many"}}, "train.epochs: 'many' is not a int"),
        ({"features": {"perturbations": ["zoom"]}}, "features.perturbations: 'zoom' is not one of"),
        ({"trian": {}}, "trian: unknown setting"),
        ({"train": {"lr": -1}}, "train.lr: -1"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction: 1.5"),
        ({"data": {"test_fraction": 0.5, "val_fraction": 0.5}}, "data.val_fraction: 0.5 plus data.test_fraction=0.5 must leave a training pool"),
        ({"train": {"keep_epoch": "best"}}, "train.keep_epoch: 'best' is not one of"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_every_field_has_help_text():
    import dataclasses

    for section in dataclasses.fields(RunConfig):
        assert section.metadata.get("help"), section.name
        if dataclasses.is_dataclass(section.default_factory if section.default_factory is not dataclasses.MISSING else None):
            for f in dataclasses.fields(section.default_factory):
                assert f.metadata.get("help"), f"{section.name}.{f.name}"


def test_load_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: /tmp/r\nselect:\n  method: random\n  budget: 100\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(p))
    assert cfg.select.method == "random" and cfg.select.budget == 100 and cfg.train.epochs == 2


def test_bad_yaml_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("select: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_set_overrides_parse_yaml_values_and_name_bad_items():
    values = {"train": {"epochs": 3}}
    apply_sets(values, ["train.epochs=5", " select.budget =0.2", "features.perturbations=[noise, crop]"])
    assert values == {"train": {"epochs": 5}, "select": {"budget": 0.2}, "features": {"perturbations": ["noise", "crop"]}}
    with pytest.raises(ConfigError, match=r"--set 'train.epochs': expected section.field=value"):
        apply_sets(values, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"train.epochs.x: epochs is not a section"):
        apply_sets(values, ["train.epochs.x=1"])


def test_vlm_job_overrides_share_the_set_syntax():
    from rsdist.vlm_job import load_job

    job = load_job(None, ["train.vlm.lr=0.001", "train.vlm.epochs=2"], "vqa")
    assert job.train.vlm.lr == 0.001 and job.train.vlm.epochs == 2 and job.eval.vlm.task == "vqa"
    with pytest.raises(ConfigError, match=r"expected section.vlm.field=value"):
        load_job(None, ["train.vlm.lr"], None)
