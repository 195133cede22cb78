"""Bounded driver memory: streamed JSON, compact key and content bookkeeping, shards across chunks."""

from __future__ import annotations

import json
import tracemalloc

import fsspec
import pytest

from rsdist.config import DataConfig
from rsdist.ingest import stage as ingest
from rsdist.ingest.dedup import ContentIndex, KeySet
from rsdist.ingest.jsonstream import iter_array, json_kind
from rsdist.ingest.readers import IngestError
from rsdist.core.rundir import RunDir
from tests.ingest.conftest import image_bytes, put, write_captions_txt


def test_keyset_finds_repeats_before_and_after_a_merge():
    keys = KeySet(merge_every=4)
    assert all(keys.add(f"k{i}") for i in range(10))  # two merges happened
    assert not keys.add("k0") and not keys.add("k9") and not keys.add("k5")
    assert keys.add("k10") and len(keys) == 11


def test_content_index_groups_equal_prefixes_in_source_order():
    index = ContentIndex()
    index.add_chunk(1, ["00000000000000aa", "00000000000000bb"])
    index.add_chunk(0, ["00000000000000bb", "00000000000000cc", "00000000000000aa"])
    assert sorted(index.candidate_groups()) == [[(0, 0), (1, 1)], [(0, 2), (1, 0)]]


def test_json_arrays_stream_and_malformed_ones_name_the_line(tmp_path):
    fs = fsspec.filesystem("file")
    good = tmp_path / "list.json"
    good.write_text(json.dumps([{"id": i, "x": 0.5} for i in range(5)]))
    assert [d["id"] for d in iter_array(fs, str(good), "item")] == list(range(5)) and json_kind(fs, str(good)) == "list"
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    assert json_kind(fs, str(coco)) == "coco"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1},\n{"id": 2},\n{"id": ]')
    seen = []
    with pytest.raises(IngestError, match=r"bad.json:3: malformed JSON"):
        for d in iter_array(fs, str(bad), "item"):
            seen.append(d["id"])
    assert seen == [1, 2]


def test_exact_duplicates_in_other_shards_are_flagged(tmp_path):
    root = str(tmp_path / "ds")
    write_captions_txt(root, n_per_class=1, classes=("Forest",))
    data = open(f"{root}/images/Forest/forest_0.png", "rb").read()
    for name in ("copy1.png", "copy2.png"):
        put(f"{root}/images/Forest/{name}", data)
    put(f"{root}/captions/train_filename.txt", "forest_0.png\ncopy1.png\ncopy2.png\n")
    put(f"{root}/captions/train_caps.txt", "same words\n" * 15)
    run = RunDir(str(tmp_path / "run"))
    result = ingest.run(run, DataConfig(source=root, engine="local", shard_rows=1))
    rows = run.read_table("shards").to_pylist()
    assert len(run.parquet_files("shards")) == 3 and result.extra["duplicates"] == 2
    assert [json.loads(r["meta"]).get("duplicate_of") for r in rows] == [None, rows[0]["sample_id"], rows[0]["sample_id"]]
    # a repeated run on the finished folder finds every chunk done and changes nothing
    again = ingest.run(run, DataConfig(source=root, engine="local", shard_rows=1))
    assert again.extra["duplicates"] == 2 and run.read_table("shards").to_pylist() == rows


def test_ray_tasks_finish_a_run_the_driver_started(tmp_path, ray_session):
    source = str(tmp_path / "ds")
    write_captions_txt(source, n_per_class=10, classes=("Forest", "Harbor"), broken=True)
    clean = RunDir(str(tmp_path / "clean"))
    ingest.run(clean, DataConfig(source=source, engine="local", shard_rows=4))
    run = RunDir(str(tmp_path / "run"))
    ingest.run(run, DataConfig(source=source, engine="local", shard_rows=4))
    for chunk in (1, 3, 6):  # as if killed: these chunks' markers (and shard 3) never landed
        run.fs.rm(run.path("shards", "_chunks", f"part-{chunk:05d}.json"))
    run.fs.rm(run.path("shards", "part-00003.parquet"))
    ingest.run(run, DataConfig(source=source, engine="ray", shard_rows=4))
    assert run.read_table("shards").to_pylist() == clean.read_table("shards").to_pylist()
    assert run.read_json("shards", "ingest_report.json") == clean.read_json("shards", "ingest_report.json")
    assert not run.exists("shards", "_plan")


def _llava_source(root: str, n: int) -> None:
    """n conversations; every 50th shows the same image with the same words (an exact duplicate)."""
    put(f"{root}/images/scene.png", image_bytes())
    rows = []
    for i in range(n):
        tile = 0 if i % 50 == 0 else i
        row = {"id": f"q{i}", "conversations": [{"from": "human", "value": f"<image>\nWhat is in tile {tile}?"},
                                                {"from": "gpt", "value": f"tile {tile} holds {'field ' * 8}"}]}
        if i % 50 == 0:
            row["image"] = "scene.png"
        rows.append(row)
    put(f"{root}/instruct.json", json.dumps(rows))


def _driver_peak(tmp_path, name: str, n: int) -> int:
    root = str(tmp_path / name)
    _llava_source(root, n)
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = ingest.run(RunDir(str(tmp_path / f"run-{name}")), DataConfig(source=root, engine="local", shard_rows=200))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.rows_in == n and result.rows_out == n and result.extra["duplicates"] == n // 50 - 1
    return peak


def test_driver_memory_does_not_grow_with_the_source(tmp_path):
    """5x the records: the driver's peak Python memory grows by under 250 bytes per extra record.

    What may grow: a key digest (about 70 bytes until the key set's next merge, then 8) and a
    content-index entry (24) per record. Loading this source's JSON whole (json.load) would cost
    about 1,000 bytes per record; holding the rows of a window of records, far more.
    """
    _driver_peak(tmp_path, "warm-up", 100)  # first-use allocations (imports, codec tables) out of the way
    small = _driver_peak(tmp_path, "small", 600)
    large = _driver_peak(tmp_path, "large", 3000)
    assert (large - small) / 2400 < 250, f"driver peak grew from {small} to {large} bytes"
