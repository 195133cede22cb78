"""Streaming reads of large JSON index files, so the driver never holds a whole document.

`iter_array(fs, path, prefix)` yields the elements of one array of a JSON document one at a time
(`"item"` = a top-level list, `"images.item"` = the list under the top-level key `images`) with
ijson's C parser. A malformed document stops the read with one `IngestError` naming the file and
the line. `json_kind` tells the JSON layouts apart (list of conversations, COCO, Karpathy) from
the first top-level keys, without building the document.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import ijson

from rsdist.ingest.errors import IngestError

# Above this size a malformed document is reported with ijson's own context, not re-parsed for its line.
_RELOCATE_MAX_BYTES = 256 * 1024 * 1024


def _ingest_error(message: str) -> Exception:
    return IngestError(message)


def iter_array(fs, path: str, prefix: str) -> Iterator[Any]:
    """The elements of the array at `prefix`, in order; nothing when the document has no such array."""
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
    if isinstance(error, UnicodeDecodeError):
        return f"{url}: not UTF-8 text: {error}"
    try:
        size = fs.size(path)
    except Exception:
        size = None
    if size is not None and size <= _RELOCATE_MAX_BYTES:
        with fs.open(path, "rb") as f:
            raw = f.read()
        try:
            json.loads(raw)
        except json.JSONDecodeError as e:
            return f"{url}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
        except UnicodeDecodeError as e:
            return f"{url}: not UTF-8 text: {e}"
    detail = " ".join(str(error).split())
    return f"{url}: malformed JSON: {detail[:300]}"
