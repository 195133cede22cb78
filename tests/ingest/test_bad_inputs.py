"""A corpus of bad inputs over all nine source formats, each written here in tmp_path.

Every case ends one of two ways: the bad record becomes a quarantined row with its own reason code
and a detail naming the line or key (the good records next to it are written, their captions on
their own images), or the whole input is unusable and `rsdist ingest` prints one line
`rsdist: error: ...` naming the file (exit 2, no traceback). Counts always add up:
read = written + quarantined, and the quarantine holds one row per quarantined record.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rsdist.cli import main
from rsdist.config import DataConfig
from rsdist.ingest import stage as ingest
from rsdist.ingest.readers import FORMATS, IngestError
from rsdist.core.rundir import RunDir
from tests.ingest.conftest import geotiff_bytes, image_bytes, put, write_json

# --- small writers -----------------------------------------------------------------------------


def _img(root, rel: str, fmt: str = "PNG", shade: int = 0) -> None:
    put(f"{root}/images/{rel}", image_bytes(fmt, color=(10 + shade, 120, 200)))


def _captions_txt(root, names: list[str], caps: list[str], images: Optional[list[str]] = None) -> str:
    for k, n in enumerate(images if images is not None else names):
        _img(root, f"Scene/{n}", shade=k)
    put(f"{root}/captions/train_filename.txt", "\n".join(names) + "\n")
    put(f"{root}/captions/train_caps.txt", "\n".join(caps) + "\n")
    return str(root)


def _five(name: str) -> list[str]:
    return [f"caption of {posixpath.splitext(name)[0]}"] * 5


def _jsonl(root, lines: list, images=("good.png",)) -> str:
    for k, n in enumerate(images):
        _img(root, n, shade=k)
    put(f"{root}/data.jsonl", b"".join((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n" for ln in lines))
    return f"{root}/data.jsonl"


GOOD_JSONL = {"filename": "good.png", "captions": ["caption of good"]}


def _karpathy(root, entries: list, images=("good.png",)) -> str:
    for k, n in enumerate(images):
        _img(root, n, shade=k)
    write_json(f"{root}/dataset.json", {"images": entries})
    return str(root)


GOOD_KARPATHY = {"filename": "good.png", "split": "train", "sentences": [{"raw": "caption of good"}]}


def _coco(root, images: list, annotations: list, files=("1.png",)) -> str:
    for k, n in enumerate(files):
        _img(root, n, shade=k)
    write_json(f"{root}/captions.json", {"images": images, "annotations": annotations})
    return str(root)


GOOD_COCO_IMAGE = {"id": 1, "file_name": "1.png"}
GOOD_COCO_ANN = {"image_id": 1, "caption": "caption of 1"}


def _llava(root, items: list, images=("good.png",), raw: Optional[bytes] = None) -> str:
    for k, n in enumerate(images):
        _img(root, n, shade=k)
    put(f"{root}/instruct.json", raw if raw is not None else json.dumps(items))
    return str(root)


def _turns(q: str = "What is here?", a: str = "a harbor") -> list:
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


GOOD_LLAVA = {"id": "good", "image": "good.png", "conversations": _turns()}


def _rsvqa(root, questions: list, answers=None, images=None) -> str:
    put(f"{root}/images/0.tif", geotiff_bytes(bands=3))
    write_json(f"{root}/LR_split_train_images.json", {"images": images if images is not None else [{"id": 0, "active": True}]})
    write_json(f"{root}/LR_split_train_questions.json", {"questions": [{"id": 0, "img_id": 0, "question": "Is there a road?", "answers_ids": [0], "active": True}, *questions]})
    write_json(f"{root}/LR_split_train_answers.json", {"answers": answers if answers is not None else [{"id": 0, "answer": "yes", "active": True}]})
    return str(root)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD_WDS = [("good.png", image_bytes()), ("good.txt", b"caption of good")]


def _wds(root, *shards: bytes) -> str:
    for k, data in enumerate(shards):
        put(f"{root}/shard-{k:03d}.tar", data)
    return str(root)


def _parquet(root, table: pa.Table, name: str = "train-00000.parquet") -> str:
    os.makedirs(root, exist_ok=True)
    pq.write_table(table, f"{root}/{name}")
    return str(root)


def _image_column(n: int) -> list:
    return [{"bytes": image_bytes(color=(10 * k, 100, 50)), "path": f"{k}.png"} for k in range(n)]


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png16() -> bytes:
    arr = (np.arange(24 * 16, dtype=np.uint32).reshape(16, 24) * 170).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png16_rgb() -> bytes:
    """12-bit data in a 16-bit RGB PNG (Pillow alone would keep the high byte: values 0..15)."""
    import png

    arr = np.random.default_rng(1).integers(0, 4096, (16, 24, 3)).astype(np.uint16)
    buf = io.BytesIO()
    png.Writer(24, 16, greyscale=False, bitdepth=16).write(buf, arr.reshape(16, -1).tolist())
    return buf.getvalue()


def _float_tiff() -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.linspace(-3.0, 900.0, 24 * 16, dtype=np.float32).reshape(16, 24))
    return buf.getvalue()


def _tiff_bomb() -> bytes:
    """A 300-byte TIFF that declares 10000 x 10000 pixels of five bands (500 MB once decoded)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((64, 64, 5), np.uint8), compression="zlib", photometric="minisblack", planarconfig="contig", rowsperstrip=64, metadata=None)
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257, 278):  # width, height, rows per strip
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, 10000)
    return bytes(data)


# --- the corpus --------------------------------------------------------------------------------


@dataclass
class Case:
    """One class of bad input: how to write it, and how ingest must answer."""

    id: str
    format: str
    build: Callable  # (root) -> source, or (source, DataConfig overrides)
    reason: Optional[str] = None  # the quarantine reason code of the bad record(s)
    detail: str = ""  # a substring of that row's detail (the line, field or file it names)
    error: Optional[str] = None  # a substring of the one `rsdist: error:` line (None: no error)
    names: str = ""  # the file the error line must name
    check: Optional[Callable] = None  # more assertions on (rows, quarantine)
    count: int = 1  # quarantined rows of `reason`
    settings: dict = field(default_factory=dict)


def _aligned(rows, quarantine) -> None:
    """Never a caption on another image: each row's captions name its own image."""
    for r in rows:
        stem = posixpath.splitext(posixpath.basename(json.loads(r["meta"])["key"]))[0]
        assert all(c == f"caption of {stem}" for c in r["captions"]), (stem, r["captions"])


def _converted(source_format: str):
    def check(rows, quarantine):
        meta = json.loads(rows[-1]["meta"])
        assert meta["converted_from"] == source_format and rows[-1]["image_format"] == "png"
        rgb = np.asarray(Image.open(io.BytesIO(rows[-1]["image"])))
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.min() == 0 and rgb.max() == 255  # stretched, not clipped to white
    return check


def _outside_link(root, rel: str) -> None:
    outside = os.path.join(os.path.dirname(root), "outside")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "secret.png"), "wb") as f:
        f.write(image_bytes())
    os.makedirs(os.path.dirname(f"{root}/images/{rel}"), exist_ok=True)
    os.symlink(os.path.join(outside, "secret.png"), f"{root}/images/{rel}")


def _scene_symlink(root):
    _img(root, "Forest/a.png")
    _outside_link(root, "Forest/linked.png")
    return str(root)


def _scene_symlinked_folder(root):
    _img(root, "Forest/a.png")
    outside = os.path.join(os.path.dirname(root), "elsewhere")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "b.png"), "wb") as f:
        f.write(image_bytes())
    os.symlink(outside, f"{root}/images/Harbor")
    return str(root)


def _txt_symlink(root):
    _captions_txt(root, ["good.png", "linked.png"], _five("good.png") + _five("linked.png"), images=["good.png"])
    _outside_link(root, "Scene/linked.png")
    return str(root)


def _dotdot(root):
    _img(root, "x.png")  # an in-root file with the same name must not be taken instead
    put(f"{os.path.dirname(root)}/outside/x.png", image_bytes())
    return _jsonl(root, [GOOD_JSONL, {"filename": "../../outside/x.png", "captions": ["caption of x"]}])


def _scene(root, files: dict) -> str:
    _img(root, "Forest/good.png")
    for rel, data in files.items():
        put(f"{root}/images/{rel}", data)
    return str(root)


def _pixel_limit(limit: int) -> dict:
    """Case settings that lower Pillow's pixel limit for the case (a real bomb would take seconds to write)."""
    return {"_pixel_limit": limit}


CASES = [
    # scene-folders
    Case("truncated-jpeg", "scene-folders", lambda r: _scene(r, {"Forest/t.jpg": image_bytes("JPEG")[:300]}), "unreadable-image"),
    Case("non-image-bytes", "scene-folders", lambda r: _scene(r, {"Forest/n.png": b"this is not an image"}), "unreadable-image", "UnidentifiedImageError"),
    Case("zero-byte-image", "scene-folders", lambda r: _scene(r, {"Forest/z.png": b""}), "unreadable-image", "zero-byte"),
    Case("tiff-decompression-bomb", "scene-folders", lambda r: _scene(r, {"Forest/bomb.tif": _tiff_bomb()}), "too-many-pixels", "10000"),
    Case("png-over-pixel-limit", "scene-folders", lambda r: _scene(r, {"Forest/big.png": image_bytes(size=(200, 100))}), "too-many-pixels", settings=_pixel_limit(5000)),
    Case("image-over-max-bytes", "scene-folders", lambda r: (_scene(r, {"Forest/big.png": _noise_png(64)}), {"max_image_bytes": 4000}), "too-large", "max_image_bytes"),
    Case("16-bit-png-converted", "scene-folders", lambda r: _scene(r, {"Forest/z16.png": _png16()}), check=_converted("png")),
    Case("16-bit-rgb-png-converted", "scene-folders", lambda r: _scene(r, {"Forest/z16rgb.png": _png16_rgb()}), check=_converted("png")),
    Case("float-tiff-converted", "scene-folders", lambda r: _scene(r, {"Forest/zf.tif": _float_tiff()}), check=_converted("tiff")),
    Case("symlink-to-outside-file", "scene-folders", _scene_symlink, "outside-root", "secret.png"),
    Case("symlinked-folder-outside", "scene-folders", _scene_symlinked_folder, check=lambda rows, q: [r["label"] for r in rows] == ["Forest"]),
    Case("empty-source-folder", "scene-folders", lambda r: (os.makedirs(r), str(r))[1], error="holds no scene-folders records", names="empty-source-folder"),
    # captions-txt
    Case("counts-fit-another-per-image", "captions-txt", lambda r: _captions_txt(r, [f"i{k}.png" for k in range(10)], [f"caption of i{k // 5}" for k in range(40)]),
         error="they fit 4 per image: set data.captions_per_image: 4", names="train_caps.txt"),
    Case("counts-with-declared-per-image", "captions-txt", lambda r: (_captions_txt(r, [f"i{k}.png" for k in range(10)], [f"caption of i{k // 4}" for k in range(40)]), {"captions_per_image": 4}),
         check=lambda rows, q: len(rows) == 10 and _aligned(rows, q) is None),
    Case("counts-fit-no-layout", "captions-txt", lambda r: _captions_txt(r, ["a.png", "b.png"], ["x", "y", "z"]), error="3 caption lines do not match 2 names", names="train_caps.txt"),
    Case("trailing-empty-captions", "captions-txt", lambda r: _captions_txt(r, [f"i{k}.png" for k in range(5)], [c for k in range(4) for c in _five(f"i{k}.png")] + [""] * 5),
         "empty-text", "line 21", check=_aligned),
    Case("empty-caption", "captions-txt", lambda r: _captions_txt(r, ["good.png", "e.png"], _five("good.png") + [" "] * 5), "empty-text", check=_aligned),
    Case("caption-not-utf8", "captions-txt", lambda r: _txt_bytes(r), "bad-encoding", "caption line 6", check=_aligned),
    Case("line-separator-inside-caption", "captions-txt", lambda r: _captions_txt(r, ["good.png", "sep.png"], _five("good.png") + ["caption of sep"] * 4 + ["caption\u2028 of sep"]),
         check=lambda rows, q: rows[1]["captions"][-1] == "caption\u2028 of sep" and _aligned(rows[:1], q) is None),
    Case("symlink-in-images-root", "captions-txt", _txt_symlink, "outside-root", check=_aligned),
    Case("missing-images-root", "captions-txt", lambda r: (put(f"{r}/captions/train_filename.txt", "a.png\n"), put(f"{r}/captions/train_caps.txt", "x\n" * 5), str(r))[2],
         error="images root", names="missing-images-root/images"),
    Case("duplicate-name", "captions-txt", lambda r: _captions_txt(r, ["good.png", "good.png"], _five("good.png") * 2, images=["good.png"]), "duplicate-key", check=_aligned),
    # captions-jsonl
    Case("jsonl-captions-number", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": "good.png", "captions": 5}]), "bad-field", "'captions': expected a list of strings, got a number 5"),
    Case("jsonl-filename-number", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": 12345, "captions": ["x"]}]), "bad-field", "'filename'"),
    Case("jsonl-split-number", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": "good.png", "id": "b", "captions": ["x"], "split": 3}]), "bad-field", "'split'"),
    Case("jsonl-captions-object", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": "good.png", "id": "b", "captions": {"a": 1}}]), "bad-field", "got an object"),
    Case("jsonl-bad-json-line", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, b"{not json"]), "bad-json", "line 2"),
    Case("jsonl-line-not-object", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, ["good.png", "x"]]), "bad-record", "line 2"),
    Case("jsonl-invalid-utf8", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, b'{"filename": "good.png", "captions": ["\xff\xfe"]}']), "bad-encoding", "line 2"),
    Case("jsonl-lone-surrogate", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, b'{"filename": "good.png", "id": "s", "captions": ["bad \\ud800 text"]}']), "bad-encoding", "captions[0]"),
    Case("jsonl-dotdot-path", "captions-jsonl", _dotdot, "outside-root", "leads outside the images root"),
    Case("jsonl-ambiguous-name", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": "other/x.png", "captions": ["caption of x"]}], images=("good.png", "A/x.png", "B/x.png")),
         "ambiguous-image", "'x.png'"),
    Case("jsonl-duplicate-key", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, GOOD_JSONL]), "duplicate-key", "line 2"),
    Case("jsonl-missing-image", "captions-jsonl", lambda r: _jsonl(r, [GOOD_JSONL, {"filename": "gone.png", "captions": ["x"]}]), "missing-image", "gone.png"),
    # karpathy-json
    Case("karpathy-filename-number", "karpathy-json", lambda r: _karpathy(r, [GOOD_KARPATHY, {"filename": 7, "sentences": [{"raw": "x"}]}]), "bad-field", "'filename'"),
    Case("karpathy-filepath-number", "karpathy-json", lambda r: _karpathy(r, [GOOD_KARPATHY, {"filename": "b.png", "filepath": 3, "sentences": [{"raw": "x"}]}]), "bad-field", "'filepath'"),
    Case("karpathy-sentences-string", "karpathy-json", lambda r: _karpathy(r, [GOOD_KARPATHY, {"filename": "good.png", "sentences": "a string"}]), "bad-field", "'sentences'"),
    Case("karpathy-raw-number", "karpathy-json", lambda r: _karpathy(r, [GOOD_KARPATHY, {"filename": "good.png", "sentences": [{"raw": 5}]}]), "bad-field", "sentences[0].raw"),
    Case("karpathy-lone-surrogate", "karpathy-json", lambda r: _karpathy_raw(r, b'{"images": [%s,\n{"filename": "good.png", "imgid": 2, "sentences": [{"raw": "x \\udc80"}]}]}' % json.dumps(GOOD_KARPATHY).encode()),
         error="the escape \\udc80 is a lone surrogate", names="dataset.json:2"),
    Case("karpathy-top-level-list", "karpathy-json", lambda r: (_karpathy_raw(r, b"[1, 2]"), {"format": "karpathy-json"}),
         error="top level is not an object", names="dataset.json"),
    Case("karpathy-invalid-utf8-document", "karpathy-json", lambda r: _karpathy_raw(r, b'{"images": [{"filename": "good.png", "sentences": [{"raw": "\xff"}]}]}'), error="not UTF-8", names="dataset.json"),
    Case("karpathy-malformed-json", "karpathy-json", lambda r: _karpathy_raw(r, b'{"images": [\n {"filename": "good.png",\n oops}\n]}'), error="dataset.json:3: malformed JSON", names="dataset.json"),
    # coco-captions
    Case("coco-id-list", "coco-captions", lambda r: _coco(r, [GOOD_COCO_IMAGE, {"id": [2], "file_name": "1.png"}], [GOOD_COCO_ANN]), "bad-field", "'id'"),
    Case("coco-duplicate-id", "coco-captions", lambda r: _coco(r, [GOOD_COCO_IMAGE, {"id": 2, "file_name": "2.png"}, {"id": 2, "file_name": "3.png"}],
                                                                [GOOD_COCO_ANN, {"image_id": 2, "caption": "which one?"}], files=("1.png", "2.png", "3.png")), "duplicate-key", "different file names", count=2),
    Case("coco-orphan-annotation", "coco-captions", lambda r: _coco(r, [GOOD_COCO_IMAGE], [GOOD_COCO_ANN, {"image_id": 9, "caption": "orphan"}]), "dangling-ref", "image id 9"),
    Case("coco-caption-number", "coco-captions", lambda r: _coco(r, [GOOD_COCO_IMAGE], [GOOD_COCO_ANN, {"image_id": 1, "caption": 5}]), "bad-field", "'caption'"),
    Case("coco-missing-lists", "coco-captions", lambda r: (_coco(r, [], []) and write_json(f"{r}/captions.json", {"images": []}) or str(r), {"format": "coco-captions"}),
         error="needs 'images' and 'annotations' lists", names="captions.json"),
    # llava-json
    Case("llava-image-list", "llava-json", lambda r: _llava(r, [GOOD_LLAVA, {"id": "b", "image": ["good.png"], "conversations": _turns()}]), "bad-field", "'image'"),
    Case("llava-value-number", "llava-json", lambda r: _llava(r, [GOOD_LLAVA, {"id": "b", "image": "good.png", "conversations": [{"from": "human", "value": 5}]}]), "bad-field", "conversations[0].value"),
    Case("llava-empty-turns", "llava-json", lambda r: _llava(r, [GOOD_LLAVA, {"id": "b", "image": "good.png", "conversations": [{"from": "human", "value": " "}]}]), "empty-text"),
    Case("llava-lone-surrogate", "llava-json", lambda r: _llava(r, [], raw=b'[%s, {"id": "s", "image": "good.png", "conversations": [{"from": "human", "value": "\\ud83d"}]}]' % json.dumps(GOOD_LLAVA).encode()),
         error="is a lone surrogate", names="instruct.json:1"),
    Case("llava-top-level-object", "llava-json", lambda r: (_llava(r, [], raw=b'{"conversations": []}'), {"format": "llava-json"}), error="not a JSON list of conversations", names="instruct.json"),
    Case("llava-image-without-images-root", "llava-json", lambda r: (put(f"{r}/instruct.json", json.dumps([GOOD_LLAVA])), str(r))[1],
         error="names image 'good.png' but the images root", names="llava-image-without-images-root/images"),
    # rsvqa
    Case("rsvqa-dangling-image", "rsvqa", lambda r: _rsvqa(r, [{"id": 1, "img_id": 7, "question": "Is it rural?", "answers_ids": [0], "active": True}]), "dangling-ref", "image id 7"),
    Case("rsvqa-dangling-answer", "rsvqa", lambda r: _rsvqa(r, [{"id": 1, "img_id": 0, "question": "Is it rural?", "answers_ids": [42], "active": True}]), "dangling-ref", "answer ids [42]"),
    Case("rsvqa-inactive", "rsvqa", lambda r: _rsvqa(r, [{"id": 1, "img_id": 0, "question": "Is it rural?", "answers_ids": [0], "active": False}]), "inactive"),
    Case("rsvqa-answer-ids-string", "rsvqa", lambda r: _rsvqa(r, [{"id": 1, "img_id": 0, "question": "Is it rural?", "answers_ids": "0", "active": True}]), "bad-field", "'answers_ids'"),
    # webdataset
    Case("wds-duplicate-member", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.png", image_bytes()), ("b.txt", b"first"), ("b.png", image_bytes("JPEG"))])), "duplicate-member", "'b.png'"),
    Case("wds-corrupt-tar-among-good", "webdataset", lambda r: _wds(r, _tar(GOOD_WDS), b"\x00garbage" * 100), "unreadable-shard", "not a readable tar"),
    Case("wds-missing-image-member", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.txt", b"orphan text")])), "missing-image"),
    Case("wds-bad-json-member", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.png", image_bytes()), ("b.json", b"{oops")])), "bad-json", "b.json"),
    Case("wds-text-not-utf8", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.png", image_bytes()), ("b.txt", b"\xff\xfe caption")])), "bad-encoding", "b.txt"),
    Case("wds-captions-not-list", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.png", image_bytes()), ("b.json", b'{"captions": "one string"}')])), "bad-field", "'captions'"),
    Case("wds-json-lone-surrogate", "webdataset", lambda r: _wds(r, _tar([*GOOD_WDS, ("b.png", image_bytes()), ("b.json", b'{"caption": "x \\ud800"}')])), "bad-encoding", "captions[0]"),
    # parquet
    Case("parquet-image-int64", "parquet", lambda r: _parquet(r, pa.table({"image": [1, 2], "text": ["a", "b"]})), error="column 'image' (role image) is int64", names="train-00000.parquet"),
    Case("parquet-captions-plain-string", "parquet", lambda r: _parquet(r, pa.table({"image": _image_column(2), "captions": ["a", "b"]})), error="column 'captions' (role captions) is string", names="train-00000.parquet"),
    Case("parquet-not-parquet-file", "parquet", lambda r: (_parquet(r, pa.table({"image": _image_column(1), "text": ["caption of 0"]})), put(f"{r}/train-00001.parquet", b"PAR1 not really"), str(r))[2],
         "unreadable-shard", "not a readable parquet file"),
    Case("parquet-only-file-not-parquet", "parquet", lambda r: (put(f"{r}/train-00000.parquet", b"PAR1 not really"), str(r))[1],
         error="the first: train-00000.parquet (key train-00000.parquet): unreadable-shard: file: not a readable parquet file", names="train-00000.parquet"),
    Case("parquet-path-only-image", "parquet", lambda r: _parquet(r, pa.table({"image": [*_image_column(1), {"bytes": None, "path": "/etc/hostname"}], "text": ["a", "b"]})), "missing-image", "only as path"),
    Case("parquet-junk-bytes", "parquet", lambda r: _parquet(r, pa.table({"image": [*_image_column(1), {"bytes": b"junk", "path": "j.png"}], "text": ["a", "b"]})), "unreadable-image"),
    Case("parquet-null-caption", "parquet", lambda r: _parquet(r, pa.table({"image": _image_column(2), "captions": [["a"], ["b", None]]})), "bad-field", "captions[1]"),
    Case("parquet-unknown-task", "parquet", lambda r: _parquet(r, pa.table({"image": _image_column(2), "text": ["a", "b"], "task": ["caption", "segmentation"]})), "bad-field", "one of caption"),
    Case("parquet-unknown-split-word", "parquet", lambda r: _parquet(r, pa.table({"image": _image_column(2), "text": ["a", "b"], "split": ["train", "holdout"]})), "bad-field", "'split'"),
    Case("parquet-no-text-or-label", "parquet", lambda r: _parquet(r, pa.table({"image": _image_column(2), "text": ["a", None]})), "empty-text"),
]


def _txt_bytes(root) -> str:
    _captions_txt(root, ["good.png", "bad.png"], _five("good.png") + ["x"] * 5)
    caps = "\n".join(_five("good.png")).encode() + b"\ncaption of bad \xff\n" + b"caption of bad\n" * 4
    put(f"{root}/captions/train_caps.txt", caps)
    return str(root)


def _karpathy_raw(root, data: bytes) -> str:
    _img(root, "good.png")
    put(f"{root}/dataset.json", data)
    return str(root)


def test_the_corpus_covers_every_format_and_31_classes():
    assert {c.format for c in CASES} == set(FORMATS)
    assert len({c.id for c in CASES}) == len(CASES) >= 31


def _build(case: Case, root: str) -> tuple[str, dict]:
    built = case.build(root)
    source, overrides = built if isinstance(built, tuple) else (built, {})
    return source, overrides


def _quarantine_cases():
    return [pytest.param(c, id=c.id) for c in CASES if c.error is None]


def _error_cases():
    return [pytest.param(c, id=c.id) for c in CASES if c.error is not None]


@pytest.mark.parametrize("case", _quarantine_cases())
def test_bad_record_is_quarantined_with_its_reason(case: Case, tmp_path, monkeypatch):
    if "_pixel_limit" in case.settings:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.settings["_pixel_limit"])
    root = str(tmp_path / case.id)
    source, overrides = _build(case, root)
    run = RunDir(str(tmp_path / "run"))
    result = ingest.run(run, DataConfig(source=source, format=case.format, engine="local", **overrides))
    rows = run.read_table("shards").to_pylist() if run.parquet_files("shards") else []
    quarantine = run.read_table("shards", "quarantine").to_pylist() if run.parquet_files("shards", "quarantine") else []
    report = run.read_json("shards", "ingest_report.json")
    assert report["read"] == report["written"] + report["quarantined"] == len(rows) + len(quarantine) == result.rows_in
    assert report["written"] == len(rows) >= 1 and sum(report["quarantined_by_reason"].values()) == len(quarantine)
    if case.reason is None:
        assert quarantine == [], quarantine
    else:
        assert report["quarantined_by_reason"] == {case.reason: case.count}, quarantine
        for q in quarantine:
            assert q["source"] and q["key"] and q["detail"].split(":")[0] in ("file",) + tuple(f"line {n}" for n in range(1, 100))
            assert case.detail in q["detail"] or case.detail in q["key"], q
    if case.check is not None:
        case.check(rows, quarantine)


@pytest.mark.parametrize("case", _error_cases())
def test_unusable_input_is_one_error_naming_the_file(case: Case, tmp_path):
    """The stage raises one IngestError, a single line the CLI prints as `rsdist: error: ...`."""
    root = str(tmp_path / case.id)
    source, overrides = _build(case, root)
    data = DataConfig(source=source, **{"format": case.format, "engine": "local", **overrides})
    with pytest.raises(IngestError) as raised:
        ingest.run(RunDir(str(tmp_path / "run")), data)
    message = str(raised.value)
    assert "\n" not in message and case.error in message and case.names in message, message


def test_the_cli_prints_an_unusable_input_as_one_line(tmp_path, capsys, ray_session):
    case = next(c for c in CASES if c.id == "counts-fit-another-per-image")
    source, _ = _build(case, str(tmp_path / case.id))
    assert main(["ingest", "--source", source, "--out", str(tmp_path / "run"), "--set", "data.engine=local"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("rsdist:")] == [
        f"rsdist: error: file://{source}/captions/train_caps.txt: 40 caption lines do not match 10 names in file://{source}/captions/train_filename.txt "
        "(neither data.captions_per_image=5 per name nor one per name); they fit 4 per image: set data.captions_per_image: 4 if that is the layout"]


def test_a_file_swapped_for_a_link_after_listing_is_not_opened(tmp_path):
    """The images root is listed first and read later (on workers): the check is repeated at open."""
    from rsdist.ingest.materialize import materialize

    root = _scene(str(tmp_path / "ds"), {"Forest/late.png": image_bytes()})
    src = ingest.open_source(DataConfig(source=root, format="scene-folders"))
    items = {i.key: i for i in ingest.iter_items(src)}
    os.remove(f"{root}/images/Forest/late.png")
    _outside_link(root, "Forest/late.png")
    row = materialize(items["Forest/late.png"], src.name, 0.1, 1 << 20)
    assert row["_reason"] == "outside-root" and "secret.png" in row["_detail"]
    assert materialize(items["Forest/good.png"], src.name, 0.1, 1 << 20)["image_format"] == "png"


def test_an_index_file_that_cannot_be_read_is_one_error(tmp_path):
    """A name that matches the index pattern but cannot be opened (a link to a folder) stops the stage in one line."""
    root = tmp_path / "ds"
    _jsonl(str(root), [GOOD_JSONL])
    os.symlink(root / "images", root / "more.jsonl")
    with pytest.raises(IngestError) as raised:
        ingest.run(RunDir(str(tmp_path / "run")), DataConfig(source=str(root), format="captions-jsonl", engine="local"))
    assert "\n" not in str(raised.value) and "an index file cannot be read: IsADirectoryError" in str(raised.value), raised.value
    assert "more.jsonl" in str(raised.value)
