"""Worker side of ingest: one chunk of records -> one shard, its quarantine, and its marker.

Input:  a chunk of records (`Record`/`Bad`, metadata only), `data.shard_rows` of them, numbered
        from 0 in source order; on Ray, read from the chunk's plan file `<run>/shards/_plan/NNNNN.jsonl`.
Output: `<run>/shards/part-NNNNN.parquet`             its canonical rows (none: no file)
        `<run>/shards/quarantine/part-NNNNN.parquet`  its quarantined records (none: no file)
        `<run>/shards/_chunks/part-NNNNN.json`        the chunk's counts and content-hash
                                                      prefixes, written last: the chunk is done
Every file is written atomically under a name fixed by the chunk number, so a chunk that runs
twice (a resumed or retried task) leaves exactly the files of one run.
Resources: the reading, full decoding and shard writing of one chunk runs in one task
(`Resources(num_cpus=1)`), or in the driver with engine 'local'.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsdist.ingest.images import ImageTooLarge, UnreadableImage, inspect_image
from rsdist.ingest.readers import Bad, Item, Record, item_from_json, outside_root
from rsdist.core.rundir import RunDir
from rsdist.core.schema import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, empty_row, hash_split, make_sample_id

log = logging.getLogger("rsdist")

FOLDER = "shards"
CHUNKS = "_chunks"
PLAN = "_plan"


def shard_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def marker_name(chunk: int) -> str:
    return f"part-{chunk:05d}.json"


def plan_name(chunk: int) -> str:
    return f"part-{chunk:05d}.jsonl"


# --- reading one record's image ----------------------------------------------------------------

_PARQUET_CACHE: dict = {}


def _read_blob(blob: list) -> bytes:
    kind, url = blob[0], blob[1]
    if kind == "tar":
        offset, size = blob[2], blob[3]
        with fsspec.open(url, "rb") as f:
            f.seek(offset)
            return f.read(size)
    if kind == "parquet":
        rg, row, column = blob[2], blob[3], blob[4]
        cache_key = (url, rg, column)
        if cache_key not in _PARQUET_CACHE:
            _PARQUET_CACHE.clear()  # one row group per worker process at a time
            with fsspec.open(url, "rb") as f:
                _PARQUET_CACHE[cache_key] = pq.ParquetFile(f).read_row_group(rg, columns=[column]).column(0)
        value = _PARQUET_CACHE[cache_key][row].as_py()
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                raise FileNotFoundError(f"image given only as path {value['path']!r}")
            return b""
        return value or b""
    raise ValueError(f"unknown inline image kind {kind!r}")


def materialize(item: Item, source_name: str, test_fraction: float, max_image_bytes: int, test_offset: float = 0.0, val_fraction: float = 0.0) -> dict:
    """One record -> a canonical row (plus `_content`), or a quarantine row (`_reason` set)."""
    if isinstance(item, Bad):
        return _quarantine_row(item.file, item.key, item.line, item.reason, item.detail)
    rec = item
    row = empty_row()
    meta = dict(rec.meta)
    data = None
    if rec.image or rec.blob:
        elsewhere = outside_root(rec.image, rec.root) if rec.image else None
        if elsewhere is not None:
            return _quarantine_row(rec.file, rec.key, rec.line, "outside-root", f"{rec.image} now leads to {elsewhere}, outside the images root; not opened")
        try:
            if rec.image:
                with fsspec.open(rec.image, "rb") as f:
                    data = f.read(max_image_bytes + 1)
            else:
                data = _read_blob(rec.blob)
        except FileNotFoundError as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "missing-image", str(e))
        except Exception as e:  # OSError, or a damaged shard (pyarrow, tar) under the record
            return _quarantine_row(rec.file, rec.key, rec.line, "unreadable-image", f"{type(e).__name__}: {e}"[:300])
        if not isinstance(data, (bytes, bytearray)):
            return _quarantine_row(rec.file, rec.key, rec.line, "unreadable-image", f"image value is {type(data).__name__}, not bytes")
        if len(data) > max_image_bytes:
            return _quarantine_row(rec.file, rec.key, rec.line, "too-large", f"image over data.max_image_bytes={max_image_bytes}")
        try:
            info = inspect_image(data)
        except ImageTooLarge as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "too-many-pixels", str(e))
        except UnreadableImage as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "unreadable-image", str(e))
        data = info.data
        row.update(image=info.data, image_format=info.format, width=info.width, height=info.height)
        meta.update(info.meta)
    sid = make_sample_id(source_name, rec.key)
    split = rec.split or hash_split(sid, test_fraction, test_offset, val_fraction)
    content = _content_hash(data, rec)
    meta.update(key=rec.key, content_sha1=content)
    row.update(sample_id=sid, task=rec.task, text=rec.text, captions=rec.captions, answer=rec.answer,
               conversations=rec.conversations, label=rec.label, split=split, source=source_name,
               meta=json.dumps(meta, sort_keys=True), _content=content)
    return row


def _content_hash(image: Optional[bytes], rec: Record) -> str:
    h = hashlib.sha1(image or b"")
    text = {"text": rec.text, "captions": rec.captions, "answer": rec.answer, "conversations": rec.conversations}
    h.update(b"\x00" + json.dumps(text, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _quarantine_row(file: str, key: str, line: int, reason: str, detail: str) -> dict:
    where = f"line {line}" if line else "file"
    return {"_qsource": file, "_qkey": key, "_reason": reason, "_detail": f"{where}: {detail}"}


# --- one chunk ---------------------------------------------------------------------------------


def write_chunk(run: RunDir, chunk: int, items: list[Item], settings: dict) -> dict:
    """Materialize `items`, write the chunk's shard and quarantine, then its marker; return the marker.

    `settings`: source_name, test_fraction, max_image_bytes and optionally test_offset and
    val_fraction (as in `ingest.chunk_settings`).
    """
    rows, bad, content = [], [], []
    reasons: dict[str, int] = {}
    splits: dict[str, int] = {}
    for item in items:
        row = materialize(item, settings["source_name"], settings["test_fraction"], settings["max_image_bytes"],
                          settings.get("test_offset", 0.0), settings.get("val_fraction", 0.0))
        if row.get("_reason"):
            log.warning("ingest: quarantined %s (key %s): %s: %s", row["_qsource"], row["_qkey"], row["_reason"], row["_detail"])
            bad.append({"source": row["_qsource"], "key": row["_qkey"], "reason": row["_reason"], "detail": row["_detail"]})
            reasons[row["_reason"]] = reasons.get(row["_reason"], 0) + 1
            continue
        content.append(row["_content"][:16])
        splits[row["split"]] = splits.get(row["split"], 0) + 1
        rows.append({k: row[k] for k in CANONICAL_SCHEMA.names})
    if rows:
        run.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), FOLDER, shard_name(chunk))
    if bad:
        run.write_table(pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA), FOLDER, "quarantine", shard_name(chunk))
    marker = {"chunk": chunk, "read": len(items), "written": len(rows), "quarantined_by_reason": reasons,
              "splits": splits, "content": content}
    run.write_json(marker, FOLDER, CHUNKS, marker_name(chunk))
    return marker


def write_plan(run: RunDir, chunk: int, items: list[Item]) -> None:
    """The chunk's records as JSON lines, for the task that will write its shard."""
    run.write_text("".join(item.to_json() + "\n" for item in items), FOLDER, PLAN, plan_name(chunk))


def read_plan(run: RunDir, chunk: int) -> list[Item]:
    with run.fs.open(run.path(FOLDER, PLAN, plan_name(chunk)), "rb") as f:
        return [item_from_json(line) for line in f.read().decode("utf-8").splitlines() if line]


def write_planned_chunks(batch: dict, run: RunDir, settings: dict) -> dict:
    """Ray Data `map_batches` body: chunk numbers -> their markers (as JSON), shards written here."""
    markers = [write_chunk(run, int(c), read_plan(run, int(c)), settings) for c in batch["chunk"]]
    return {"marker": np.array([json.dumps(m) for m in markers], dtype=object)}
