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
import os
import posixpath
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
from rsdist.core.schema import TASKS, readable_label  # noqa: E402


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
    root: Optional[str] = None  # local disk: the real path of the images root, checked again when the image is opened

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


class Unresolved(Exception):
    """An image reference that does not lead to exactly one file inside the images root."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class ImageIndex:
    """Every file under the images root, found by relative path or, failing that, by file name.

    Caption files name images by bare file name while the images sit in class folders
    (`images/<Class>/<name>`); the class folder becomes the label. A name that climbs out of the
    root (`../x.jpg`, an absolute path elsewhere) is `outside-root`, never matched by file name;
    a bare name that several files share is `ambiguous-image`; on a local disk, a file whose real
    path (symlinks followed) lies outside the root is listed but never opened (`outside-root`).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.by_rel: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        self.ambiguous: set[str] = set()
        self.outside: dict[str, str] = {}  # relative path -> the real path outside the root it leads to
        self.real_root = real_root = _local_real_path(fs, self.root)
        real_dirs: dict[str, str] = {}
        for path in sorted(fs.find(self.root)):
            rel = posixpath.relpath(path, self.root)
            name = posixpath.basename(rel)
            if name.startswith("."):
                continue
            self.by_rel[rel] = path
            if name in self.by_name:
                self.ambiguous.add(name)
            else:
                self.by_name[name] = path
            if real_root is not None:
                real = _real_path(path, real_dirs)
                if not _inside(real, real_root):
                    self.outside[rel] = real

    def __len__(self) -> int:
        return len(self.by_rel)

    def resolve(self, name: str) -> str:
        """The full URL of image `name` (a relative path or a file name); raises `Unresolved`."""
        rel = self._relative(name)
        path = self.by_rel.get(rel)
        if path is None:
            base = posixpath.basename(rel)
            if base in self.ambiguous:
                raise Unresolved("ambiguous-image", f"{name!r} is not a path under the images root and several files there are named {base!r}")
            path = self.by_name.get(base)
        if path is None:
            raise Unresolved("missing-image", f"no file {name!r} under {self.fs.unstrip_protocol(self.root)}")
        self.check_inside(posixpath.relpath(path, self.root))
        return self.fs.unstrip_protocol(path)

    def check_inside(self, rel: str) -> None:
        if rel in self.outside:
            raise Unresolved("outside-root", f"{rel} is a link to {self.outside[rel]}, outside the images root {self.fs.unstrip_protocol(self.root)}")

    def _relative(self, name: str) -> str:
        """`name` as a normalised path relative to the root; names that leave the root are refused."""
        text = name.strip()
        if text.startswith("/"):
            root = "/" + self.root.lstrip("/")
            if not text.startswith(root + "/"):
                raise Unresolved("outside-root", f"{name!r} is an absolute path outside the images root {self.fs.unstrip_protocol(self.root)}")
            text = text[len(root) + 1 :]
        rel = posixpath.normpath(text)
        if rel == ".." or rel.startswith("../"):
            raise Unresolved("outside-root", f"{name!r} leads outside the images root {self.fs.unstrip_protocol(self.root)}")
        return rel

    def label_of(self, url: str) -> Optional[str]:
        """The class folder an image sits in (`<root>/<Class>/<file>`), if any."""
        rel = posixpath.relpath(fsspec.core.url_to_fs(url)[1], self.root)
        parts = rel.split("/")
        return parts[-2] if len(parts) >= 2 else None


def _local_real_path(fs: fsspec.AbstractFileSystem, path: str) -> Optional[str]:
    """The real path of `path` on a local disk (symlinks resolved); None on other filesystems."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return os.path.realpath(path) if "file" in protocols or "local" in protocols else None


def _real_path(path: str, real_dirs: dict[str, str]) -> str:
    """os.path.realpath(path), resolving each folder once (one lstat per file that is not a link)."""
    if os.path.islink(path):
        return os.path.realpath(path)
    folder = os.path.dirname(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    return os.path.join(real_dirs[folder], os.path.basename(path))


def outside_root(url: str, real_root: Optional[str]) -> Optional[str]:
    """The real path `url` leads to when that is outside `real_root` (a local images root), else None."""
    if real_root is None:
        return None
    real = os.path.realpath(fsspec.core.url_to_fs(url)[1])
    return None if _inside(real, real_root) else real


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


@dataclass
class Source:
    """Where the data is: the source path on its filesystem, its name, and its images index."""

    fs: fsspec.AbstractFileSystem
    path: str
    name: str
    format: str
    images: Optional[ImageIndex] = None
    columns: dict = field(default_factory=dict)
    captions_per_image: int = 5
    notes: dict = field(default_factory=dict)

    def rel(self, path: str) -> str:
        base = self.path if self.fs.isdir(self.path) else posixpath.dirname(self.path)
        return posixpath.relpath(path, base)

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def files(self, pattern: str) -> list[str]:
        """Files under the source (or the source file itself) whose name matches a glob.

        On a local disk a matching file that is a link to somewhere outside the source is an error.
        """
        if self.fs.isfile(self.path):
            found = [self.path] if fnmatch(posixpath.basename(self.path), pattern) else []
            return found
        found = sorted(p for p in self.fs.find(self.path) if fnmatch(posixpath.basename(p), pattern))
        real_root = _local_real_path(self.fs, self.path)
        for p in found if real_root is not None else []:
            real = os.path.realpath(p)
            if not _inside(real, real_root):
                raise IngestError(f"{self.url(p)}: a link to {real}, outside data.source {self.url(self.path)}; copy the file into the source folder")
        return found


def fnmatch(name: str, pattern: str) -> bool:
    import fnmatch as _f

    return _f.fnmatchcase(name.lower(), pattern.lower())




SPLIT_WORDS = "train, restval, trainval, val, dev, valid, validation, test (any word containing one)"


def split_name(text: Optional[str]) -> Optional[str]:
    """Map a split word found in the data ('train', 'restval', 'test', 'val'...) to a canonical split."""
    if not text:
        return None
    t = text.lower()
    if "test" in t:
        return "test"
    if ("val" in t and "restval" not in t and "trainval" not in t) or t == "dev":
        return "val"
    if "train" in t or "restval" in t:
        return "train"
    return None


# --- field checks (a wrong type quarantines the record as `bad-field`, never a coercion) -------


class BadField(ValueError):
    """A field of a record has the wrong type or value."""

    def __init__(self, name: str, expected: str, value: Any):
        super().__init__(f"field {name!r}: expected {expected}, got {_describe(value)}")


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _describe(value: Any) -> str:
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    if value is None:
        return kind
    shown = json.dumps(value, default=str)
    return f"{kind} {shown[:60]}{'...' if len(shown) > 60 else ''}"


def _text(obj: dict, name: str) -> Optional[str]:
    """A string field, or None when absent or null."""
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    raise BadField(name, "a string", value)


def _ident(obj: dict, name: str) -> Optional[str]:
    """An identifier field: a string or an integer, as a string; None when absent."""
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadField(name, "a string or an integer", value)


def _strings(value: Any, name: str) -> list[str]:
    """A list of strings (captions)."""
    if not isinstance(value, list):
        raise BadField(name, "a list of strings", value)
    for k, v in enumerate(value):
        if not isinstance(v, str):
            raise BadField(f"{name}[{k}]", "a string", v)
    return list(value)


def _split(obj: dict, name: str = "split") -> Optional[str]:
    word = _text(obj, name)
    split = split_name(word)
    if word and word.strip() and split is None:
        raise BadField(name, f"a split word ({SPLIT_WORDS})", word)
    return split


def _key_hint(obj: Any, name: str, fallback: str) -> str:
    """A record key for quarantine rows, usable before the record's fields are checked."""
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value else str(value) if isinstance(value, int) and not isinstance(value, bool) else fallback


def _guarded(key: str, file: str, line: int, build: Callable[[], Item]) -> Item:
    """`build()`, with a wrong-typed field (or any other malformed entry) quarantined, never raised."""
    try:
        return build()
    except IngestError:
        raise
    except BadField as e:
        return Bad(key, file, line, "bad-field", str(e))
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        return Bad(key, file, line, "bad-record", f"malformed entry: {type(e).__name__}: {e}"[:300])


def _read_lines(fs, path: str) -> list[Optional[str]]:
    """The file's lines (split on \\n, \\r\\n or \\r only); a line that is not UTF-8 is None."""
    with fs.open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines: list[Optional[str]] = []
    for line in raw.splitlines():
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    return lines


def _image_record(src: Source, rec: Record, name: Optional[str]) -> Item:
    """Attach the resolved image (and its class folder as label) to `rec`, or reject it."""
    if not name or not name.strip():
        return Bad(rec.key, rec.file, rec.line, "missing-image", "record names no image")
    try:
        url = src.images.resolve(name)
    except Unresolved as e:
        return Bad(rec.key, rec.file, rec.line, e.reason, e.detail)
    rec.image, rec.root = url, src.images.real_root
    if rec.label is None:
        rec.label = src.images.label_of(url)
    return rec


def _caption_record(src: Source, key: str, file: str, line: int, name: Optional[str], captions: list[str], split=None, meta=None) -> Item:
    caps = [c.strip() for c in captions]
    if not any(caps):
        return Bad(key, file, line, "empty-text", "all captions are empty" if caps else "no caption")
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
        rec = Record(key=rel, file=posixpath.dirname(rel) or ".", line=0, task="classification", image=src.url(path), label=label, root=src.images.real_root)
        rec.text = readable_label(label) if label else None
        rec.meta = {"text_from": "label"}
        try:
            src.images.check_inside(rel)
        except Unresolved as e:
            yield Bad(rec.key, rec.file, 0, e.reason, e.detail)
            continue
        yield rec
    if skipped:
        src.notes["skipped_non_image_files"] = skipped
        log.info("ingest: %d files under %s are not images by extension and were not read", skipped, src.url(root))


# --- captions-txt ------------------------------------------------------------------------------


def read_captions_txt(src: Source) -> Iterator[Item]:
    """`<split>_filename.txt` + `<split>_caps.txt` pairs.

    Per-image layout (train files): one name per image, `data.captions_per_image` caption lines
    per image in order. Per-caption layout (test files): one name per caption line, names repeat.
    Any other count is an error (it would put captions on other images). The layout of each pair
    is recorded in `notes["captions_txt_layouts"]`.
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
        names = [None if n is None else n.strip() for n in _read_lines(src.fs, names_path)]
        while names and names[-1] == "":
            names.pop()
        caps = _read_lines(src.fs, caps_path)
        file, names_file = src.rel(caps_path), src.rel(names_path)
        split = file_splits[names_path] if has_test else None
        layout, caps = _captions_layout(names, caps, src.captions_per_image, src.url(names_path), src.url(caps_path))
        layouts[names_file] = layout
        log.info("ingest: %s: %s layout, %d names, %d caption lines", names_file, layout, len(names), len(caps))
        if layout == "per-caption":
            grouped: OrderedDict[str, list] = OrderedDict()
            for i, n in enumerate(names):
                if n is None or not n:
                    yield _bad_name(names_file, i + 1, n)
                    continue
                grouped.setdefault(n, []).append(i + 1)
            for n, lines in grouped.items():
                yield _txt_record(src, n, file, lines, [caps[k - 1] for k in lines], split)
        else:
            per = len(caps) // len(names)
            for i, n in enumerate(names):
                if n is None or not n:
                    yield _bad_name(names_file, i + 1, n)
                    continue
                lines = list(range(i * per + 1, (i + 1) * per + 1))
                yield _txt_record(src, n, file, lines, caps[i * per : (i + 1) * per], split)


def _bad_name(file: str, line: int, name: Optional[str]) -> Bad:
    if name is None:
        return Bad(f"line {line}", file, line, "bad-encoding", "file name line is not UTF-8")
    return Bad(f"line {line}", file, line, "missing-image", "empty file name")


def _txt_record(src: Source, name: str, file: str, lines: list[int], caps: list[Optional[str]], split) -> Item:
    for k, c in zip(lines, caps):
        if c is None:
            return Bad(name, file, lines[0], "bad-encoding", f"caption line {k} is not UTF-8")
    return _caption_record(src, name, file, lines[0], name, caps, split)


def _captions_layout(names: list, caps: list, per: int, names_url: str, caps_url: str) -> tuple[str, list]:
    """('per-image' | 'per-caption', the caption lines used); blank lines past the layout's count are dropped."""
    n = len(names)
    if not n:
        raise IngestError(f"{names_url}: no file names")
    layouts = (("per-caption", n), ("per-image", per * n)) if len(set(names)) < n else (("per-image", per * n), ("per-caption", n))
    for layout, want in layouts:
        if len(caps) == want:
            return layout, caps
    blank_tail = 0
    while blank_tail < len(caps) and caps[-1 - blank_tail] is not None and not caps[-1 - blank_tail].strip():
        blank_tail += 1
    for layout, want in layouts:
        if want < len(caps) <= want + blank_tail:
            return layout, caps[:want]
    lines = len(caps) - blank_tail
    hint = f"; they fit {lines // n} per image: set data.captions_per_image: {lines // n} if that is the layout" if lines % n == 0 and lines // n > 1 else ""
    raise IngestError(f"{caps_url}: {len(caps)} caption lines do not match {n} names in {names_url} "
                      f"(neither data.captions_per_image={per} per name nor one per name){hint}")


# --- captions-jsonl ----------------------------------------------------------------------------


def read_captions_jsonl(src: Source) -> Iterator[Item]:
    """One `{"filename", "captions": [...]}` (or `"caption"`/`"text"`) object per line."""
    for path in src.files("*.jsonl"):
        file = src.rel(path)
        with src.fs.open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                key = f"line {i}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Bad(key, file, i, "bad-encoding", f"not UTF-8: {e}")
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as e:
                    yield Bad(key, file, i, "bad-json", f"{type(e).__name__}: {e}"[:300])
                    continue
                if not isinstance(obj, dict):
                    yield Bad(key, file, i, "bad-record", f"line is {_describe(obj)}, not an object")
                    continue
                yield _guarded(_key_hint(obj, "id", _key_hint(obj, "filename", key)), file, i, lambda: _jsonl_record(src, file, i, obj))


def _jsonl_record(src: Source, file: str, i: int, obj: dict) -> Item:
    name = _text(obj, "filename") or _text(obj, "image") or _text(obj, "file_name")
    if "captions" in obj:
        caps = _strings(obj["captions"], "captions")
    else:
        one = _text(obj, "caption") if "caption" in obj else _text(obj, "text")
        caps = [one] if one is not None else []
    key = _ident(obj, "id") or name or f"line {i}"
    return _caption_record(src, key, file, i, name, caps, _split(obj))


# --- karpathy-json -----------------------------------------------------------------------------


def read_karpathy_json(src: Source) -> Iterator[Item]:
    """`{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", "tokens"}]}]}`, streamed."""
    for path in _json_files(src):
        file = src.rel(path)
        if first_char(src.fs, path) != "{":
            raise IngestError(f"{src.url(path)}: the top level is not an object with an 'images' list (karpathy-json)")
        n = 0
        for i, im in enumerate(iter_array(src.fs, path, "images.item"), start=1):
            n = i
            if not isinstance(im, dict):
                yield Bad(f"item {i}", file, i, "bad-record", f"image entry is {_describe(im)}, not an object")
                continue
            yield _guarded(_key_hint(im, "filename", f"item {i}"), file, i, lambda: _karpathy_record(src, file, i, im))
        if n == 0 and "images" not in top_level_arrays(src.fs, path):
            raise IngestError(f"{src.url(path)}: no 'images' list (karpathy-json)")


def _karpathy_record(src: Source, file: str, i: int, im: dict) -> Item:
    name, folder = _text(im, "filename"), _text(im, "filepath")
    rel = posixpath.join(folder, name) if folder and name else name
    sentences = im.get("sentences", [])
    if not isinstance(sentences, list):
        raise BadField("sentences", "a list of {raw, tokens} objects", sentences)
    caps = [_sentence(s, f"sentences[{k}]") for k, s in enumerate(sentences)]
    meta = {"imgid": im["imgid"]} if "imgid" in im else {}
    return _caption_record(src, rel or f"item {i}", file, i, rel, caps, _split(im), meta)


def _sentence(s: Any, name: str) -> str:
    if not isinstance(s, dict):
        raise BadField(name, "an object with 'raw' or 'tokens'", s)
    raw = s.get("raw")
    if raw is None:
        return " ".join(_strings(s.get("tokens", []), f"{name}.tokens"))
    if not isinstance(raw, str):
        raise BadField(f"{name}.raw", "a string", raw)
    return raw


def _json_files(src: Source) -> list[str]:
    files = src.files("*.json")
    if not files:
        raise IngestError(f"{src.url(src.path)}: no .json file found")
    return files


# --- coco-captions -----------------------------------------------------------------------------


def _coco_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def read_coco_captions(src: Source) -> Iterator[Item]:
    """`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`: one row per image.

    Streamed in three passes (image ids, annotations, images); the captions are held grouped by
    image between the second and third, since annotations may come in any order. An id listed
    twice with different file names quarantines every entry of that id (`duplicate-key`): its
    captions could belong to either image.
    """
    for path in _json_files(src):
        file = src.rel(path)
        arrays = top_level_arrays(src.fs, path) if first_char(src.fs, path) == "{" else set()
        if not {"images", "annotations"} <= arrays:
            raise IngestError(f"{src.url(path)}: needs 'images' and 'annotations' lists (coco-captions)")
        names: dict[Any, Any] = {}
        clashing: set = set()
        for im in iter_array(src.fs, path, "images.item"):
            if isinstance(im, dict) and _coco_id(im.get("id")):
                if im["id"] in names and names[im["id"]] != im.get("file_name"):
                    clashing.add(im["id"])
                names.setdefault(im["id"], im.get("file_name"))
        caps: dict[Any, list] = {}
        for j, ann in enumerate(iter_array(src.fs, path, "annotations.item"), start=1):
            bad = _coco_annotation_problem(ann, names, j, file)
            if bad is not None:
                yield bad
                continue
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
        emitted: set = set()
        for i, im in enumerate(iter_array(src.fs, path, "images.item"), start=1):
            if not isinstance(im, dict):
                yield Bad(f"image {i}", file, i, "bad-record", f"image entry is {_describe(im)}, not an object")
                continue
            yield _guarded(_key_hint(im, "id", f"image {i}"), file, i, lambda: _coco_record(src, file, i, im, caps, clashing, emitted))


def _coco_annotation_problem(ann: Any, names: dict, j: int, file: str) -> Optional[Bad]:
    key = f"annotation {j}"
    if not isinstance(ann, dict):
        return Bad(key, file, j, "bad-record", f"annotation is {_describe(ann)}, not an object")
    if not _coco_id(ann.get("image_id")):
        return Bad(key, file, j, "bad-field", str(BadField("image_id", "a string or an integer", ann.get("image_id"))))
    if not isinstance(ann.get("caption"), str):
        return Bad(key, file, j, "bad-field", str(BadField("caption", "a string", ann.get("caption"))))
    if ann["image_id"] not in names:
        return Bad(key, file, j, "dangling-ref", f"annotation refers to image id {ann['image_id']!r}, which 'images' does not list")
    return None


def _coco_record(src: Source, file: str, i: int, im: dict, caps: dict, clashing: set, emitted: set) -> Item:
    image_id = im.get("id")
    if not _coco_id(image_id):
        raise BadField("id", "a string or an integer", image_id)
    key = str(image_id)
    if image_id in clashing:
        return Bad(key, file, i, "duplicate-key", f"image id {image_id!r} is listed more than once with different file names; its captions cannot be assigned")
    if image_id in emitted:
        return Bad(key, file, i, "duplicate-key", f"image id {image_id!r} already listed earlier in 'images'")
    emitted.add(image_id)
    return _caption_record(src, key, file, i, _text(im, "file_name"), caps.pop(image_id, []), _split(im), {"coco_id": image_id})


# --- llava-json --------------------------------------------------------------------------------


def read_llava_json(src: Source) -> Iterator[Item]:
    """LLaVA / GeoChat instruction lists: one row per conversation, turns and tags kept verbatim."""
    for path in _json_files(src):
        file = src.rel(path)
        if first_char(src.fs, path) != "[":
            raise IngestError(f"{src.url(path)}: the top level is not a JSON list of conversations (llava-json)")
        for i, item in enumerate(iter_array(src.fs, path, "item"), start=1):
            if not isinstance(item, dict):
                yield Bad(f"item {i}", file, i, "bad-record", f"entry is {_describe(item)}, not an object")
                continue
            yield _guarded(_key_hint(item, "id", f"item {i}"), file, i, lambda: _llava_record(src, file, i, item))


def _llava_record(src: Source, file: str, i: int, item: dict) -> Item:
    key = _ident(item, "id") or f"item {i}"
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadField("conversations", "a non-empty list of {from, value} objects", turns)
    convo = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadField(f"conversations[{k}]", "a {from, value} object", t)
        if not isinstance(t.get("from"), str):
            raise BadField(f"conversations[{k}].from", "a string", t.get("from"))
        if not isinstance(t.get("value"), str):
            raise BadField(f"conversations[{k}].value", "a string", t.get("value"))
        convo.append({"from": t["from"], "value": t["value"]})
    if not any(t["value"].strip() for t in convo):
        return Bad(key, file, i, "empty-text", "all conversation turns are empty")
    human = next((t["value"] for t in convo if t["from"] == "human"), convo[0]["value"])
    gpt = next((t["value"] for t in convo if t["from"] == "gpt"), None)
    rec = Record(key=key, file=file, line=i, task="instruction", conversations=convo, answer=gpt,
                 text=human.replace("<image>", "").strip(), meta={"turns": len(convo)})
    image = _text(item, "image")
    if image:
        return _image_record(src, rec, image)
    rec.meta["text_only"] = True
    return rec


# --- rsvqa -------------------------------------------------------------------------------------


def read_rsvqa(src: Source) -> Iterator[Item]:
    """RSVQA-LR/HR: per split `*questions.json`, `*answers.json`, `*images.json`; images `<id>.tif`.

    One row per active question of an active image; inactive ones are quarantined as `inactive`,
    questions naming an image or answer id the companion files do not list as `dangling-ref`.
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
                   for a in iter_array(src.fs, apath, "answers.item") if isinstance(a, dict) and _coco_id(a.get("id"))}
        images = {im["id"]: {"active": im.get("active", True)} for im in iter_array(src.fs, ipath, "images.item") if isinstance(im, dict) and _coco_id(im.get("id"))}
        file = src.rel(qpath)
        names = {"answers": posixpath.basename(apath), "images": posixpath.basename(ipath)}
        stem = posixpath.basename(prefix)
        split = split_name(stem)
        for i, q in enumerate(iter_array(src.fs, qpath, "questions.item"), start=1):
            if not isinstance(q, dict) or "id" not in q:
                yield Bad(f"question {i}", file, i, "bad-record", "question entry without id")
                continue
            yield _guarded(f"{stem}{q['id']}", file, i, lambda: _rsvqa_record(src, file, i, q, stem, split, answers, images, names))


def _rsvqa_record(src: Source, file: str, i: int, q: dict, stem: str, split, answers: dict, images: dict, names: dict) -> Item:
    key = f"{stem}{_ident(q, 'id')}"
    if not q.get("active", True):
        return Bad(key, file, i, "inactive", "question marked inactive")
    img_id = q.get("img_id")
    if not _coco_id(img_id):
        raise BadField("img_id", "a string or an integer", img_id)
    if img_id not in images:
        return Bad(key, file, i, "dangling-ref", f"image id {img_id!r} is not listed in {names['images']}")
    if not images[img_id].get("active", True):
        return Bad(key, file, i, "inactive", f"image {img_id!r} marked inactive")
    ids = q.get("answers_ids", [])
    if not isinstance(ids, list) or not all(_coco_id(a) for a in ids):
        raise BadField("answers_ids", "a list of answer ids", ids)
    dangling = [a for a in ids if a not in answers]
    if dangling:
        return Bad(key, file, i, "dangling-ref", f"answer ids {dangling} are not listed in {names['answers']}")
    active = [answers[a] for a in ids if answers[a].get("active", True)]
    if not active:
        return Bad(key, file, i, "inactive" if ids else "empty-text", "every answer marked inactive" if ids else "no answer")
    answer = active[0].get("answer")
    if not isinstance(answer, str):
        raise BadField(f"answer of id {ids[0]!r} in {names['answers']}", "a string", answer)
    text = (_text(q, "question") or "").strip()
    if not text or not answer.strip():
        return Bad(key, file, i, "empty-text", "no question text" if not text else "empty answer")
    rec = Record(key=key, file=file, line=i, task="vqa", text=text, answer=answer, split=split,
                 meta={"question_type": q.get("type"), "img_id": img_id})
    return _image_record(src, rec, f"{img_id}.tif")


# --- webdataset --------------------------------------------------------------------------------

_WDS_TEXT = ("txt", "caption", "text", "json", "cls", "label")


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset grouping: `dir/0001.seg.jpg` -> key `dir/0001`, extension `seg.jpg`."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem), ext.lower()


def read_webdataset(src: Source) -> Iterator[Item]:
    """Tar shards whose members group by key (`0001.jpg` + `0001.txt` / `.json`).

    A member name that repeats (or two image members under one key) quarantines the key as
    `duplicate-member`; a shard that is not a readable tar is one `unreadable-shard` row (the
    samples read before the damage are kept) and the other shards go on.
    """
    tars = src.files("*.tar")
    if not tars:
        raise IngestError(f"{src.url(src.path)}: no .tar shard found (webdataset)")
    for path in tars:
        file = src.rel(path)
        groups, broken = _tar_groups(src, path)
        for key, g in groups.items():
            yield _guarded(key, file, g["pos"], lambda: _webdataset_record(src, path, file, key, g))
        if broken:
            yield Bad(file, file, 0, "unreadable-shard", broken)


def _tar_groups(src: Source, path: str) -> tuple[OrderedDict, Optional[str]]:
    """The shard's members grouped by key, and what stopped the read early (None when nothing did)."""
    groups: OrderedDict[str, dict] = OrderedDict()
    members = 0
    try:
        with src.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                members += 1
                key, ext = _wds_key(m.name)
                g = groups.setdefault(key, {"pos": len(groups) + 1})
                if ext.endswith(tuple(e[1:] for e in IMAGE_EXTS)):
                    slot, value = "image", [m.offset_data, m.size, m.name]
                elif ext in _WDS_TEXT:
                    slot, value = ext, tar.extractfile(m).read()
                else:
                    continue
                if slot in g:
                    g.setdefault("duplicates", []).append(m.name)
                else:
                    g[slot] = value
    except (tarfile.TarError, OSError, EOFError) as e:
        return groups, f"not a readable tar file ({members} members read): {type(e).__name__}: {e}"
    return groups, None


def _wds_text(g: dict, ext: str, key: str) -> str:
    try:
        return g[ext].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _WdsEncoding(f"{key}.{ext} is not UTF-8: {e}") from None


class _WdsEncoding(Exception):
    pass


def _webdataset_record(src: Source, path: str, file: str, key: str, g: dict) -> Item:
    line = g["pos"]
    if g.get("duplicates"):
        return Bad(key, file, line, "duplicate-member", f"member {g['duplicates'][0]!r} repeats a member of key {key!r} (or a second image)")
    caps, label, meta = [], None, {"member": key}
    try:
        if "json" in g:
            try:
                obj = json.loads(_wds_text(g, "json", key))
            except ValueError as e:
                return Bad(key, file, line, "bad-json", f"{key}.json: {e}")
            if not isinstance(obj, dict):
                return Bad(key, file, line, "bad-record", f"{key}.json is {_describe(obj)}, not an object")
            if "captions" in obj:
                caps = _strings(obj["captions"], "captions")
            else:
                one = _text(obj, "caption") if "caption" in obj else _text(obj, "text")
                caps = [one] if one is not None else []
            label = _ident(obj, "label")
        for ext in ("txt", "caption", "text"):
            if ext in g and not caps:
                caps = [ln for ln in _wds_text(g, ext, key).splitlines() if ln.strip()] or [""]
        for ext in ("cls", "label"):
            if ext in g and label is None:
                label = _wds_text(g, ext, key).strip()
    except _WdsEncoding as e:
        return Bad(key, file, line, "bad-encoding", str(e))
    if "image" not in g:
        return Bad(key, file, line, "missing-image", "no image member with this key")
    caps = [c.strip() for c in caps]
    if not any(caps):
        if not label:
            return Bad(key, file, line, "empty-text", "no caption text and no label")
        rec = Record(key=f"{file}/{key}", file=file, line=line, task="classification", text=readable_label(label), label=label, meta=meta)
    else:
        rec = Record(key=f"{file}/{key}", file=file, line=line, task="caption", text=next(c for c in caps if c), captions=caps, label=label, meta=meta)
    offset, size, _ = g["image"]
    rec.blob = ["tar", src.url(path), int(offset), int(size)]
    return rec


# --- parquet -----------------------------------------------------------------------------------


def read_parquet(src: Source) -> Iterator[Item]:
    """Hugging Face-style parquet: an `image` struct of bytes/path plus text or label columns.

    Column names per role come from `data.columns` (roles: image, text, captions, label, key,
    split, answer, task); defaults are the role names themselves. A column of the wrong type is
    an error naming the file, column and role; a file that is not parquet is one
    `unreadable-shard` row and the other files go on.
    """
    import pyarrow.parquet as pq

    files = src.files("*.parquet")
    if not files:
        raise IngestError(f"{src.url(src.path)}: no .parquet file found")
    col = {r: src.columns.get(r, r) for r in PARQUET_ROLES}
    for path in files:
        file = src.rel(path)
        with src.fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bytes that are not parquet
                yield Bad(file, file, 0, "unreadable-shard", f"not a readable parquet file: {type(e).__name__}: {e}"[:300])
                continue
            _check_parquet_columns(src.url(path), pf.schema_arrow, col)
            wanted = [c for r, c in col.items() if r != "image" and c in pf.schema_arrow.names]
            pos = 0
            for rg in range(pf.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=wanted)
                except Exception as e:
                    yield Bad(f"{file}#row-group-{rg}", file, pos + 1, "unreadable-shard", f"row group {rg} cannot be read: {type(e).__name__}: {e}"[:300])
                    pos += pf.metadata.row_group(rg).num_rows
                    continue
                for j, row in enumerate(table.to_pylist()):
                    pos += 1
                    key = str(row.get(col["key"]) if row.get(col["key"]) is not None else f"{file}#{pos}")
                    yield _guarded(key, file, pos, lambda: _parquet_record(src, path, file, pos, rg, j, row, col, key))


def _check_parquet_columns(url: str, schema, col: dict) -> None:
    """Each role's column must have a type ingest can read without guessing; else one error line."""
    import pyarrow as pa

    def is_text(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_id(t):
        return is_text(t) or pa.types.is_integer(t)

    def is_text_list(t):
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_text(t.value_type)

    def is_image(t):
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type))

    names = set(schema.names)
    if col["image"] not in names:
        raise IngestError(f"{url}: no image column {col['image']!r}; columns: {', '.join(sorted(names))} (set data.columns.image)")
    checks = {"image": (is_image, "binary or a struct of {bytes, path}"), "text": (lambda t: is_text(t) or is_text_list(t), "a string or a list of strings"),
              "captions": (is_text_list, "a list of strings (map a single-caption column with data.columns.text)"),
              "label": (is_id, "a string or an integer"), "key": (is_id, "a string or an integer"), "split": (is_text, "a string"),
              "answer": (is_id, "a string or an integer"), "task": (is_text, "a string")}
    for role, (ok, expected) in checks.items():
        if col[role] in names and not ok(schema.field(col[role]).type):
            raise IngestError(f"{url}: column {col[role]!r} (role {role}) is {schema.field(col[role]).type}, expected {expected}; fix the file or map the role with data.columns.{role}")


def _parquet_record(src: Source, path: str, file: str, pos: int, rg: int, j: int, row: dict, col: dict, key: str) -> Item:
    caps = row.get(col["captions"]) or []
    text = row.get(col["text"])
    if isinstance(text, list):
        caps, text = text, None
    for k, c in enumerate(caps):
        if c is None:
            raise BadField(f"{col['captions']}[{k}]", "a string", c)
    if text is not None and not caps:
        caps = [text]
    caps = [c.strip() for c in caps]
    label = row.get(col["label"])
    label = None if label is None else str(label)
    answer = row.get(col["answer"])
    task = row.get(col["task"])
    if task is not None and task not in TASKS:
        raise BadField(col["task"], f"one of {', '.join(TASKS)}", task)
    task = task or ("vqa" if answer is not None else "caption" if any(caps) else "classification")
    if not any(caps) and not label:
        return Bad(key, file, pos, "empty-text", "no text, captions or label")
    text = next((c for c in caps if c), None) or readable_label(label)
    return Record(key=key, file=file, line=pos, task=task, text=text, captions=caps or None, label=label,
                  answer=None if answer is None else str(answer), split=_split(row, col["split"]),
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
