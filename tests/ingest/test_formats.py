"""Every source format, written by the test itself (with broken records), ingested and accounted for."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsdist.config import DataConfig
from rsdist.ingest import stage as ingest
from rsdist.ingest.readers import IngestError, detect_format
from rsdist.core.rundir import RunDir
from tests.ingest.conftest import geotiff_bytes, image_bytes, put, write_json


def _run(tmp_path, source, **kw):
    run = RunDir(str(tmp_path / "run"))
    result = ingest.run(run, DataConfig(source=source, engine="local", **kw))
    rows = run.read_table("shards").to_pylist() if run.parquet_files("shards") else []
    quarantine = run.read_table("shards", "quarantine").to_pylist() if run.parquet_files("shards", "quarantine") else []
    assert result.rows_in == result.rows_out + len(quarantine) and result.rows_out == len(rows)
    return result, rows, {q["reason"] for q in quarantine}


def _images(root, names, fmt="PNG"):
    for n in names:
        put(f"{root}/images/{n}", image_bytes(fmt))


def test_scene_folders(tmp_path):
    root = tmp_path / "ucm"
    put(f"{root}/images/denseResidential/a.tif", image_bytes("TIFF"))
    put(f"{root}/images/denseResidential/b.webp", image_bytes("WEBP"))
    put(f"{root}/images/River/c.jpg", image_bytes("JPEG"))
    put(f"{root}/images/River/d.jpg", b"")
    put(f"{root}/images/River/notes.txt", b"not an image by extension")
    assert detect_format(*__import__("fsspec").core.url_to_fs(str(root))) == "scene-folders"
    result, rows, reasons = _run(tmp_path, str(root))
    assert [(r["label"], r["task"], r["text"], r["image_format"]) for r in rows] == [
        ("River", "classification", "river", "jpeg"),
        ("denseResidential", "classification", "dense residential", "tiff"),
        ("denseResidential", "classification", "dense residential", "webp"),
    ]
    assert reasons == {"unreadable-image"} and result.extra["format"] == "scene-folders"


def test_karpathy_json(tmp_path):
    root = tmp_path / "rsicd"
    _images(root, ["airport_1.jpg", "beach_2.jpg"], "JPEG")
    write_json(f"{root}/dataset_rsicd.json", {"images": [
        {"filename": "airport_1.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "planes at a gate", "tokens": ["planes"]}] * 5},
        {"filename": "beach_2.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "waves", "tokens": ["waves"]}, {"raw": "sand"}]},
        {"filename": "lost.jpg", "imgid": 2, "split": "val", "sentences": [{"raw": "x"}]},
        {"filename": "beach_2.jpg", "imgid": 3, "split": "train", "sentences": [{"raw": "again"}]},
        {"filename": "airport_1.jpg", "imgid": 4, "split": "restval", "sentences": [{"raw": " "}]},
    ]})
    result, rows, reasons = _run(tmp_path, str(root))
    assert result.extra["format"] == "karpathy-json"
    assert [(r["split"], r["captions"]) for r in rows] == [("train", ["planes at a gate"] * 5), ("test", ["waves", "sand"])]
    assert reasons == {"missing-image", "duplicate-key", "empty-text"} and result.rows_in == 5


def test_captions_jsonl_with_a_bad_line_names_the_line(tmp_path):
    root = tmp_path / "aug"
    _images(root, ["Airport/airport_1.jpg", "Beach/beach_1.jpg"], "JPEG")
    lines = [json.dumps({"filename": "rsicd_images/airport_1.jpg", "captions": ["a", "b"]}), "{not json",
             json.dumps({"filename": "beach_1.jpg", "captions": ["", ""]}), json.dumps({"filename": "beach_1.jpg", "caption": "one"})]
    put(f"{root}/textaug.jsonl", "\n".join(lines) + "\n")
    run = RunDir(str(tmp_path / "run"))
    result = ingest.run(run, DataConfig(source=f"{root}/textaug.jsonl", engine="local"))
    rows = run.read_table("shards").to_pylist()
    assert [(r["label"], r["captions"]) for r in rows] == [("Airport", ["a", "b"]), ("Beach", ["one"])]
    bad = {q["reason"]: q for q in run.read_table("shards", "quarantine").to_pylist()}
    assert set(bad) == {"bad-json", "empty-text"} and bad["bad-json"]["source"] == "textaug.jsonl"
    assert bad["bad-json"]["detail"].startswith("line 2:") and result.rows_in == 4


def test_coco_captions(tmp_path):
    root = tmp_path / "coco"
    _images(root, ["1.png", "2.png"])
    write_json(f"{root}/captions.json", {"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}, {"id": 3, "file_name": "3.png"}],
                                         "annotations": [{"image_id": 1, "caption": "c1"}, {"image_id": 1, "caption": "c2"}, {"image_id": 9, "caption": "orphan"}, {"image_id": 3, "caption": "c3"}]})
    result, rows, reasons = _run(tmp_path, str(root))
    assert result.extra["format"] == "coco-captions" and [r["captions"] for r in rows] == [["c1", "c2"]]
    assert result.extra["quarantined_by_reason"] == {"dangling-ref": 1, "empty-text": 1, "missing-image": 1}


def test_llava_json_keeps_turns_tags_and_text_only_rows(tmp_path):
    root = tmp_path / "geochat"
    _images(root, ["P0001.png"])
    convo = [{"from": "human", "value": "<image>\n[grounding] Where are the ships?"}, {"from": "gpt", "value": "{<12><40><30><70>|<0>}"},
             {"from": "human", "value": "[identify] What is {<1><2><3><4>}?"}, {"from": "gpt", "value": "a ship"}]
    write_json(f"{root}/instruct.json", [
        {"id": "P0001_a", "image": "P0001.png", "conversations": convo},
        {"id": "txt_1", "conversations": [{"from": "human", "value": "Define NDVI."}, {"from": "gpt", "value": "An index."}]},
        {"id": "P0001_b", "image": "P0001.png", "conversations": [{"from": "human", "value": ""}]},
        {"id": "P0002", "image": "P0002.png", "conversations": convo},
    ])
    result, rows, reasons = _run(tmp_path, str(root))
    assert result.extra["format"] == "llava-json" and reasons == {"empty-text", "missing-image"}
    first, text_only = rows
    assert first["conversations"] == convo and first["task"] == "instruction" and first["text"] == "[grounding] Where are the ships?"
    assert first["answer"] == "{<12><40><30><70>|<0>}" and first["image_format"] == "png"
    assert text_only["image"] is None and json.loads(text_only["meta"])["text_only"] is True


def test_rsvqa_honours_active_flags_and_reads_geotiff(tmp_path):
    root = tmp_path / "rsvqa"
    put(f"{root}/images/0.tif", geotiff_bytes(bands=4))
    put(f"{root}/images/1.tif", geotiff_bytes(bands=3))
    for split, qid0 in (("train", 0), ("test", 10)):
        write_json(f"{root}/LR_split_{split}_images.json", {"images": [{"id": 0, "questions_ids": [qid0, qid0 + 1], "active": True},
                                                                        {"id": 1, "questions_ids": [qid0 + 2], "active": split == "train"}]})
        write_json(f"{root}/LR_split_{split}_questions.json", {"questions": [
            {"id": qid0, "img_id": 0, "type": "presence", "question": "Is there a road?", "answers_ids": [qid0], "active": True},
            {"id": qid0 + 1, "img_id": 0, "type": "count", "question": "How many buildings?", "answers_ids": [qid0 + 1], "active": False},
            {"id": qid0 + 2, "img_id": 1, "type": "comp", "question": "Is it rural?", "answers_ids": [qid0 + 2], "active": True}]})
        write_json(f"{root}/LR_split_{split}_answers.json", {"answers": [{"id": qid0 + i, "question_id": qid0 + i, "answer": a, "active": True} for i, a in enumerate(["yes", "12", "no"])]})
    result, rows, reasons = _run(tmp_path, str(root))
    assert result.extra["format"] == "rsvqa" and reasons == {"inactive"}
    assert result.extra["quarantined_by_reason"] == {"inactive": 3}
    assert sorted((r["split"], r["text"], r["answer"]) for r in rows) == [("test", "Is there a road?", "yes"), ("train", "Is it rural?", "no"), ("train", "Is there a road?", "yes")]
    assert {r["image_format"] for r in rows} == {"png"} and json.loads(rows[0]["meta"])["source_dtype"] == "uint16"


def test_webdataset_tar_shards(tmp_path):
    root = tmp_path / "wds"
    buf = io.BytesIO()
    members = [("0001.jpg", image_bytes("JPEG")), ("0001.txt", b"a harbor with boats\n"), ("0002.png", image_bytes()),
               ("0002.json", json.dumps({"captions": ["x", "y"], "label": "Port"}).encode()), ("0003.txt", b"no image here"),
               ("0004.webp", image_bytes("WEBP")), ("0004.cls", b"Forest"), ("0005.jpg", b"\xff\xd8\xff garbage"), ("0005.txt", b"broken")]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    put(f"{root}/shard-000.tar", buf.getvalue())
    result, rows, reasons = _run(tmp_path, str(root))
    assert result.extra["format"] == "webdataset" and reasons == {"missing-image", "unreadable-image"}
    assert [(r["task"], r["text"], r["label"], r["image_format"]) for r in rows] == [
        ("caption", "a harbor with boats", None, "jpeg"), ("caption", "x", "Port", "png"), ("classification", "forest", "Forest", "webp")]


def test_parquet_with_column_mapping(tmp_path):
    root = tmp_path / "hf"
    table = pa.table({
        "img": [{"bytes": image_bytes(), "path": "a.png"}, {"bytes": None, "path": "b.png"}, {"bytes": b"junk", "path": "c.png"}, {"bytes": image_bytes("JPEG"), "path": "d.jpg"}],
        "caption": ["a field", "b", "c", None],
        "cls": ["Farmland", "x", "y", "Desert"],
        "uid": ["a", "b", "c", "d"],
    })
    put(f"{root}/train-00000.parquet", b"")
    with open(f"{root}/train-00000.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=2)
    with pytest.raises(IngestError, match="no image column 'image'"):
        _run(tmp_path, str(root))
    result, rows, reasons = _run(tmp_path, str(root), columns={"image": "img", "text": "caption", "label": "cls", "key": "uid"})
    assert result.extra["format"] == "parquet" and reasons == {"missing-image", "unreadable-image"}
    assert [(r["task"], r["text"], r["label"]) for r in rows] == [("caption", "a field", "Farmland"), ("classification", "desert", "Desert")]
