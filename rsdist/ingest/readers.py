"""Source formats -> a deterministic stream of records (metadata only) or bad records.

Each reader walks its format's index files and yields, in a fixed order, `Record`s (what one
canonical row needs, with the image as a resolved path or an inline location, not bytes) and
`Bad`s (records rejected while reading the index: bad JSON line, empty text, missing image,
inactive RSVQA entry...). Image bytes are read later, in `ingest.materialize`, possibly on Ray
workers; the order is what makes a killed ingest resumable.

Formats: scene-folders, captions-txt, karpathy-json, captions-jsonl, coco-captions, llava-json,
rsvqa, webdataset, parquet (examples in docs/ingest.md). `detect_format` picks one for 'auto'.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import fsspec

from rsdist.ingest.errors import IngestError
from rsdist.ingest.jsonstream import first_char, iter_array, json_kind, top_level_arrays

log = logging.getLogger("rsdist")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif")
TEXT_EXTS = (".txt", ".caption", ".text")
FORMATS = ("scene-folders", "captions-txt", "karpathy-json", "captions-jsonl", "coco-captions", "llava-json", "rsvqa", "webdataset", "parquet")
# Formats whose images live under an images root (the others carry their image bytes inline).
NEEDS_IMAGES_ROOT = ("scene-folders", "captions-txt", "karpathy-json", "captions-jsonl", "coco-captions", "rsvqa")
from rsdist.config import PARQUET_ROLES  # noqa: E402  (roles of data.columns)
from rsdist.core.schema import readable_label  # noqa: E402


@dataclass
class Record:
    """One input record, ready to become a canonical row once its image is read."""

    key: str
    file: str  # index file (relative to the source) the record came from
    line: int  # 1-based line, or position in the file's list
    task: str = "caption"
    image: Optional[str] = None  # full fsspec URL of the image file
    blob: Optional[list] = None  # inline image: ["tar", url, offset, size] or ["parquet", url, row_group, row]
    text: Optional[str] = None
    captions: Optional[list] = None
    answer: Optional[str] = None
    conversations: Optional[list] = None
    label: Optional[str] = None
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"kind": "record", **asdict(self)})


@dataclass
class Bad:
    """A record rejected while reading the index, with its reason code."""

    key: str
    file: str
    line: int
    reason: str
    detail: str

    def to_json(self) -> str:
        return json.dumps({"kind": "bad", **asdict(self)})


Item = Union[Record, Bad]


def item_from_json(text: str) -> Item:
    d = json.loads(text)
    kind = d.pop("kind")
    return Record(**d) if kind == "record" else Bad(**d)


class ImageIndex:
    """Every file under the images root, found by relative path or, failing that, by file name.

    Caption files name images by bare file name while the images sit in class folders
    (`images/<Class>/<name>`); the class folder becomes the label.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.by_rel: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        for path in sorted(fs.find(self.root)):
            rel = posixpath.relpath(path, self.root)
            if posixpath.basename(rel).startswith("."):
                continue
            self.by_rel[rel] = path
            self.by_name.setdefault(posixpath.basename(rel), path)

    def __len__(self) -> int:
        return len(self.by_rel)

    def resolve(self, name: str) -> Optional[str]:
        """The full URL of image `name` (a relative path or a file name), or None when absent."""
        name = name.strip().lstrip("./")
        path = self.by_rel.get(name) or self.by_name.get(posixpath.basename(name))
        return self.fs.unstrip_protocol(path) if path else None

    def label_of(self, url: str) -> Optional[str]:
        """The class folder an image sits in (`<root>/<Class>/<file>`), if any."""
        rel = posixpath.relpath(fsspec.core.url_to_fs(url)[1], self.root)
        parts = rel.split("/")
        return parts[-2] if len(parts) >= 2 else None


@dataclass
class Source:
    """Where the data is: the source path on its filesystem, its name, and its images index."""

    fs: fsspec.AbstractFileSystem
    path: str
    name: str
    format: str
    images: Optional[ImageIndex] = None
    columns: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def rel(self, path: str) -> str:
        base = self.path if self.fs.isdir(self.path) else posixpath.dirname(self.path)
        return posixpath.relpath(path, base)

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def files(self, pattern: str) -> list[str]:
        """Files under the source (or the source file itself) whose name matches a glob."""
        if self.fs.isfile(self.path):
            return [self.path] if fnmatch(posixpath.basename(self.path), pattern) else []
        return sorted(p for p in self.fs.find(self.path) if fnmatch(posixpath.basename(p), pattern))


def fnmatch(name: str, pattern: str) -> bool:
    import fnmatch as _f

    return _f.fnmatchcase(name.lower(), pattern.lower())




def split_name(text: Optional[str]) -> Optional[str]:
    """Map a split word found in the data ('train', 'restval', 'test', 'val'...) to a canonical split."""
    if not text:
        return None
    t = text.lower()
    if "test" in t:
        return "test"
    if "val" in t and "restval" not in t:
        return "val"
    if "train" in t or "restval" in t:
        return "train"
    return None


def _read_lines(fs, path: str) -> list[str]:
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").splitlines()


def _image_record(src: Source, rec: Record, name: Optional[str]) -> Item:
    """Attach the resolved image (and its class folder as label) to `rec`, or reject it as missing."""
    if not name:
        return Bad(rec.key, rec.file, rec.line, "missing-image", "record names no image")
    url = src.images.resolve(name)
    if url is None:
        return Bad(rec.key, rec.file, rec.line, "missing-image", f"no file {name!r} under {src.url(src.images.root)}")
    rec.image = url
    if rec.label is None:
        rec.label = src.images.label_of(url)
    return rec


def _caption_record(src: Source, key: str, file: str, line: int, name: Optional[str], captions: list, split=None, meta=None) -> Item:
    caps = [c if isinstance(c, str) else "" for c in captions]
    caps = [c.strip() for c in caps]
    if not any(caps):
        return Bad(key, file, line, "empty-text", "all captions are empty")
    rec = Record(key=key, file=file, line=line, task="caption", text=next(c for c in caps if c), captions=caps, split=split, meta=meta or {})
    return _image_record(src, rec, name)


# --- scene-folders -----------------------------------------------------------------------------


def read_scene_folders(src: Source) -> Iterator[Item]:
    """`<root>/<Class>/<image>`: one classification row per image, label = folder name."""
    root = src.images.root
    skipped = 0
    for rel, path in src.images.by_rel.items():
        parts = rel.split("/")
        if not rel.lower().endswith(IMAGE_EXTS):
            skipped += 1
            continue
        label = parts[-2] if len(parts) >= 2 else None
        rec = Record(key=rel, file=posixpath.dirname(rel) or ".", line=0, task="classification", image=src.url(path), label=label)
        rec.text = readable_label(label) if label else None
        rec.meta = {"text_from": "label"}
        yield rec
    if skipped:
        src.notes["skipped_non_image_files"] = skipped
        log.info("ingest: %d files under %s are not images by extension and were not read", skipped, src.url(root))


# --- captions-txt ------------------------------------------------------------------------------


def read_captions_txt(src: Source) -> Iterator[Item]:
    """`<split>_filename.txt` + `<split>_caps.txt` pairs.

    Per-image layout (train files): one name per image, n caption lines per image in order.
    Per-caption layout (test files): one name per caption line, names repeat. The layout of each
    pair is detected from the counts and recorded in `notes["captions_txt_layouts"]`.
    """
    pairs = []
    for names_path in src.files("*_filename.txt"):
        caps_path = names_path[: -len("_filename.txt")] + "_caps.txt"
        if not src.fs.exists(caps_path):
            raise IngestError(f"{src.url(names_path)}: no matching captions file {posixpath.basename(caps_path)}")
        pairs.append((names_path, caps_path))
    if not pairs:
        raise IngestError(f"{src.url(src.path)}: no *_filename.txt + *_caps.txt pair found")
    file_splits = {p: split_name(posixpath.basename(p)[: -len("_filename.txt")]) for p, _ in pairs}
    has_test = any(s == "test" for s in file_splits.values())
    layouts = src.notes.setdefault("captions_txt_layouts", {})
    for names_path, caps_path in pairs:
        names = [n.strip() for n in _read_lines(src.fs, names_path)]
        caps = _read_lines(src.fs, caps_path)
        while names and not names[-1]:
            names.pop()
        while caps and len(caps) > len(names) and not caps[-1].strip():
            caps.pop()
        file = src.rel(caps_path)
        split = file_splits[names_path] if has_test else None
        layout = _captions_layout(names, caps, src.url(names_path), src.url(caps_path))
        layouts[src.rel(names_path)] = layout
        log.info("ingest: %s: %s layout, %d names, %d caption lines", src.rel(names_path), layout, len(names), len(caps))
        if layout == "per-caption":
            grouped: OrderedDict[str, list] = OrderedDict()
            for i, (n, c) in enumerate(zip(names, caps)):
                grouped.setdefault(n, []).append((i + 1, c))
            for n, lines in grouped.items():
                yield _caption_record(src, n, file, lines[0][0], n, [c for _, c in lines], split)
        else:
            per = len(caps) // len(names)
            for i, n in enumerate(names):
                if not n:
                    yield Bad(f"line {i + 1}", src.rel(names_path), i + 1, "bad-record", "empty file name")
                    continue
                yield _caption_record(src, n, file, i * per + 1, n, caps[i * per : (i + 1) * per], split)


def _captions_layout(names: list[str], caps: list[str], names_url: str, caps_url: str) -> str:
    if not names:
        raise IngestError(f"{names_url}: no file names")
    if len(caps) == len(names) and len(set(names)) < len(names):
        return "per-caption"
    if len(caps) % len(names) == 0:
        return "per-image"
    raise IngestError(f"{caps_url}: {len(caps)} caption lines do not match {len(names)} names in {names_url} (neither one name per image nor one per caption)")


# --- captions-jsonl ----------------------------------------------------------------------------


def read_captions_jsonl(src: Source) -> Iterator[Item]:
    """One `{"filename", "captions": [...]}` (or `"caption"`/`"text"`) object per line."""
    for path in src.files("*.jsonl"):
        file = src.rel(path)
        with src.fs.open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    yield Bad(f"line {i}", file, i, "bad-json", f"{type(e).__name__}: {e}"[:300])
                    continue
                name = obj.get("filename") or obj.get("image") or obj.get("file_name")
                caps = obj.get("captions")
                if caps is None:
                    one = obj.get("caption", obj.get("text"))
                    caps = [one] if one is not None else []
                if isinstance(caps, str):
                    caps = [caps]
                key = str(obj.get("id", name if name else f"line {i}"))
                yield _caption_record(src, key, file, i, name, list(caps), split_name(obj.get("split")))


# --- karpathy-json -----------------------------------------------------------------------------


def read_karpathy_json(src: Source) -> Iterator[Item]:
    """`{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}]}]}`, streamed."""
    for path in _json_files(src):
        file = src.rel(path)
        if first_char(src.fs, path) != "{":
            raise IngestError(f"{src.url(path)}: no 'images' list (karpathy-json)")
        n = 0
        for i, im in enumerate(iter_array(src.fs, path, "images.item"), start=1):
            n = i
            if not isinstance(im, dict):
                yield Bad(f"item {i}", file, i, "bad-record", "image entry is not an object")
                continue
            name = im.get("filename")
            rel = posixpath.join(im["filepath"], name) if im.get("filepath") and name else name
            caps = [s.get("raw", " ".join(s.get("tokens", []))) if isinstance(s, dict) else str(s) for s in im.get("sentences", [])]
            key = rel or f"item {i}"
            meta = {"imgid": im["imgid"]} if "imgid" in im else {}
            yield _caption_record(src, key, file, i, rel, caps, split_name(im.get("split")), meta)
        if n == 0 and "images" not in top_level_arrays(src.fs, path):
            raise IngestError(f"{src.url(path)}: no 'images' list (karpathy-json)")


def _json_files(src: Source) -> list[str]:
    files = src.files("*.json")
    if not files:
        raise IngestError(f"{src.url(src.path)}: no .json file found")
    return files


# --- coco-captions -----------------------------------------------------------------------------


def read_coco_captions(src: Source) -> Iterator[Item]:
    """`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`: one row per image.

    Streamed in three passes (image ids, annotations, images); the captions are held grouped by
    image between the second and third, since annotations may come in any order.
    """
    for path in _json_files(src):
        file = src.rel(path)
        arrays = top_level_arrays(src.fs, path) if first_char(src.fs, path) == "{" else set()
        if not {"images", "annotations"} <= arrays:
            raise IngestError(f"{src.url(path)}: needs 'images' and 'annotations' lists (coco-captions)")
        known = {im.get("id") for im in iter_array(src.fs, path, "images.item") if isinstance(im, dict)}
        caps: dict[Any, list] = {}
        for j, ann in enumerate(iter_array(src.fs, path, "annotations.item"), start=1):
            if not isinstance(ann, dict) or ann.get("image_id") not in known:
                yield Bad(f"annotation {j}", file, j, "bad-record", "annotation refers to no listed image")
                continue
            caps.setdefault(ann["image_id"], []).append(ann.get("caption") or "")
        del known
        for i, im in enumerate(iter_array(src.fs, path, "images.item"), start=1):
            if not isinstance(im, dict):
                yield Bad(f"image {i}", file, i, "bad-record", "image entry is not an object")
                continue
            key = str(im.get("id", f"image {i}"))
            yield _caption_record(src, key, file, i, im.get("file_name"), caps.pop(im.get("id"), []), split_name(im.get("split")), {"coco_id": im.get("id")})


# --- llava-json --------------------------------------------------------------------------------


def read_llava_json(src: Source) -> Iterator[Item]:
    """LLaVA / GeoChat instruction lists: one row per conversation, turns and tags kept verbatim."""
    for path in _json_files(src):
        file = src.rel(path)
        if first_char(src.fs, path) != "[":
            raise IngestError(f"{src.url(path)}: expected a JSON list of conversations (llava-json)")
        for i, item in enumerate(iter_array(src.fs, path, "item"), start=1):
            key = str(item.get("id", f"item {i}")) if isinstance(item, dict) else f"item {i}"
            turns = item.get("conversations") if isinstance(item, dict) else None
            if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
                yield Bad(key, file, i, "bad-record", "no 'conversations' list of {from, value}")
                continue
            convo = [{"from": str(t.get("from", "")), "value": t.get("value") if isinstance(t.get("value"), str) else ""} for t in turns]
            if not any(t["value"].strip() for t in convo):
                yield Bad(key, file, i, "empty-text", "all conversation turns are empty")
                continue
            human = next((t["value"] for t in convo if t["from"] == "human"), convo[0]["value"])
            gpt = next((t["value"] for t in convo if t["from"] == "gpt"), None)
            rec = Record(key=key, file=file, line=i, task="instruction", conversations=convo, answer=gpt,
                         text=human.replace("<image>", "").strip(), meta={"turns": len(convo)})
            if item.get("image"):
                yield _image_record(src, rec, item["image"])
            else:
                rec.meta["text_only"] = True
                yield rec


# --- rsvqa -------------------------------------------------------------------------------------


def read_rsvqa(src: Source) -> Iterator[Item]:
    """RSVQA-LR/HR: per split `*questions.json`, `*answers.json`, `*images.json`; images `<id>.tif`.

    One row per active question of an active image; inactive ones are quarantined as `inactive`.
    """
    qfiles = src.files("*questions.json")
    if not qfiles:
        raise IngestError(f"{src.url(src.path)}: no *questions.json file (rsvqa)")
    for qpath in qfiles:
        prefix = qpath[: -len("questions.json")]
        apath, ipath = prefix + "answers.json", prefix + "images.json"
        for p in (apath, ipath):
            if not src.fs.exists(p):
                raise IngestError(f"{src.url(qpath)}: missing companion file {posixpath.basename(p)}")
        # Answers and image flags are looked up by id: keep only the fields used, stream the questions.
        answers = {a["id"]: {"answer": a.get("answer"), "active": a.get("active", True)}
                   for a in iter_array(src.fs, apath, "answers.item") if isinstance(a, dict) and "id" in a}
        images = {im["id"]: {"active": im.get("active", True)} for im in iter_array(src.fs, ipath, "images.item") if isinstance(im, dict) and "id" in im}
        questions = iter_array(src.fs, qpath, "questions.item")
        file = src.rel(qpath)
        split = split_name(posixpath.basename(prefix))
        for i, q in enumerate(questions, start=1):
            if not isinstance(q, dict) or "id" not in q:
                yield Bad(f"question {i}", file, i, "bad-record", "question entry without id")
                continue
            key = f"{posixpath.basename(prefix)}{q['id']}"
            img = images.get(q.get("img_id"))
            if not q.get("active", True):
                yield Bad(key, file, i, "inactive", "question marked inactive")
                continue
            if img is None or not img.get("active", True):
                yield Bad(key, file, i, "inactive", f"image {q.get('img_id')} inactive or not listed")
                continue
            ans = [answers[a] for a in q.get("answers_ids", []) if a in answers and answers[a].get("active", True)]
            text = (q.get("question") or "").strip()
            if not text or not ans:
                yield Bad(key, file, i, "empty-text", "no question text" if not text else "no active answer")
                continue
            rec = Record(key=key, file=file, line=i, task="vqa", text=text, answer=str(ans[0].get("answer")), split=split,
                         meta={"question_type": q.get("type"), "img_id": q.get("img_id")})
            yield _image_record(src, rec, f"{q.get('img_id')}.tif")


# --- webdataset --------------------------------------------------------------------------------


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset grouping: `dir/0001.seg.jpg` -> key `dir/0001`, extension `seg.jpg`."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem), ext.lower()


def read_webdataset(src: Source) -> Iterator[Item]:
    """Tar shards whose members group by key (`0001.jpg` + `0001.txt` / `.json`)."""
    tars = src.files("*.tar")
    if not tars:
        raise IngestError(f"{src.url(src.path)}: no .tar shard found (webdataset)")
    for path in tars:
        file = src.rel(path)
        groups: OrderedDict[str, dict] = OrderedDict()
        with src.fs.open(path, "rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = _wds_key(m.name)
                        g = groups.setdefault(key, {"pos": len(groups) + 1})
                        if ext.endswith(tuple(e[1:] for e in IMAGE_EXTS)):
                            g["image"] = [m.offset_data, m.size, m.name]
                        elif ext in ("txt", "caption", "text", "json", "cls", "label"):
                            g[ext] = tar.extractfile(m).read()
            except tarfile.TarError as e:
                raise IngestError(f"{src.url(path)}: not a readable tar file: {e}") from None
        for key, g in groups.items():
            yield _webdataset_record(src, path, file, key, g)


def _webdataset_record(src: Source, path: str, file: str, key: str, g: dict) -> Item:
    line = g["pos"]
    caps, label, meta = [], None, {"member": key}
    if "json" in g:
        try:
            obj = json.loads(g["json"])
        except ValueError as e:
            return Bad(key, file, line, "bad-json", f"{key}.json: {e}")
        if isinstance(obj, dict):
            c = obj.get("captions", obj.get("caption", obj.get("text")))
            caps = c if isinstance(c, list) else ([c] if c is not None else [])
            label = obj.get("label")
    for ext in ("txt", "caption", "text"):
        if ext in g and not caps:
            caps = [ln for ln in g[ext].decode("utf-8", "replace").splitlines() if ln.strip()] or [""]
    for ext in ("cls", "label"):
        if ext in g and label is None:
            label = g[ext].decode("utf-8", "replace").strip()
    if "image" not in g:
        return Bad(key, file, line, "missing-image", "no image member with this key")
    caps = [str(c).strip() for c in caps]
    if not any(caps):
        if label is None:
            return Bad(key, file, line, "empty-text", "no caption text and no label")
        rec = Record(key=f"{file}/{key}", file=file, line=line, task="classification", text=readable_label(str(label)), label=str(label), meta=meta)
    else:
        rec = Record(key=f"{file}/{key}", file=file, line=line, task="caption", text=next(c for c in caps if c), captions=caps, label=None if label is None else str(label), meta=meta)
    offset, size, _ = g["image"]
    rec.blob = ["tar", src.url(path), int(offset), int(size)]
    return rec


# --- parquet -----------------------------------------------------------------------------------


def read_parquet(src: Source) -> Iterator[Item]:
    """Hugging Face-style parquet: an `image` struct of bytes/path plus text or label columns.

    Column names per role come from `data.columns` (roles: image, text, captions, label, key,
    split, answer, task); defaults are the role names themselves.
    """
    import pyarrow.parquet as pq

    files = src.files("*.parquet")
    if not files:
        raise IngestError(f"{src.url(src.path)}: no .parquet file found")
    col = {r: src.columns.get(r, r) for r in PARQUET_ROLES}
    for path in files:
        file = src.rel(path)
        with src.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if col["image"] not in names:
                raise IngestError(f"{src.url(path)}: no image column {col['image']!r}; columns: {', '.join(sorted(names))} (set data.columns.image)")
            wanted = [c for r, c in col.items() if r != "image" and c in names]
            pos = 0
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=wanted)
                for j, row in enumerate(table.to_pylist()):
                    pos += 1
                    yield _parquet_record(src, path, file, pos, rg, j, row, col)


def _parquet_record(src: Source, path: str, file: str, pos: int, rg: int, j: int, row: dict, col: dict) -> Item:
    key = str(row.get(col["key"]) if row.get(col["key"]) is not None else f"{file}#{pos}")
    caps = row.get(col["captions"])
    caps = [str(c) for c in caps] if isinstance(caps, list) else []
    text = row.get(col["text"])
    if isinstance(text, list):
        caps, text = [str(c) for c in text], None
    if text is not None and not caps:
        caps = [str(text)]
    caps = [c.strip() for c in caps]
    label = row.get(col["label"])
    label = None if label is None else str(label)
    answer = row.get(col["answer"])
    task = row.get(col["task"]) or ("vqa" if answer is not None else "caption" if any(caps) else "classification")
    if not any(caps) and label is None:
        return Bad(key, file, pos, "empty-text", "no text, captions or label")
    text = next((c for c in caps if c), None) or readable_label(label)
    return Record(key=key, file=file, line=pos, task=task, text=text, captions=caps or None, label=label,
                  answer=None if answer is None else str(answer), split=split_name(row.get(col["split"])),
                  blob=["parquet", src.url(path), rg, j, col["image"]])


READERS: dict[str, Callable[[Source], Iterator[Item]]] = {
    "scene-folders": read_scene_folders,
    "captions-txt": read_captions_txt,
    "karpathy-json": read_karpathy_json,
    "captions-jsonl": read_captions_jsonl,
    "coco-captions": read_coco_captions,
    "llava-json": read_llava_json,
    "rsvqa": read_rsvqa,
    "webdataset": read_webdataset,
    "parquet": read_parquet,
}


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Guess the format of a source file or folder from its file names and, for JSON, its keys."""
    if fs.isfile(path):
        files = [path]
    else:
        files = [p for p in fs.find(path, maxdepth=2) if not posixpath.basename(p).startswith(".")]
    names = [posixpath.basename(p).lower() for p in files]
    if any(n.endswith("_filename.txt") for n in names):
        return "captions-txt"
    if any(n.endswith("questions.json") for n in names):
        return "rsvqa"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    jsons = [p for p, n in zip(files, names) if n.endswith(".json")]
    if jsons:
        return _json_kind(fs, jsons[0])
    if any(n.endswith(".jsonl") for n in names):
        return "captions-jsonl"
    if any(n.endswith(IMAGE_EXTS) for n in names) or not fs.isfile(path):
        return "scene-folders"
    raise IngestError(f"{fs.unstrip_protocol(path)}: cannot tell the format; set data.format to one of: {', '.join(FORMATS)}")


def _json_kind(fs, path: str) -> str:
    kind = json_kind(fs, path)
    if kind == "list":
        return "llava-json"
    if kind == "coco":
        return "coco-captions"
    if kind == "karpathy":
        return "karpathy-json"
    raise IngestError(f"{fs.unstrip_protocol(path)}: JSON of unknown layout; set data.format to one of: {', '.join(FORMATS)}")
