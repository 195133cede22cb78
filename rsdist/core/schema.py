"""The canonical sample schema every stage after ingest consumes.

One parquet row is one sample. In multi-caption data (RSICD: five captions per image) a sample is
the image with all its captions (`captions`), and `text` holds the first one, so budgets count
images. VQA and instruction data have one sample per question or conversation.
"""

from __future__ import annotations

import re

import hashlib

import pyarrow as pa

TASKS = ("caption", "vqa", "classification", "instruction")
SPLITS = ("train", "val", "test")

CONVERSATION_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])

CANONICAL_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.binary()),
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("task", pa.string()),
        ("text", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("conversations", pa.list_(CONVERSATION_TYPE)),
        ("label", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Columns a model pass needs; reading only these keeps the driver and workers light.
MODEL_INPUT_COLUMNS = ["sample_id", "image", "text", "captions", "label", "split"]


def make_sample_id(source: str, key: str) -> str:
    """Stable id: the same source name and record key give the same id on any machine."""
    return hashlib.sha1(f"{source}\x00{key}".encode("utf-8")).hexdigest()[:20]


def hash_fraction(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample id, used to draw held-out splits reproducibly."""
    return int(hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


def hash_split(sample_id: str, test_fraction: float, test_offset: float = 0.0, val_fraction: float = 0.0) -> str:
    """The split the hash draws: 'test' when the sample's hash fraction lies in the held-out window
    [test_offset, test_offset + test_fraction), 'val' in the validation window that follows it
    [test_offset + test_fraction, + val_fraction) (both wrapping past 1), else 'train'."""
    position = (hash_fraction(sample_id) - test_offset) % 1.0
    if position < test_fraction:
        return "test"
    return "val" if position < test_fraction + val_fraction else "train"


def empty_row() -> dict:
    """A canonical row with every field present and empty, to be filled by a reader."""
    return {
        "sample_id": None,
        "image": None,
        "image_format": None,
        "width": None,
        "height": None,
        "task": "caption",
        "text": None,
        "captions": None,
        "answer": None,
        "conversations": None,
        "label": None,
        "split": "train",
        "source": None,
        "meta": "{}",
    }


def readable_label(label: str) -> str:
    """'DenseResidential' / 'dense_residential' -> 'dense residential' (text of classification rows)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", label)
    return re.sub(r"[_\-]+", " ", spaced).strip().lower()
