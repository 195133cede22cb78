"""The rows training and evaluation read: features joined with captions, filtered by split or selection.

Training never decodes images: the image tower is frozen, so the tower features the features
stage stored (`image_emb`) are exactly what the image tower would produce again; training and
evaluation feed them straight to the image head. Captions come from the canonical shards.
Only the needed columns are read, in record batches, and only the wanted rows are kept, so the
driver holds the selected (or held-out) rows and never the whole pool.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rsdist.core.rundir import RunDir

log = logging.getLogger("rsdist")

MANIFEST = ("selection", "manifest.parquet")
FEATURES_META = ("features", "features_meta.json")


def features_encoder(run: RunDir) -> str:
    """The encoder the features stage embedded with: training and evaluation build the same one."""
    if not run.exists(*FEATURES_META):
        raise FileNotFoundError(f"{run.url(*FEATURES_META)}: not found (run the features stage first)")
    return run.read_json(*FEATURES_META)["encoder"]


def selected_ids(run: RunDir) -> pa.Array:
    """Sample ids of the manifest rows with selected == True."""
    if not run.exists(*MANIFEST):
        raise FileNotFoundError(f"{run.url(*MANIFEST)}: selection manifest not found (run the select stage first)")
    table = run.read_table(*MANIFEST, columns=["sample_id", "selected"])
    if table.column("selected").null_count:
        raise ValueError(f"{run.url(*MANIFEST)}: column 'selected' has null values")
    return pc.filter(table.column("sample_id"), table.column("selected")).combine_chunks()


def check_selected_found(run: RunDir, ids: pa.Array, found: pa.Array, folder: str) -> None:
    """Every selected id must have a row in `folder`; the error names the first one that has none."""
    if len(found) < len(ids):
        have = set(found.to_pylist())
        missing = next(s for s in ids.to_pylist() if s not in have)
        raise ValueError(f"{run.url(*MANIFEST)}: selected sample {missing} has no row in {run.url(folder)}")


def _filtered(run: RunDir, folder: str, columns: list[str], keep) -> pa.Table:
    """Stream `folder`'s parquet files and keep the rows for which `keep(batch)` is True."""
    if not run.parquet_files(folder):
        raise FileNotFoundError(f"{run.url(folder)}: no parquet files (run the {folder} stage first)")
    parts = []
    for batch in run.iter_batches(folder, columns=columns, batch_size=4096):
        missing = [c for c in columns if c not in batch.schema.names]
        if missing:
            raise ValueError(f"{run.url(folder)}: missing column(s) {', '.join(missing)}")
        mask = keep(batch)
        parts.append(pa.Table.from_batches([batch]).filter(mask))
    return pa.concat_tables(parts).combine_chunks() if parts else pa.table({c: [] for c in columns})


def feature_rows(run: RunDir, ids: pa.Array | None = None, split: str | tuple[str, ...] | None = None, exclude_split: str | None = None) -> pa.Table:
    """Features rows (sample_id, split, label, image_emb) with the given ids and/or split (one name, or
    a tuple of names read in one pass)."""

    def keep(batch: pa.RecordBatch):
        mask = pa.array(np.ones(batch.num_rows, dtype=bool))
        if ids is not None:
            mask = pc.and_(mask, pc.is_in(batch.column("sample_id"), value_set=ids))
        if isinstance(split, tuple):
            mask = pc.and_(mask, pc.is_in(batch.column("split"), value_set=pa.array(split, pa.string())))
        elif split is not None:
            mask = pc.and_(mask, pc.equal(batch.column("split"), split))
        if exclude_split is not None:
            mask = pc.and_(mask, pc.fill_null(pc.not_equal(batch.column("split"), exclude_split), True))
        return pc.fill_null(mask, False)

    return _filtered(run, "features", ["sample_id", "split", "label", "image_emb"], keep)


def caption_rows(run: RunDir, ids: pa.Array) -> pa.Table:
    """Shard rows (sample_id, captions) for the given ids; `text` stands in for empty caption lists."""
    table = _filtered(run, "shards", ["sample_id", "captions", "text"], lambda b: pc.is_in(b.column("sample_id"), value_set=ids))
    captions = []
    for sid, caps, text in zip(table.column("sample_id").to_pylist(), table.column("captions").to_pylist(), table.column("text").to_pylist()):
        caps = [c for c in (caps or []) if c and c.strip()]
        if not caps and text and text.strip():
            caps = [text]
        if not caps:
            raise ValueError(f"{run.url('shards')}: sample {sid} has no caption (captions and text are empty)")
        captions.append(caps)
    return pa.table({"sample_id": table.column("sample_id"), "captions": pa.array(captions, type=pa.list_(pa.string()))})


def join_captions(run: RunDir, features: pa.Table) -> pa.Table:
    """Features rows with a `captions` column added, in the features' row order."""
    caps = caption_rows(run, features.column("sample_id"))
    pos = pc.index_in(features.column("sample_id"), value_set=caps.column("sample_id"))
    if pos.null_count:
        missing = pc.filter(features.column("sample_id"), pc.is_null(pos))[0].as_py()
        raise ValueError(f"{run.url('shards')}: sample {missing} is in features but not in the shards")
    return features.append_column("captions", caps.column("captions").take(pos))


def training_rows(run: RunDir) -> tuple[pa.Table, int]:
    """The selected, non-test rows with image_emb and captions; also how many selected rows there were."""
    ids = selected_ids(run)
    feats = feature_rows(run, ids=ids)
    check_selected_found(run, ids, feats.column("sample_id"), "features")
    is_test = pc.fill_null(pc.equal(feats.column("split"), "test"), False)
    n_test = pc.sum(is_test).as_py() or 0
    if n_test:
        log.warning("train: %d selected rows are in the test split; they are held out and not trained on", n_test)
        feats = feats.filter(pc.invert(is_test))
    rows = join_captions(run, feats.select(["sample_id", "image_emb"]))
    return rows, len(ids)


def split_rows(run: RunDir, split: str | tuple[str, ...]) -> pa.Table:
    """The features rows of one split, or of a tuple of splits in one read (sample_id, split, label,
    image_emb), with their captions."""
    return join_captions(run, feature_rows(run, split=split))


def validation_rows(run: RunDir) -> pa.Table:
    """The validation rows (split == 'val'; never selected or trained on) for train.keep_epoch 'best-val'."""
    rows = split_rows(run, "val")
    if rows.num_rows == 0:
        raise ValueError(f"{run.url('features')}: train.keep_epoch 'best-val' needs validation rows (split == 'val'); set data.val_fraction or give the data a val split")
    return rows


def pick_caption_index(n_captions: int, seed: int, epoch: int, sample_id: str) -> int:
    """Which of an image's captions this epoch uses, fixed by (seed, epoch, sample_id): independent
    of which worker sees the row and in which order, so a resumed run draws the same captions."""
    h = int(hashlib.sha1(f"{seed}:{epoch}:{sample_id}".encode()).hexdigest()[:8], 16)
    return h % n_captions


def pick_caption(captions, seed: int, epoch: int, sample_id: str) -> str:
    """One caption per image per epoch (see pick_caption_index)."""
    return str(captions[pick_caption_index(len(captions), seed, epoch, sample_id)])


def with_caption_features(rows: pa.Table, text_features) -> pa.Table:
    """Add `caption_feats`: the frozen text tower's features of every caption of each row, flattened
    (n_captions x dim float32 values, caption order kept); `text_features` is a FrozenTextFeatures.

    With a frozen text tower (train.method 'heads') these never change, so training reads them
    instead of running the tower on every step of every epoch."""
    captions = rows.column("captions").to_pylist()
    table = text_features.of([c for caps in captions for c in caps])
    ends = np.cumsum([len(caps) for caps in captions])
    flat = [part.reshape(-1) for part in np.split(table, ends[:-1])] if captions else []
    return rows.append_column("caption_feats", pa.array(flat, type=pa.list_(pa.float32())))
