"""Streaming reads of large JSON index files, so the driver never holds a whole document.

`iter_array(fs, path, prefix)` yields the elements of one array of a JSON document one at a time
(`"item"` = a top-level list, `"images.item"` = the list under the top-level key `images`) with
ijson's C parser. A malformed document stops the read with one `IngestError` naming the file and
the line. `json_kind` tells the JSON layouts apart (list of conversations, COCO, Karpathy) from
the first top-level keys, without building the document.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import ijson

from rsdist.ingest.errors import IngestError

# Above this size a malformed document is reported with ijson's own context, not re-parsed for its line.
_RELOCATE_MAX_BYTES = 256 * 1024 * 1024


def _ingest_error(message: str) -> Exception:
    return IngestError(message)


def iter_array(fs, path: str, prefix: str) -> Iterator[Any]:
    """The elements of the array at `prefix`, in order; nothing when the document has no such array."""
    check_surrogates(fs, path)
    with fs.open(path, "rb") as f:
        try:
            yield from ijson.items(f, prefix, use_float=True)
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise _ingest_error(_malformed(fs, path, e)) from None


def first_char(fs, path: str) -> str:
    """The first non-blank character of the document ('[' for a list, '{' for an object)."""
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(4096)
            if not block:
                return ""
            text = block.lstrip()
            if text:
                return text[:1].decode("latin-1")


def top_level_arrays(fs, path: str) -> set[str]:
    """Top-level keys of an object document whose value is an array (one streaming pass)."""
    found: set[str] = set()
    with fs.open(path, "rb") as f:
        try:
            for prefix, event, _ in ijson.parse(f):
                if event == "start_array" and prefix and "." not in prefix:
                    found.add(prefix)
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise _ingest_error(_malformed(fs, path, e)) from None
    return found


def json_kind(fs, path: str) -> str:
    """'list', 'coco' (top-level `annotations`), 'karpathy' (top-level `images` list) or 'unknown'.

    Stops as soon as the layout is clear: at `annotations`, or at the first image entry that has
    `sentences`; a Karpathy file without sentences in its first entry is read to its end.
    """
    head = first_char(fs, path)
    if head == "[":
        return "list"
    if head != "{":
        return "unknown"
    has_images = False
    with fs.open(path, "rb") as f:
        try:
            for prefix, event, value in ijson.parse(f):
                if prefix == "" and event == "map_key" and value == "annotations":
                    return "coco"
                if prefix == "images" and event == "start_array":
                    has_images = True
                elif prefix == "images.item" and event == "map_key" and value == "sentences":
                    return "karpathy"
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise _ingest_error(_malformed(fs, path, e)) from None
    return "karpathy" if has_images else "unknown"


def _malformed(fs, path: str, error: Exception) -> str:
    """One line naming the file and the line of the first error (found by the standard parser)."""
    url = fs.unstrip_protocol(path)
    try:
        size = fs.size(path)
    except Exception:
        size = None
    if size is None or size > _RELOCATE_MAX_BYTES:
        detail = " ".join(str(error).split())
        return f"{url}: {'not UTF-8 text' if isinstance(error, UnicodeDecodeError) else 'malformed JSON'}: {detail[:300]}"
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"{url}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"{url}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
    detail = " ".join(str(error).split())
    return f"{url}: malformed JSON: {detail[:300]}"


# A \uD800-\uDFFF escape that is not a high surrogate followed by a low one (an even run of
# backslashes before it: `\\ud800` is an escaped backslash and the text "ud800").
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})"  # a high surrogate not followed by a low one
    rb"|(?<!\\)(?<!\\ud[89ab][0-9a-f]{2})(?:\\\\)*\\ud[c-f][0-9a-f]{2}",  # a low surrogate not preceded by a high one
    re.IGNORECASE,
)
_SCAN_BLOCK = 16 * 1024 * 1024
_SCAN_OVERLAP = 64
_scanned: set = set()


def check_surrogates(fs, path: str) -> None:
    """Refuse a document holding an escaped lone surrogate (`"\\ud800"`), naming its line.

    ijson's C parser turns a lone high surrogate into '?' without a word and stops on a lone low
    one; neither is text that can be stored, so the document is refused before it is read.
    One streaming pass per file and process (remembered by URL and size).
    """
    url = fs.unstrip_protocol(path)
    try:
        stamp = (url, fs.size(path))
    except Exception:
        stamp = None
    if stamp is not None and stamp in _scanned:
        return
    lines, tail = 0, b""
    with fs.open(path, "rb") as f:
        block = f.read(_SCAN_BLOCK)
        while block:
            following = f.read(_SCAN_BLOCK)
            text = tail + block
            # A match near either end of a window is judged in the window that sees both sides of it.
            first, last = (16 if tail else 0), (len(text) - 12 if following else len(text))
            for found in _LONE_SURROGATE.finditer(text):
                if first <= found.start() and found.end() <= last:
                    line = lines + text[: found.start()].count(b"\n") + 1
                    escape = found.group(0).lstrip(b"\\").decode("ascii")
                    raise _ingest_error(f"{url}:{line}: the escape \\{escape} is a lone surrogate, not a character; fix or remove it")
            keep = min(_SCAN_OVERLAP, len(text))
            lines += text[: len(text) - keep].count(b"\n")
            tail, block = text[len(text) - keep :], following
    if stamp is not None:
        _scanned.add(stamp)
