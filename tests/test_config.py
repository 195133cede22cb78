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


def test_the_vlm_settings_are_sections_of_the_one_config():
    cfg = config_from_dict({"train": {"model": "vlm", "vlm": {"model": "llava-tiny", "lr": 0.001}}, "eval": {"vlm": {"tasks": ["vqa"]}}})
    assert cfg.train.model == "vlm" and cfg.train.vlm.model == "llava-tiny" and cfg.train.vlm.lr == 0.001 and cfg.eval.vlm.tasks == ["vqa"]
    assert config_from_dict({}).train.model == "dual"
    with pytest.raises(ConfigError, match=r"train.model: 'clip' is not one of: dual, vlm"):
        config_from_dict({"train": {"model": "clip"}})
    with pytest.raises(ConfigError, match=r"train.vlm.model: 'gpt' is not one of: qwen2-vl-tiny, llava-tiny, llava-next-tiny, idefics3-tiny, hf:<folder>"):
        config_from_dict({"train": {"vlm": {"model": "gpt"}}})
    with pytest.raises(ConfigError, match=r"eval.vlm.tasks: 'ocr' is not one of: scene, vqa, caption"):
        config_from_dict({"eval": {"vlm": {"tasks": ["ocr"]}}})
    with pytest.raises(ConfigError, match=r"train.vlm.epochs: 0 must be > 0"):
        config_from_dict({"train": {"vlm": {"epochs": 0}}})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format: 'tsv' is not one of"):
        config_from_dict({"data": {"sources": [{"source": "x", "format": "tsv"}]}})
    with pytest.raises(ConfigError, match=r"data.sources\[1\]: 'y' must be a mapping with a `source`"):
        config_from_dict({"data": {"sources": [{"source": "x"}, "y"]}})

# -- numbers that are not numbers, and resource requests no cluster can meet ----------------------
@pytest.mark.parametrize(
    "argv, line",
    [
        (["select", "--set", "select.budget=.inf"], "select.budget: inf is not a finite number"),
        (["select", "--budget", "inf"], "select.budget: inf is not a finite number"),
        (["select", "--set", "select.budget=.nan"], "select.budget: nan is not a finite number"),
        (["cluster", "--set", "cluster.tol=.nan"], "cluster.tol: nan is not a finite number"),
        (["train", "--set", "train.lr=.nan"], "train.lr: nan is not a finite number"),
        (["train", "--set", "train.harma_gate_init=-.inf"], "train.harma_gate_init: -inf is not a finite number"),
        (["ingest", "--set", "data.shard_rows=true"], "data.shard_rows: true is a boolean, not a number"),
        (["train", "--set", "train.cpus_per_worker=false"], "train.cpus_per_worker: false is a boolean, not a number"),
        (["train", "--set", "ray.num_cpus=-2"], "ray.num_cpus: -2 must be > 0"),
        (["train", "--set", "ray.num_cpus=1.5"], "ray.num_cpus: 1.5 is not a int"),
        (["vlm", "train", "--set", "train.vlm.lr=.nan"], "train.vlm.lr: nan is not a finite number"),
        (["vlm", "eval", "--set", "eval.vlm.max_rows=true"], "eval.vlm.max_rows: true is a boolean, not a number"),
    ],
)
def test_non_finite_and_boolean_numbers_are_one_line_naming_the_field(argv, line, tmp_path, capsys):
    from rsdist.cli import main

    assert main([*argv[:2 if argv[0] == "vlm" else 1], "--out", str(tmp_path / "run"), *argv[2 if argv[0] == "vlm" else 1:]]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"rsdist: error: {line}\n"
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_direct_construction_refuses_non_finite_and_boolean_numbers():
    from rsdist.config import ClusterConfig, SelectConfig, TrainConfig

    for make, line in [
        (lambda: SelectConfig(budget=float("inf")), "select.budget: inf is not a finite number"),
        (lambda: ClusterConfig(tol=float("nan")), "cluster.tol: nan is not a finite number"),
        (lambda: TrainConfig(lr=float("nan")), "train.lr: nan is not a finite number"),
        (lambda: TrainConfig(epochs=True), "train.epochs: True is not a number"),
    ]:
        with pytest.raises(ConfigError) as e:
            make()
        assert str(e.value) == line


@pytest.mark.parametrize(
    "argv, line",
    [
        (["train", "--set", "train.num_workers=100"], "train.num_workers: 100 workers of 0.5 CPUs each, but the Ray cluster can hold 4 (1 node, 2 CPUs)"),
        (["train", "--set", "train.cpus_per_worker=8"], "train.cpus_per_worker: 8 CPUs for each of the workers, but the largest node of the Ray cluster has 2 (1 node, 2 CPUs)"),
        (["cluster", "--set", "cluster.num_actors=5", "--set", "cluster.cpus_per_actor=1"],
         "cluster.num_actors: 5 shard actors of 1 CPU each, but the Ray cluster can hold 2 (1 node, 2 CPUs)"),
        (["cluster", "--set", "cluster.device=cuda", "--set", "cluster.gpus_per_actor=1"], "cluster.device / cluster.gpus_per_actor: each of the shard actors needs 1 GPU on one node; no node of the Ray cluster has that (1 node, 2 CPUs)"),
        (["run", "--set", "train.num_workers=100"], "train.num_workers: 100 workers of 0.5 CPUs each, but the Ray cluster can hold 4 (1 node, 2 CPUs)"),
        (["vlm", "train", "--set", "train.vlm.num_workers=3"], "train.vlm.num_workers: 3 workers of 1 CPU each, but the Ray cluster can hold 2 (1 node, 2 CPUs)"),
        (["vlm", "train", "--set", "train.vlm.device=cuda"],
         "train.vlm.device=cuda with train.vlm.gpus_per_worker: each of the workers needs 1 GPU on one node; no node of the Ray cluster has that (1 node, 2 CPUs)"),
        (["vlm", "eval", "--set", "eval.vlm.device=cuda"],
         "eval.vlm.device=cuda with eval.vlm.gpus_per_actor: each of the generator actors needs 1 GPU on one node; no node of the Ray cluster has that (1 node, 2 CPUs)"),
    ],
)
def test_requests_the_cluster_can_never_meet_are_refused_before_any_stage(ray_session, argv, line, tmp_path, capsys):
    """On the test session's Ray (one node, 2 CPUs): refused at once with one line, instead of Ray
    waiting forever for workers it cannot place; nothing of the run is written."""
    from rsdist.cli import main

    out = str(tmp_path / "run")
    if argv[0] == "run":
        config = tmp_path / "job.yaml"
        config.write_text("data:\n  source: synthetic\n")
        argv = ["run", str(config), *argv[1:]]
    split = 2 if argv[0] in ("vlm", "run") else 1
    assert main([*argv[:split], "--out", out, *argv[split:]]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"rsdist: error: {line}\n"
    assert not (tmp_path / "run" / "synthetic_source").exists() and not (tmp_path / "run" / "shards").exists()
