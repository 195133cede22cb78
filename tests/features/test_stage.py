"""The features stage on Ray: output contract, per-shard resume, and exactly-once after an actor dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from rsdist.config import ConfigError, FeaturesConfig
from rsdist.features import stage as features
from rsdist.stage import fingerprint, run_stage

from .conftest import write_shards


def _cfg(**kw) -> FeaturesConfig:
    base = dict(encoder="tiny", image_size=32, batch_size=8, perturbations=["noise", "rotate", "crop", "token_dropout"])
    base.update(kw)
    return FeaturesConfig(**base)


def test_pass_writes_the_contract(ray_session, run_dir):
    ids = write_shards(run_dir, n_shards=4, rows_per_shard=8)
    cfg = _cfg(batch_size=4, perturb_in="cpu")  # the GPU layout; the other tests perturb in the actor
    slices = features.plan_slices({f"part-{i}": 8 for i in range(4)}, 4)
    assert [(s["path"], s["start"]) for s in slices[:3]] == [("part-0", 0), ("part-0", 4), ("part-1", 0)]  # shard order
    record = run_stage(run_dir, "features", fingerprint(cfg), lambda: features.run(run_dir, cfg), resumable=True)
    assert (record["rows_in"], record["rows_out"], record["skipped"]) == (32, 32, False)
    # results stream in blocks of one batch: the first shard lands before the last rows arrive
    # (how long before depends on the machine's load: 8-16 of 32 rows on an idle 2-core machine)
    assert record["rows_before_first_shard"] < 32 and record["steady_rows_per_second"] > 0
    assert record["encoder"] == "tiny" and record["perturbations"] == cfg.perturbations
    assert record["rows_per_second"] > 0

    assert [p.rsplit("/", 1)[1] for p in run_dir.parquet_files("features")] == [f"part-{i:05d}.parquet" for i in range(4)]
    table = run_dir.read_table("features")
    assert table.column("sample_id").to_pylist() == ids  # every input row once, in shard order
    assert table.schema.field("image_emb").type == pa.list_(pa.float32(), 32)
    assert table.schema.field("text_emb").type == pa.list_(pa.float32(), 32)
    shifts = {n: table.column(f"shift_{n}").to_numpy() for n in cfg.perturbations}
    for n, s in shifts.items():
        assert s.dtype == np.float32 and np.all(np.isfinite(s)) and np.all((s >= -1e-5) & (s <= 2)), n
        assert s.std() > 0, n  # the shift tells samples apart
    np.testing.assert_allclose(table.column("shift").to_numpy(), np.mean(list(shifts.values()), axis=0), rtol=1e-5, atol=1e-6)
    assert set(table.column("split").to_pylist()) == {"train", "test"}
    assert table.column("label").to_pylist()[:3] == ["class0", "class1", "class2"]

    meta = run_dir.read_json("features", "features_meta.json")
    assert meta["image_dim"] == 32 and meta["text_dim"] == 32 and meta["perturbations"] == cfg.perturbations
    assert meta["image_perturbations"] == ["noise", "rotate", "crop"] and meta["text_perturbations"] == ["token_dropout"]

    again = run_stage(run_dir, "features", fingerprint(cfg), lambda: pytest.fail("a complete stage ran again"), resumable=True)
    assert again["skipped"]


def test_resumes_per_shard_in_float16(ray_session, run_dir):
    write_shards(run_dir, n_shards=3, rows_per_shard=8, seed=1, with_captions=False)
    cfg = _cfg(dtype="float16", perturbations=["flip", "blur", "jpeg"])
    features.run(run_dir, cfg)
    first = run_dir.read_table("features", "part-00001.parquet")
    assert first.schema.field("image_emb").type == pa.list_(pa.float16(), 32)

    run_dir.remove("features", "part-00001.parquet")  # as if the job died before this shard was written
    result = features.run(run_dir, cfg)
    assert result.extra["shards_resumed"] == 2 and result.rows_out == result.rows_in == 24
    again = run_dir.read_table("features", "part-00001.parquet")
    assert again.column("sample_id").equals(first.column("sample_id"))
    # same seeds, same model: the redone shard matches (up to float16 rounding of the image tower)
    np.testing.assert_allclose(again.column("shift").to_numpy(), first.column("shift").to_numpy(), atol=1e-3)


def _embed_actor_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "MapBatches(EmbedModel)" in cmd and "MapWorker" in cmd:
            pids.append(proc.info["pid"])
    return pids


def test_exactly_once_when_an_actor_dies_mid_pass(ray_session, run_dir):
    n_shards = 8
    ids = write_shards(run_dir, n_shards=n_shards, rows_per_shard=16, seed=2)
    cfg = _cfg(batch_size=4, image_size=128)
    killed: dict = {}
    finished = threading.Event()

    def kill_one_actor_once_it_works():
        import psutil

        deadline = time.time() + 240
        while time.time() < deadline and not finished.is_set():
            pids = _embed_actor_pids()
            busy = [p for p in pids if psutil.Process(p).cpu_times().user > 2.0]  # model loaded, batches running
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.update(pid=busy[0], before_end=not finished.is_set())
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_once_it_works, daemon=True)
    killer.start()
    result = features.run(run_dir, cfg)
    finished.set()
    killer.join(timeout=5)
    assert killed.get("before_end"), "no working model actor was killed while the pass ran"
    table = run_dir.read_table("features")
    assert table.column("sample_id").to_pylist() == ids
    assert result.rows_out == result.rows_in == len(ids)


def test_pool_is_sized_from_each_nodes_resources():
    two_cpus = features.plan_pool(_cfg(), [{"CPU": 2.0}], use_gpu=False)
    assert (two_cpus.size, two_cpus.threads, two_cpus.use_gpu) == (2, 1, False)
    assert two_cpus.size * two_cpus.resources.num_cpus <= 1.5  # CPU stays free for reading and decoding
    big = features.plan_pool(_cfg(threads_per_actor=4), [{"CPU": 64.0}], use_gpu=False)
    assert big.size == 16 and big.size * big.resources.num_cpus <= 56
    gpus = features.plan_pool(_cfg(), [{"CPU": 16.0, "GPU": 4.0}], use_gpu=True)
    assert (gpus.size, gpus.resources.num_gpus, gpus.use_gpu) == (4, 1.0, True)
    assert features.plan_pool(_cfg(num_actors=3), [{"CPU": 2.0}], use_gpu=False).size == 3


def test_every_node_hosting_actors_keeps_room_for_reads():
    """Three 1-CPU nodes: one actor per node, each leaving its node the quarter CPU a read needs
    (sized from the cluster's total, 3 actors x 0.833 CPU, no node had room and reads never ran)."""
    plan = features.plan_pool(_cfg(), [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], use_gpu=False)
    assert plan.size == 3
    assert 1.0 - plan.resources.num_cpus >= features.CPU_STAGE.num_cpus
    mixed = features.plan_pool(_cfg(), [{"CPU": 1.0}, {"CPU": 2.0}], use_gpu=False)
    assert mixed.resources.num_cpus <= 0.5 and mixed.size == 5  # 1 on the small node, 4 on the other
    # GPUs asked for before any GPU node exists (the autoscaler adds them): one actor to start with
    ahead = features.plan_pool(_cfg(device="cuda"), [{"CPU": 4.0}], use_gpu=True)
    assert (ahead.size, ahead.resources.num_gpus) == (1, 1.0)
    assert features.plan_pool(_cfg(memory_per_actor_gb=2.0), [{"CPU": 2.0}], use_gpu=False).resources.memory == 2e9


def test_no_node_can_be_filled_with_actors_however_ray_places_them():
    """The planned share leaves every node a read task's room even when Ray puts more actors on it
    than planned (a lost node's actors starting again on the nodes left): at 0.5 CPU a 1-CPU node
    held two actors and nothing else, the reads never ran and the pass stopped for good."""
    for nodes in ([{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 1.0}], [{"CPU": 1.0}] * 3, [{"CPU": 8.0}], [{"CPU": 3.0}, {"CPU": 4.0}]):
        share = features.plan_pool(_cfg(), nodes, use_gpu=False).resources.num_cpus
        for n in nodes:
            if n["CPU"]:
                assert features.packing_leftover(n["CPU"], share) >= features.CPU_STAGE.num_cpus, (nodes, share)
    assert features.fill_proof_share([2.0, 1.0], 0.5) == 0.35
    assert features.fill_proof_share([2.0], 0.75) == 0.75  # already leaves room: unchanged


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="features.perturbations: 'swirl' is not one of"):
        _cfg(perturbations=["swirl"])
    with pytest.raises(ConfigError, match="features.dtype: 'int8' is not one of: float32, float16"):
        _cfg(dtype="int8")
    with pytest.raises(ConfigError, match="features.perturb_in: 'gpu' is not one of: auto, actor, cpu"):
        _cfg(perturb_in="gpu")
    with pytest.raises(ConfigError, match="names one perturbation twice"):
        _cfg(perturbations=["noise", "noise"])
