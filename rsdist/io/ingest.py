"""Ingest stage: a source in any supported format -> canonical parquet shards, nothing lost.

Input:  `data.source` (fsspec URI or path, file or folder), `data.format` ('auto' detects),
        `data.images` (images root; default `<source>/images`, or the source itself for
        scene-folders without an `images/` folder).
Output: `<run>/shards/part-NNNNN.parquet`   CANONICAL_SCHEMA, `data.shard_rows` rows each (the
                                            last one may be shorter), in source order
        `<run>/shards/quarantine/*.parquet` QUARANTINE_SCHEMA: source file, record key, reason
                                            code, detail (with the line or position)
        `<run>/shards/ingest_report.json`   read, written, quarantined (by reason), duplicates,
                                            format, splits, notes; read = written + quarantined
Resources: the driver enumerates records (metadata only) and writes shards; reading and fully
decoding images runs on Ray Data tasks (`Resources(num_cpus=1)` each) when a window of records
is large enough and Ray is up, else in-process. Either way the output is identical.

Resume: after each shard the driver atomically writes `_progress.json` (records done, counters);
a re-run with the same settings (run_stage(..., resumable=True)) re-enumerates the source
(deterministic order), skips the records already persisted and rewrites any later file under the
same name, so no row is written twice and the totals equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections import Counter
from typing import Iterable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from rsdist.config import DataConfig
from rsdist.io.images import ImageTooLarge, UnreadableImage, inspect_image
from rsdist.io.readers import (
    FORMATS,
    NEEDS_IMAGES_ROOT,
    READERS,
    Bad,
    ImageIndex,
    IngestError,
    Item,
    Record,
    Source,
    detect_format,
    item_from_json,
)
from rsdist.io.rundir import RunDir
from rsdist.io.schema import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, empty_row, hash_fraction, make_sample_id
from rsdist.stage import Resources, StageResult

log = logging.getLogger("rsdist")

STAGE = "shards"
PROGRESS = "_progress.json"
REPORT = "ingest_report.json"
RESOURCES = Resources(num_cpus=1.0)
WINDOW = 8192  # records handed to one Ray Data pass; bounds the driver's memory

# What a materialize step returns per record: a canonical row, or (with _reason set) a quarantine row.
OUT_SCHEMA = pa.schema(
    list(CANONICAL_SCHEMA)
    + [pa.field("_content", pa.string()), pa.field("_qsource", pa.string()), pa.field("_qkey", pa.string()),
       pa.field("_reason", pa.string()), pa.field("_detail", pa.string())]
)

__all__ = ["run", "open_source", "iter_items", "materialize", "IngestError"]


# --- opening the source ------------------------------------------------------------------------


def open_source(data: DataConfig) -> Source:
    """Resolve the source, its format and its images root; fail with one clear line before any work."""
    fs, path = fsspec.core.url_to_fs(data.source)
    path = path.rstrip("/") or path
    if not fs.exists(path):
        raise IngestError(f"data.source: {data.source} does not exist")
    fmt = detect_format(fs, path) if data.format == "auto" else data.format
    if fmt not in READERS:
        raise IngestError(f"data.format: {fmt!r} cannot be ingested; one of: {', '.join(FORMATS)}")
    is_dir = fs.isdir(path)
    base = posixpath.basename(path) if is_dir else posixpath.splitext(posixpath.basename(path))[0]
    src = Source(fs=fs, path=path, name=f"{base}:{fmt}", format=fmt, columns=dict(data.columns or {}))
    if fmt in NEEDS_IMAGES_ROOT or fmt == "llava-json":
        src.images = _open_images_root(data, fs, path, is_dir, fmt)
    log.info("ingest: %s as %s%s", data.source, fmt, f", {len(src.images)} files under the images root" if src.images else "")
    return src


def _open_images_root(data: DataConfig, fs, path: str, is_dir: bool, fmt: str) -> Optional[ImageIndex]:
    if data.images:
        ifs, root = fsspec.core.url_to_fs(data.images)
        given = data.images
    else:
        ifs, root = fs, posixpath.join(path if is_dir else posixpath.dirname(path), "images")
        given = fs.unstrip_protocol(root)
        if fmt == "scene-folders" and not fs.exists(root):
            root, given = path, fs.unstrip_protocol(path)
    if not ifs.isdir(root):
        if fmt == "llava-json" and not data.images:
            return ImageIndex(ifs, root) if ifs.exists(root) else _MissingRoot(ifs, root)
        raise IngestError(f"data.images: images root {given} does not exist (set data.images)")
    return ImageIndex(ifs, root)


class _MissingRoot(ImageIndex):
    """Instruction data may be text-only; an image reference without an images root is an error."""

    def __init__(self, fs, root: str):
        self.fs, self.root, self.by_rel, self.by_name = fs, root, {}, {}

    def resolve(self, name: str) -> Optional[str]:
        raise IngestError(f"data.images: a record names image {name!r} but the images root {self.fs.unstrip_protocol(self.root)} does not exist")


def iter_items(src: Source) -> Iterator[Item]:
    """The source's records in a fixed order, with repeated keys turned into `duplicate-key`."""
    seen: set[str] = set()
    for item in READERS[src.format](src):
        if isinstance(item, Record):
            if item.key in seen:
                item = Bad(item.key, item.file, item.line, "duplicate-key", "key already seen earlier in the source")
            else:
                seen.add(item.key)
        yield item


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


def materialize(item: Item, source_name: str, test_fraction: float, max_image_bytes: int) -> dict:
    """One record -> one OUT_SCHEMA row: a canonical row, or a quarantine row with its reason."""
    if isinstance(item, Bad):
        return _quarantine_row(item.file, item.key, item.line, item.reason, item.detail)
    rec = item
    row = empty_row()
    meta = dict(rec.meta)
    data = None
    if rec.image or rec.blob:
        try:
            if rec.image:
                with fsspec.open(rec.image, "rb") as f:
                    data = f.read(max_image_bytes + 1)
            else:
                data = _read_blob(rec.blob)
        except FileNotFoundError as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "missing-image", str(e))
        except OSError as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "unreadable-image", f"{type(e).__name__}: {e}")
        if len(data) > max_image_bytes:
            return _quarantine_row(rec.file, rec.key, rec.line, "too-large", f"image over data.max_image_bytes={max_image_bytes}")
        try:
            info = inspect_image(data)
        except ImageTooLarge as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "too-large", str(e))
        except UnreadableImage as e:
            return _quarantine_row(rec.file, rec.key, rec.line, "unreadable-image", str(e))
        data = info.data
        row.update(image=info.data, image_format=info.format, width=info.width, height=info.height)
        meta.update(info.meta)
    sid = make_sample_id(source_name, rec.key)
    split = rec.split or ("test" if hash_fraction(sid) < test_fraction else "train")
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


def materialize_batch(batch: pa.Table, source_name: str, test_fraction: float, max_image_bytes: int) -> pa.Table:
    """Ray Data `map_batches` body: a batch of JSON-encoded items -> OUT_SCHEMA rows, in order."""
    rows = [materialize(item_from_json(j), source_name, test_fraction, max_image_bytes) for j in batch.column("item").to_pylist()]
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# --- engines -----------------------------------------------------------------------------------


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    window: list[Item] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _use_ray(data: DataConfig, src: Source, n: int) -> bool:
    if data.engine == "local":
        return False
    import ray

    local_only = any(p in ("memory",) for p in _protocols(src))
    if data.engine == "ray":
        if local_only:
            raise IngestError(f"data.engine: 'ray' cannot read {src.url(src.path)}: an in-process filesystem is invisible to Ray workers")
        return True
    return ray.is_initialized() and not local_only and n >= data.parallel_min_records


def _protocols(src: Source) -> set[str]:
    protos = src.fs.protocol if isinstance(src.fs.protocol, tuple) else (src.fs.protocol,)
    if src.images is not None:
        p = src.images.fs.protocol
        protos = protos + (p if isinstance(p, tuple) else (p,))
    return set(protos)


def _materialize_window(window: list[Item], src: Source, data: DataConfig) -> Iterator[dict]:
    """Materialize a window of items in order, on Ray Data when it pays, else in this process."""
    args = (src.name, data.test_fraction, data.max_image_bytes)
    if not _use_ray(data, src, len(window)):
        for item in window:
            yield materialize(item, *args)
        return
    import ray

    ctx = ray.data.DataContext.get_current()
    keep_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = max(1, min(len(window) // 64, cpus * 4))
        ds = ray.data.from_items([{"item": it.to_json()} for it in window], override_num_blocks=blocks)
        ds = ds.map_batches(materialize_batch, batch_format="pyarrow", batch_size=64, num_cpus=RESOURCES.num_cpus,
                            fn_kwargs=dict(source_name=args[0], test_fraction=args[1], max_image_bytes=args[2]))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from batch.to_pylist()
    finally:
        ctx.execution_options.preserve_order = keep_order


# --- the stage ---------------------------------------------------------------------------------


class _ShardWriter:
    """Buffers rows and quarantine entries, writes them atomically, and checkpoints progress."""

    def __init__(self, run: RunDir, shard_rows: int, state: dict):
        self.run, self.shard_rows, self.state = run, shard_rows, state
        self.rows: list[dict] = []
        self.bad: list[dict] = []
        self.qpart = 0
        self.pending_items = 0

    def add(self, row: dict, seen_content: dict) -> None:
        s = self.state
        self.pending_items += 1
        s["read"] += 1
        if row.get("_reason"):
            log.warning("ingest: quarantined %s %s (key %s): %s: %s", s["source"], row["_qsource"], row["_qkey"], row["_reason"], row["_detail"])
            self.bad.append({"source": row["_qsource"], "key": row["_qkey"], "reason": row["_reason"], "detail": row["_detail"]})
            s["quarantined_by_reason"][row["_reason"]] = s["quarantined_by_reason"].get(row["_reason"], 0) + 1
            if len(self.bad) >= self.shard_rows:
                self._write_quarantine()
        else:
            first = seen_content.setdefault(row["_content"], row["sample_id"])
            if first != row["sample_id"]:
                s["duplicates"] += 1
                meta = json.loads(row["meta"])
                meta["duplicate_of"] = first
                row["meta"] = json.dumps(meta, sort_keys=True)
            s["written"] += 1
            s["splits"][row["split"]] = s["splits"].get(row["split"], 0) + 1
            self.rows.append({k: row[k] for k in CANONICAL_SCHEMA.names})
            if len(self.rows) >= self.shard_rows:
                self.checkpoint()

    def _write_quarantine(self) -> None:
        if self.bad:
            table = pa.Table.from_pylist(self.bad, schema=QUARANTINE_SCHEMA)
            self.run.write_table(table, STAGE, "quarantine", f"part-{self.state['shards']:05d}-{self.qpart:03d}.parquet")
            self.bad, self.qpart = [], self.qpart + 1

    def checkpoint(self) -> None:
        """Write the buffered shard and quarantine, then the progress record that covers them."""
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=CANONICAL_SCHEMA)
            self.run.write_table(table, STAGE, f"part-{self.state['shards']:05d}.parquet")
        self._write_quarantine()
        if self.rows:
            self.state["shards"] += 1
        self.rows, self.qpart = [], 0
        self.state["items_done"] += self.pending_items
        self.pending_items = 0
        self.run.write_json(self.state, STAGE, PROGRESS)
        log.info("ingest: %d records read, %d written, %d quarantined", self.state["read"], self.state["written"], self.state["read"] - self.state["written"])


def _fresh_state(src: Source) -> dict:
    return {"source": src.name, "format": src.format, "items_done": 0, "shards": 0, "read": 0, "written": 0,
            "quarantined_by_reason": {}, "duplicates": 0, "splits": {}}


def _resume_state(run: RunDir, src: Source) -> tuple[dict, dict]:
    """Progress of an interrupted run (or a fresh one), and the content hashes already written."""
    if not run.exists(STAGE, PROGRESS):
        return _fresh_state(src), {}
    state = run.read_json(STAGE, PROGRESS)
    if state.get("source") != src.name:
        return _fresh_state(src), {}
    _remove_files_after(run, state["shards"])
    seen: dict = {}
    for batch in run.iter_batches(STAGE, columns=["sample_id", "meta"]):
        for sid, meta in zip(batch.column("sample_id").to_pylist(), batch.column("meta").to_pylist()):
            seen.setdefault(json.loads(meta)["content_sha1"], sid)
    log.info("ingest: resuming after %d records (%d shards already written)", state["items_done"], state["shards"])
    return state, seen


def _remove_files_after(run: RunDir, shards: int) -> None:
    """Drop shard and quarantine files a killed run wrote past its last checkpoint."""
    for folder in (STAGE, posixpath.join(STAGE, "quarantine")):
        for f in run.parquet_files(folder):
            stem = posixpath.basename(f)[len("part-"):].split(".")[0]
            if int(stem.split("-")[0]) >= shards:
                run.fs.rm(f)


def run(run: RunDir, data: DataConfig) -> StageResult:
    """Ingest `data.source` into `<run>/shards` (see the module docstring for the contract)."""
    src = open_source(data)
    state, seen_content = _resume_state(run, src)
    writer = _ShardWriter(run, data.shard_rows, state)
    items = iter_items(src)
    for _ in range(state["items_done"]):  # the enumeration is deterministic: skip what is persisted
        next(items)
    for window in _windows(items, WINDOW):
        for row in _materialize_window(window, src, data):
            writer.add(row, seen_content)
    writer.checkpoint()
    quarantined = state["read"] - state["written"]
    report = {
        "source": data.source, "source_name": src.name, "format": src.format, "read": state["read"],
        "written": state["written"], "quarantined": quarantined,
        "quarantined_by_reason": dict(sorted(state["quarantined_by_reason"].items())),
        "duplicates": state["duplicates"], "splits": dict(sorted(state["splits"].items())),
        "shards": state["shards"], "notes": src.notes,
    }
    assert report["read"] == report["written"] + sum(report["quarantined_by_reason"].values())
    run.write_json(report, STAGE, REPORT)
    log.info("ingest: %s: read %d, written %d, quarantined %d %s, exact duplicates %d, splits %s", src.name, report["read"],
             report["written"], quarantined, report["quarantined_by_reason"], report["duplicates"], report["splits"])
    extra = {k: report[k] for k in ("format", "quarantined", "quarantined_by_reason", "duplicates")}
    extra["splits"] = {"train": report["splits"].get("train", 0), "test": report["splits"].get("test", 0), **report["splits"]}
    return StageResult(rows_in=report["read"], rows_out=report["written"], extra=extra)
