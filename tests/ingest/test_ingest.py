"""The ingest stage contract on the captions-txt layout (the demo's and rsicd-aid's), local and memory://."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rsdist.config import ConfigError, DataConfig
from rsdist.ingest import stage as ingest
from rsdist.ingest.readers import IngestError
from rsdist.core.rundir import RunDir
from rsdist.core.schema import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, make_sample_id
from rsdist.stage import fingerprint, run_stage
from tests.ingest.conftest import put, write_captions_txt


def _ingest(run: RunDir, **kw):
    data = DataConfig(engine="local", **kw)
    return run_stage(run, "shards", fingerprint(data), lambda: ingest.run(run, data), resumable=True), data


@pytest.mark.parametrize("where", ["local", "memory"])
def test_captions_txt_rows_quarantine_and_report(where, tmp_path, memory_root):
    root = str(tmp_path / "ds") if where == "local" else f"{memory_root}/ds"
    run = RunDir(str(tmp_path / "run") if where == "local" else f"{memory_root}/run")
    expected = write_captions_txt(root, broken=True)

    record, _ = _ingest(run, source=root, shard_rows=4)

    table = run.read_table("shards")
    assert table.schema.equals(CANONICAL_SCHEMA)
    assert table.num_rows == expected["written"] == record["rows_out"]
    assert [pq.ParquetFile(run.fs.open(f, "rb")).metadata.num_rows for f in run.parquet_files("shards")] == [4, 2]
    rows = table.to_pylist()
    first = rows[0]
    assert first["sample_id"] == make_sample_id("ds:captions-txt", "forest_0.png")
    assert first["label"] == "Forest" and first["task"] == "caption" and first["image_format"] == "png"
    assert (first["width"], first["height"]) == (24, 16)
    assert first["captions"] == ["a forest scene number 0"] * 5 and first["text"] == first["captions"][0]
    assert {r["split"] for r in rows} <= {"train", "test"}

    quarantine = run.read_table("shards", "quarantine")
    assert quarantine.schema.equals(QUARANTINE_SCHEMA)
    reasons = {}
    for q in quarantine.to_pylist():
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        assert q["source"] == "captions/train_caps.txt" and q["detail"].startswith("line ")
    assert reasons == expected["bad"]

    report = run.read_json("shards", "ingest_report.json")
    assert report["read"] == report["written"] + report["quarantined"] == record["rows_in"] == 12
    assert report["quarantined_by_reason"] == expected["bad"] == record["quarantined_by_reason"]
    assert report["format"] == "captions-txt" and report["notes"]["captions_txt_layouts"] == {"captions/train_filename.txt": "per-image"}
    assert sum(record["splits"].values()) == report["written"]


def test_ids_do_not_depend_on_location(tmp_path):
    write_captions_txt(str(tmp_path / "a" / "ds"))
    write_captions_txt(str(tmp_path / "b" / "ds"))
    ids = []
    for side in "ab":
        run = RunDir(str(tmp_path / f"run-{side}"))
        _ingest(run, source=str(tmp_path / side / "ds"))
        ids.append(run.read_table("shards", columns=["sample_id", "split"]).to_pylist())
    assert ids[0] == ids[1]


def test_test_files_give_the_split_and_the_per_caption_layout(tmp_path):
    root = str(tmp_path / "ds")
    write_captions_txt(root, n_per_class=2)
    put(f"{root}/images/Forest/t1.png", open(f"{root}/images/Forest/forest_0.png", "rb").read())
    put(f"{root}/images/Harbor/t2.png", open(f"{root}/images/Harbor/harbor_0.png", "rb").read())
    put(f"{root}/captions/test_filename.txt", "t1.png\nt1.png\nt2.png\nt2.png\nt2.png\n")
    put(f"{root}/captions/test_caps.txt", "one\ntwo\nthree\nfour\nfour\n")
    run = RunDir(str(tmp_path / "run"))
    record, _ = _ingest(run, source=root)
    rows = {json.loads(r["meta"])["key"]: r for r in run.read_table("shards").to_pylist()}
    assert rows["t1.png"]["captions"] == ["one", "two"] and rows["t2.png"]["captions"] == ["three", "four", "four"]
    assert rows["t1.png"]["split"] == "test" and rows["forest_0.png"]["split"] == "train"
    assert record["splits"]["test"] == 2 and record["splits"]["train"] == 4
    layouts = run.read_json("shards", "ingest_report.json")["notes"]["captions_txt_layouts"]
    assert layouts == {"captions/test_filename.txt": "per-caption", "captions/train_filename.txt": "per-image"}
    # t1/t2 repeat the bytes of forest_0/harbor_0 but not their text: not exact duplicates
    assert record["duplicates"] == 0


def test_exact_duplicates_are_flagged_not_dropped(tmp_path):
    root = str(tmp_path / "ds")
    write_captions_txt(root, n_per_class=1, classes=("Forest",))
    put(f"{root}/images/Forest/copy.png", open(f"{root}/images/Forest/forest_0.png", "rb").read())
    put(f"{root}/captions/train_filename.txt", "forest_0.png\ncopy.png\n")
    put(f"{root}/captions/train_caps.txt", "same words\n" * 10)
    run = RunDir(str(tmp_path / "run"))
    record, _ = _ingest(run, source=root)
    rows = run.read_table("shards").to_pylist()
    assert record["duplicates"] == 1 and len(rows) == 2
    assert json.loads(rows[1]["meta"])["duplicate_of"] == rows[0]["sample_id"]


def test_missing_images_root_is_one_clear_error_before_any_work(tmp_path):
    root = tmp_path / "ds"
    put(f"{root}/captions/train_filename.txt", "a.png\n")
    put(f"{root}/captions/train_caps.txt", "x\n")
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(IngestError, match=r"data.images: images root .*ds/images does not exist"):
        ingest.run(run, DataConfig(source=str(root)))
    assert not run.parquet_files("shards")


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="data.engine"):
        DataConfig(engine="spark")
    with pytest.raises(ConfigError, match="data.columns"):
        DataConfig(columns={"picture": "img"})
    for bad in (0, True, 2.5):
        with pytest.raises(ConfigError, match="data.captions_per_image"):
            DataConfig(captions_per_image=bad)


def test_test_offset_moves_the_held_out_window(tmp_path):
    """The default split holds out hash fractions in [0, f); test_offset o holds out [o, o + f)
    (mod 1): a second fixed split, disjoint from the first when o >= f, unchanged at o = 0."""
    from rsdist.core.schema import hash_fraction, hash_split

    write_captions_txt(str(tmp_path / "ds"))
    splits = {}
    for offset in (0.0, 0.5, 0.9):
        run = RunDir(str(tmp_path / f"run-{offset}"))
        _ingest(run, source=str(tmp_path / "ds"), test_fraction=0.4, test_offset=offset)
        splits[offset] = {r["sample_id"]: r["split"] for r in run.read_table("shards", columns=["sample_id", "split"]).to_pylist()}
    for offset, split in splits.items():
        assert 0 < list(split.values()).count("test") < len(split), offset  # both sides non-empty: the checks below bite
        for sid, s in split.items():
            h = hash_fraction(sid)
            inside = offset <= h < offset + 0.4 or (offset + 0.4 > 1 and h < offset + 0.4 - 1)
            assert (s == "test") == inside == (hash_split(sid, 0.4, offset) == "test")
    assert not {s for s, v in splits[0.0].items() if v == "test"} & {s for s, v in splits[0.5].items() if v == "test"}
    assert (hash_split("x", 0.1) == "test") == (hash_fraction("x") < 0.1)
    with pytest.raises(ConfigError, match="data.test_offset: 1.0 must be a fraction in"):
        DataConfig(test_offset=1.0)


def test_a_new_test_offset_on_a_finished_run_splits_again(tmp_path):
    """The same run directory ingested again with another offset is not skipped (the stage's
    fingerprint and the chunk markers carry the offset): the split follows the new window."""
    from rsdist.core.schema import hash_split

    write_captions_txt(str(tmp_path / "ds"))
    run = RunDir(str(tmp_path / "run"))
    _ingest(run, source=str(tmp_path / "ds"), test_fraction=0.4)
    record, _ = _ingest(run, source=str(tmp_path / "ds"), test_fraction=0.4, test_offset=0.5)
    assert not record.get("skipped")
    rows = run.read_table("shards", columns=["sample_id", "split"]).to_pylist()
    assert all(r["split"] == hash_split(r["sample_id"], 0.4, 0.5) for r in rows)
    again, _ = _ingest(run, source=str(tmp_path / "ds"), test_fraction=0.4, test_offset=0.5)
    assert again.get("skipped")


def test_val_fraction_holds_out_the_window_after_the_test_one(tmp_path):
    """data.val_fraction v marks [o + f, o + f + v) (mod 1) as 'val'; the test window is unchanged,
    and without it the chunks are those of a run made before the setting existed."""
    from rsdist.ingest.stage import chunk_settings, open_source
    from rsdist.core.schema import hash_fraction, hash_split

    write_captions_txt(str(tmp_path / "ds"))
    run = RunDir(str(tmp_path / "run"))
    record, data = _ingest(run, source=str(tmp_path / "ds"), test_fraction=0.3, test_offset=0.8, val_fraction=0.3)
    rows = run.read_table("shards", columns=["sample_id", "split"]).to_pylist()
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert all(counts.values()), counts  # every split non-empty: the checks below bite
    assert record["splits"]["val"] == counts["val"]
    for r in rows:
        position = (hash_fraction(r["sample_id"]) - 0.8) % 1.0
        expected = "test" if position < 0.3 else "val" if position < 0.6 else "train"
        assert r["split"] == expected == hash_split(r["sample_id"], 0.3, 0.8, 0.3)
    plain = DataConfig(source=str(tmp_path / "ds"))
    assert "val_fraction" not in chunk_settings(open_source(plain), plain)
    assert chunk_settings(open_source(data), data)["val_fraction"] == 0.3
