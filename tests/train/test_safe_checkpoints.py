"""Nothing a finished run's checkpoints hold can run code: a pickle planted in any checkpoint file
is refused, with one line naming the file, by `rsdist eval --out RUN --force` and by a training
resume, and the code in it never runs (its payload would create a marker file)."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from rsdist.core.rundir import RunDir
from rsdist.models.safe_files import CheckpointError, load_tensors, load_torch_state, read_json_file
from tests.train.runs import make_run

UPSTREAM = ("shards", "features", "clusters", "selection")
SETTINGS = ["train.num_workers=1", "train.epochs=2", "train.batch_size=8", "train.embed_dim=16", "train.lora_r=4", "train.lora_alpha=8",
            "train.shuffle_buffer=16", "train.warmup_fraction=0.0", "features.encoder=tiny"]


class Planted:
    """Unpickling this calls open(marker, 'w'): the marker file exists iff the pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str, marker: str) -> None:
    """Replace `path` with a pickle that would create `marker`: a torch file for `.pt`, raw pickle bytes otherwise."""
    os.remove(path)
    if path.endswith(".pt"):
        torch.save({"optimizer": Planted(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"heads": Planted(marker)}, f)


def cli(out: str, *argv: str, capsys) -> tuple[int, str]:
    from rsdist.cli import main

    sets = [x for s in SETTINGS for x in ("--set", s)]
    rc = main([*argv, "--out", out, "--set", f"data.source={out}/no-source", *sets])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """A run whose train stage finished through the command line (2 epochs, LoRA)."""
    folder = str(tmp_path_factory.mktemp("finished") / "run")
    run = RunDir(folder)
    make_run(run, n_train=24, n_test=8, select=16, dim=32)
    for name in UPSTREAM:
        run.write_json({"stage": name, "fingerprint": f"constructed-{name}", "rows_in": 0, "rows_out": 0}, name, "_SUCCESS.json")
    from rsdist.cli import main

    assert main(["train", "--out", folder, "--set", f"data.source={folder}/no-source", *[x for s in SETTINGS for x in ("--set", s)]]) == 0
    assert run.exists("checkpoints", "_SUCCESS.json") and run.exists("checkpoints", "final", "heads.safetensors")
    return folder


def copy_of(finished: str, tmp_path) -> str:
    target = str(tmp_path / "run")
    shutil.copytree(finished, target)
    return target


def test_the_planted_payload_runs_when_unpickled_the_unsafe_way(tmp_path):
    """The payload is live: a plain unpickler runs it (so its marker's absence below means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Planted(str(marker))))
    assert marker.exists()


def test_safe_readers_refuse_a_planted_pickle_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    for name, read in (("x.safetensors", load_tensors), ("x.pt", load_torch_state), ("x.json", read_json_file)):
        path = tmp_path / name
        path.write_bytes(b"placeholder")
        plant(str(path), str(marker))
        with pytest.raises(CheckpointError) as e:
            read(str(path))
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert not marker.exists()


FINAL_FILES = ["heads.safetensors", "text_adapter/adapter_model.safetensors", "text_adapter/adapter_config.json", "train_meta.json"]


@pytest.mark.parametrize("name", FINAL_FILES)
def test_eval_refuses_a_planted_pickle_in_the_final_checkpoint(finished, name, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    path = os.path.join(out, "checkpoints", "final", name)
    marker = tmp_path / "ran"
    plant(path, str(marker))
    rc, err = cli(out, "eval", "--force", capsys=capsys)
    assert rc == 2
    assert err.startswith("rsdist: error: ") and f"{path}: " in err.splitlines()[0] and err.count("\n") == 1, err  # the path, or its file:// URL
    assert not marker.exists()
    assert not os.path.exists(os.path.join(out, "eval", "metrics.json"))


def test_eval_refuses_a_pickled_heads_file_of_the_old_format(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    final = os.path.join(out, "checkpoints", "final")
    os.remove(os.path.join(final, "heads.safetensors"))
    marker = tmp_path / "ran"
    with open(os.path.join(final, "heads.pt"), "wb") as f:
        pickle.dump({"heads": Planted(str(marker))}, f)
    rc, err = cli(out, "eval", "--force", capsys=capsys)
    assert rc == 2 and err.startswith(f"rsdist: error: {os.path.join(final, 'heads.pt')}: a pickled checkpoint file"), err
    assert not marker.exists()


def test_eval_of_the_untouched_run_succeeds(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    rc, err = cli(out, "eval", "--force", capsys=capsys)
    assert rc == 0, err
    assert RunDir(out).read_json("eval", "metrics.json")["trained"]["mR"] > 0


EPOCH_FILES = ["optimizer.pt", "heads.safetensors", "state.json", "text_adapter/adapter_model.safetensors"]


@pytest.mark.parametrize("name", EPOCH_FILES)
def test_training_resume_refuses_a_planted_pickle_in_an_epoch_checkpoint(finished, name, tmp_path, capsys):
    """The train stage killed after its last epoch checkpoint (no _SUCCESS.json), a file of that
    checkpoint replaced: the resume stops with one line naming it, before any worker starts."""
    out = copy_of(finished, tmp_path)
    os.remove(os.path.join(out, "checkpoints", "_SUCCESS.json"))
    path = os.path.join(out, "checkpoints", "ray", "train", "epoch_0002", name)
    marker = tmp_path / "ran"
    plant(path, str(marker))
    rc, err = cli(out, "train", capsys=capsys)
    assert rc == 2
    assert err.startswith("rsdist: error: ") and f"{path}: " in err.splitlines()[0] and err.count("\n") == 1, err  # the path, or its file:// URL
    assert not marker.exists()
    assert not os.path.exists(os.path.join(out, "checkpoints", "_SUCCESS.json"))


def _vlm_step_checkpoint(folder) -> None:
    """A VLM step checkpoint as the loop writes it: adapter (peft config + safetensors), optimizer.pt, state.json."""
    import json

    from rsdist.models.safe_files import save_tensors, save_torch_state

    os.makedirs(folder / "adapter")
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_tensors({"base_model.model.lm.lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter" / "adapter_model.safetensors"))
    save_torch_state({"optimizer": {"state": {"lm.lora_A.weight": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 8)}},
                                    "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["lm.lora_A.weight"]}]}}, str(folder / "optimizer.pt"))
    (folder / "state.json").write_text(json.dumps({"epoch": 0, "step": 3, "micro_done": 3, "scheduler": {"last_epoch": 3}, "history": []}))


@pytest.mark.parametrize("name", ["optimizer.pt", "state.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"])
def test_vlm_step_checkpoints_refuse_a_planted_pickle(name, tmp_path):
    from rsdist.train.vlm_loop import check_step_checkpoint

    folder = tmp_path / "step_000003"
    _vlm_step_checkpoint(folder)
    assert check_step_checkpoint(str(folder))["step"] == 3  # as written: accepted
    marker = tmp_path / "ran"
    plant(str(folder / name), str(marker))
    with pytest.raises(CheckpointError) as e:
        check_step_checkpoint(str(folder))
    assert str(e.value).startswith(f"{folder / name}: ") and "\n" not in str(e.value)
    assert not marker.exists()


def test_vlm_eval_refuses_a_planted_adapter(tmp_path):
    from rsdist.eval.vlm_stage import read_adapter

    run = RunDir(str(tmp_path / "run"))
    _vlm_step_checkpoint(tmp_path / "step")
    shutil.copytree(tmp_path / "step" / "adapter", run.path("vlm_checkpoints", "final", "adapter"))
    assert set(read_adapter(run)) == {"adapter_config.json", "adapter_model.safetensors"}
    marker = tmp_path / "ran"
    plant(run.path("vlm_checkpoints", "final", "adapter", "adapter_model.safetensors"), str(marker))
    with pytest.raises(CheckpointError, match=r"vlm_checkpoints/final/adapter/adapter_model.safetensors: not a safetensors file"):
        read_adapter(run)
    assert not marker.exists()
