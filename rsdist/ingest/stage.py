"""Ingest stage: a source in any supported format -> canonical parquet shards, nothing lost.

Input:  `data.source` (fsspec URI or path, file or folder), `data.format` ('auto' detects),
        `data.images` (images root; default `<source>/images`, or the source itself for
        scene-folders without an `images/` folder).
Output: `<run>/shards/part-NNNNN.parquet`   CANONICAL_SCHEMA, in source order. Shard NNNNN holds
                                            the written rows of source records
                                            [NNNNN * shard_rows, (NNNNN + 1) * shard_rows): at
                                            most `data.shard_rows` rows; a run of records that
                                            are all quarantined leaves no file (numbers skip)
        `<run>/shards/quarantine/part-NNNNN.parquet`  QUARANTINE_SCHEMA: source file, record
                                            key, reason code, detail (with the line or position)
        `<run>/shards/_chunks/part-NNNNN.json`  per-chunk counts (the resume record)
        `<run>/shards/ingest_report.json`   read, written, quarantined (by reason), duplicates,
                                            format, splits, notes; read = written + quarantined
Rows that repeat an earlier row's image bytes and text carry `duplicate_of` (the first one's
sample_id) in `meta`; they are flagged, not dropped.
Bad input: a bad record is quarantined with a reason code (docs/ingest.md lists them); an input
that cannot be read as a whole, or only by guessing, raises `IngestError` (one line naming the
file, and the line where there is one), as does a source with no records or none ingestible.

Resources: the driver only enumerates records (metadata, streamed from the index files), plans
chunks and collects their counts. With Ray, one Ray Data task per chunk (`Resources(num_cpus=1)`)
reads the chunk's plan file, reads and fully decodes its images and writes its shard itself;
without Ray (or engine 'local') the driver does the same in-process. The output is identical.
Driver memory: 8 bytes per record key and 24 per written row (content-hash prefix and position),
plus the images-root listing and what an index layout forces (COCO captions grouped by image).

Resume: a chunk is done when its marker is on disk (written after its shard and quarantine, all
atomically, under names fixed by the chunk number). A re-run with the same settings
(run_stage(..., resumable=True)) re-enumerates the source in its deterministic order and runs only
the chunks without a marker, so no row is written twice and the totals equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Iterable, Iterator, Optional

import fsspec
import pyarrow as pa

from rsdist.config import DataConfig
from rsdist.ingest.dedup import ContentIndex, KeySet
from rsdist.ingest.materialize import (
    CHUNKS,
    PLAN,
    FOLDER,
    materialize,
    shard_name,
    write_chunk,
    write_plan,
    write_planned_chunks,
)
from rsdist.ingest.readers import FORMATS, NEEDS_IMAGES_ROOT, READERS, Bad, ImageIndex, IngestError, Item, Record, Source, detect_format
from rsdist.core.rundir import RunDir
from rsdist.stage import Resources, Stage, StageResult

log = logging.getLogger("rsdist")

REPORT = "ingest_report.json"
SETTINGS = "settings.json"  # in _chunks/: the settings the markers were written under
RESOURCES = Resources(num_cpus=1.0)

__all__ = ["run", "open_source", "iter_items", "materialize", "chunk_settings", "IngestError"]


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
    src = Source(fs=fs, path=path, name=f"{base}:{fmt}", format=fmt, columns=dict(data.columns or {}), captions_per_image=data.captions_per_image)
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
        self.fs, self.root, self.by_rel, self.by_name, self.ambiguous, self.outside, self.real_root = fs, root, {}, {}, set(), {}, None

    def resolve(self, name: str) -> str:
        raise IngestError(f"data.images: a record names image {name!r} but the images root {self.fs.unstrip_protocol(self.root)} does not exist")


def iter_items(src: Source) -> Iterator[Item]:
    """The source's records in a fixed order, with repeated keys turned into `duplicate-key` and
    text that cannot be stored as UTF-8 (a lone surrogate from a JSON escape) into `bad-encoding`."""
    seen = KeySet()
    for item in _read_index(src):
        if isinstance(item, Record):
            bad_field = _unencodable_field(item)
            if bad_field is not None:
                item = Bad(_printable(item.key), _printable(item.file), item.line, "bad-encoding", f"field {bad_field}: not valid Unicode text (a lone surrogate such as \\ud800)")
            elif not seen.add(item.key):
                item = Bad(item.key, item.file, item.line, "duplicate-key", "key already seen earlier in the source")
        else:
            item = Bad(_printable(item.key), _printable(item.file), item.line, item.reason, _printable(item.detail))
        yield item


def _read_index(src: Source) -> Iterator[Item]:
    """The format reader's items; an index file the filesystem refuses to read is one error line."""
    try:
        yield from READERS[src.format](src)
    except OSError as e:
        raise IngestError(f"{src.url(src.path)}: an index file cannot be read: {type(e).__name__}: {e}") from None


def _encodable(text) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text if _encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unencodable_field(rec: Record) -> Optional[str]:
    """The name of the first text field of `rec` that is not valid UTF-8, or None."""
    fields = [("key", rec.key), ("file", rec.file)] + [(f"captions[{k}]", c) for k, c in enumerate(rec.captions or [])]
    for k, turn in enumerate(rec.conversations or []):
        fields += [(f"conversations[{k}].from", turn["from"]), (f"conversations[{k}].value", turn["value"])]
    fields += [(name, getattr(rec, name)) for name in ("text", "answer", "label", "split", "image")]
    for name, value in fields:
        if isinstance(value, str) and not _encodable(value):
            return name
    return None


def iter_chunks(items: Iterable[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    """Consecutive runs of `size` records, numbered from 0: chunk k becomes shard k."""
    chunk: list[Item] = []
    number = 0
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield number, chunk
            chunk, number = [], number + 1
    if chunk:
        yield number, chunk


def chunk_settings(src: Source, data: DataConfig) -> dict:
    """Everything that decides a chunk's output; markers written under other settings are void."""
    settings = {"source_name": src.name, "format": src.format, "shard_rows": data.shard_rows,
                "test_fraction": data.test_fraction, "max_image_bytes": data.max_image_bytes}
    # Only when set, so chunks written before these settings existed stay valid.
    if data.captions_per_image != 5:
        settings["captions_per_image"] = data.captions_per_image
    if data.test_offset:
        settings["test_offset"] = data.test_offset
    if data.val_fraction:
        settings["val_fraction"] = data.val_fraction
    return settings


# --- engines -----------------------------------------------------------------------------------


def _ray_allowed(data: DataConfig, src: Source) -> bool:
    """Whether Ray may be used at all; engine 'ray' on an in-process filesystem is an error."""
    if data.engine == "local":
        return False
    import ray

    local_only = "memory" in _protocols(src)
    if data.engine == "ray":
        if local_only:
            raise IngestError(f"data.engine: 'ray' cannot read {src.url(src.path)}: an in-process filesystem is invisible to Ray workers")
        return True
    return ray.is_initialized() and not local_only


def _protocols(src: Source) -> set[str]:
    protos = src.fs.protocol if isinstance(src.fs.protocol, tuple) else (src.fs.protocol,)
    if src.images is not None:
        p = src.images.fs.protocol
        protos = protos + (p if isinstance(p, tuple) else (p,))
    return set(protos)


def _head(chunks: Iterator[tuple[int, list[Item]]], records: int) -> tuple[list, bool]:
    """Pull chunks until they hold `records` records; also say whether the source has more."""
    head, n = [], 0
    for chunk in chunks:
        head.append(chunk)
        n += len(chunk[1])
        if n >= records:
            return head, True
    return head, False


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def _run_local(run: RunDir, chunks: Iterable[tuple[int, list[Item]]], done: dict, settings: dict, totals: "_Totals") -> None:
    for number, items in chunks:
        if number not in done:
            totals.add(write_chunk(run, number, items, settings))


def _run_ray(run: RunDir, chunks: Iterable[tuple[int, list[Item]]], done: dict, settings: dict, totals: "_Totals") -> None:
    """Write a plan file per chunk to do, then one Ray Data pass in which each task writes its shard."""
    import ray

    todo = []
    for number, items in chunks:
        if number not in done:
            write_plan(run, number, items)
            todo.append(number)
    if not todo:
        return
    log.info("ingest: %d chunks planned; writing shards on Ray Data tasks", len(todo))
    ds = ray.data.from_items([{"chunk": n} for n in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(write_planned_chunks, batch_size=1, num_cpus=RESOURCES.num_cpus, fn_kwargs=dict(run=run, settings=settings))
    for row in ds.iter_rows():
        totals.add(json.loads(row["marker"]))


# --- counts, resume and exact duplicates -------------------------------------------------------


class _Totals:
    """Running counts over chunk markers, the content-hash index, and progress lines."""

    def __init__(self):
        self.state = {"read": 0, "written": 0, "quarantined_by_reason": {}, "splits": {}, "shards": 0, "chunks": 0}
        self.content = ContentIndex()
        self._last_log = time.monotonic()

    def add(self, marker: dict, quiet: bool = False) -> None:
        s = self.state
        s["read"] += marker["read"]
        s["written"] += marker["written"]
        s["chunks"] += 1
        s["shards"] += 1 if marker["written"] else 0
        for group in ("quarantined_by_reason", "splits"):
            for k, v in marker[group].items():
                s[group][k] = s[group].get(k, 0) + v
        self.content.add_chunk(marker["chunk"], marker["content"])
        if not quiet and time.monotonic() - self._last_log >= 5.0:
            self._last_log = time.monotonic()
            self.log_progress()

    def log_progress(self) -> None:
        s = self.state
        log.info("ingest: %d chunks, %d records read, %d written, %d quarantined", s["chunks"], s["read"], s["written"], s["read"] - s["written"])


def _done_chunks(run: RunDir, settings: dict) -> dict[int, dict]:
    """Markers of chunks an earlier run with the same settings finished; any other output is removed."""
    if run.exists(FOLDER, CHUNKS, SETTINGS) and run.read_json(FOLDER, CHUNKS, SETTINGS) == settings:
        done = {}
        for path in sorted(run.fs.ls(run.path(FOLDER, CHUNKS), detail=False)):
            name = posixpath.basename(path)
            if name.startswith("part-") and name.endswith(".json"):
                with run.fs.open(path, "rb") as f:
                    marker = json.loads(f.read())
                done[marker["chunk"]] = marker
        if done:
            log.info("ingest: resuming: %d chunks already written", len(done))
        return done
    for part in (CHUNKS, PLAN, "quarantine"):
        run.remove(FOLDER, part)
    for f in run.parquet_files(FOLDER):
        run.fs.rm(f)
    run.write_json(settings, FOLDER, CHUNKS, SETTINGS)
    return {}


def _flag_exact_duplicates(run: RunDir, content: ContentIndex) -> int:
    """Set `meta.duplicate_of` on every row whose image bytes and text repeat an earlier row's.

    Only rows whose 64-bit content prefix collides are looked at; their full content_sha1 decides.
    Only shards holding a duplicate are rewritten (atomically; a rewrite that would change nothing
    is skipped, so a resumed run repeats this step safely). Returns the number of duplicates.
    """
    groups = content.candidate_groups()
    if not groups:
        return 0
    wanted: dict[int, set[int]] = {}
    for group in groups:
        for chunk, row in group:
            wanted.setdefault(chunk, set()).add(row)
    found: dict[tuple[int, int], tuple[str, str]] = {}
    for chunk, rows in wanted.items():
        t = run.read_table(FOLDER, shard_name(chunk), columns=["sample_id", "meta"])
        sids, metas = t.column("sample_id").to_pylist(), t.column("meta").to_pylist()
        for r in rows:
            found[(chunk, r)] = (sids[r], json.loads(metas[r])["content_sha1"])
    by_chunk: dict[int, dict[int, str]] = {}
    for group in groups:
        firsts: dict[str, str] = {}
        for chunk, row in group:
            sid, sha = found[(chunk, row)]
            first = firsts.setdefault(sha, sid)
            if first != sid:
                by_chunk.setdefault(chunk, {})[row] = first
    for chunk, rows in sorted(by_chunk.items()):
        table = run.read_table(FOLDER, shard_name(chunk))
        metas = table.column("meta").to_pylist()
        changed = False
        for r, first in rows.items():
            meta = json.loads(metas[r])
            if meta.get("duplicate_of") != first:
                meta["duplicate_of"] = first
                metas[r] = json.dumps(meta, sort_keys=True)
                changed = True
        if changed:
            i = table.schema.get_field_index("meta")
            run.write_table(table.set_column(i, table.schema.field(i), pa.array(metas, pa.string())), FOLDER, shard_name(chunk))
    return sum(len(rows) for rows in by_chunk.values())


def _first_quarantined(run: RunDir) -> str:
    """'<file> <key>: <reason>: <detail>' of the first quarantined record, for an error line."""
    files = run.parquet_files(FOLDER, "quarantine")
    if not files:
        return "none"
    row = run.read_table(FOLDER, "quarantine", posixpath.basename(files[0])).slice(0, 1).to_pylist()[0]
    return f"{row['source']} (key {row['key']}): {row['reason']}: {row['detail']}"


# --- the stage ---------------------------------------------------------------------------------


def run(run: RunDir, data: DataConfig) -> StageResult:
    """Ingest `data.source` into `<run>/shards` (see the module docstring for the contract)."""
    src = open_source(data)
    settings = chunk_settings(src, data)
    done = _done_chunks(run, settings)
    totals = _Totals()
    for number in sorted(done):
        totals.add(done[number], quiet=True)
    chunks = iter_chunks(iter_items(src), data.shard_rows)
    use_ray = _ray_allowed(data, src)
    if use_ray and data.engine == "auto":
        head, use_ray = _head(chunks, data.parallel_min_records)
        chunks = _chain(head, chunks)
    log.info("ingest: shards written %s", "by Ray Data tasks" if use_ray else "in-process")
    (_run_ray if use_ray else _run_local)(run, chunks, done, settings, totals)
    totals.log_progress()
    duplicates = _flag_exact_duplicates(run, totals.content)
    run.remove(FOLDER, PLAN)
    state = totals.state
    quarantined = state["read"] - state["written"]
    report = {
        "source": data.source, "source_name": src.name, "format": src.format, "read": state["read"],
        "written": state["written"], "quarantined": quarantined,
        "quarantined_by_reason": dict(sorted(state["quarantined_by_reason"].items())),
        "duplicates": duplicates, "splits": dict(sorted(state["splits"].items())),
        "shards": state["shards"], "notes": src.notes,
    }
    if report["read"] != report["written"] + sum(report["quarantined_by_reason"].values()):
        raise RuntimeError(f"ingest: accounting broken: read {report['read']} != written {report['written']} + quarantined {report['quarantined_by_reason']}")
    run.write_json(report, FOLDER, REPORT)
    if report["read"] == 0:
        raise IngestError(f"data.source: {data.source} holds no {src.format} records; check data.source and data.format")
    if report["written"] == 0:
        raise IngestError(f"data.source: none of the {report['read']} records of {data.source} could be ingested "
                          f"(quarantined: {report['quarantined_by_reason']}; the first: {_first_quarantined(run)}); see {run.url(FOLDER, 'quarantine')}")
    log.info("ingest: %s: read %d, written %d, quarantined %d %s, exact duplicates %d, splits %s", src.name, report["read"],
             report["written"], quarantined, report["quarantined_by_reason"], report["duplicates"], report["splits"])
    extra = {k: report[k] for k in ("format", "quarantined", "quarantined_by_reason", "duplicates")}
    extra["splits"] = {"train": report["splits"].get("train", 0), "test": report["splits"].get("test", 0), **report["splits"]}
    return StageResult(rows_in=report["read"], rows_out=report["written"], extra=extra)


STAGE = Stage(name="ingest", folder=FOLDER, reads=(), section="data", resources=lambda data: RESOURCES, run=run, resumable=True)
