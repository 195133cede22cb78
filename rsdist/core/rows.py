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


def caption_lists(run: RunDir, table: pa.Table) -> pa.Table:
    """Shard rows (sample_id, captions, text) as (sample_id, captions): the non-blank captions, or
    `text` when there are none; a row with neither names its sample."""
    captions = []
    for sid, caps, text in zip(table.column("sample_id").to_pylist(), table.column("captions").to_pylist(), table.column("text").to_pylist()):
        caps = [c for c in (caps or []) if c and c.strip()]
        if not caps and text and text.strip():
            caps = [text]
        if not caps:
            raise ValueError(f"{run.url('shards')}: sample {sid} has no caption (captions and text are empty)")
        captions.append(caps)
    return pa.table({"sample_id": table.column("sample_id"), "captions": pa.array(captions, type=pa.list_(pa.string()))})


def caption_rows(run: RunDir, ids: pa.Array) -> pa.Table:
    """Shard rows (sample_id, captions) for the given ids; `text` stands in for empty caption lists."""
    table = _filtered(run, "shards", ["sample_id", "captions", "text"], lambda b: pc.is_in(b.column("sample_id"), value_set=ids))
    return caption_lists(run, table)


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


# -- rows read on Ray workers ------------------------------------------------------------------------
# Training and evaluation read their rows with Ray Data tasks over the run directory: one task per
# features file keeps the wanted rows (the selected non-test rows, or the rows of given splits),
# joins each row's captions from the input shard of the same name (the features stage writes one
# output file per input shard, rows in its order) and yields blocks of at most `block_rows` rows.
# The driver holds file names and per-file row counts only.

FEATURE_COLUMNS = ["sample_id", "split", "label", "image_emb"]


def selected_id_set(run: RunDir) -> pa.Array:
    """On a worker: the manifest's selected ids (as many as the budget), read by row groups."""
    import pyarrow.parquet as pq

    if not run.exists(*MANIFEST):
        raise FileNotFoundError(f"{run.url(*MANIFEST)}: selection manifest not found (run the select stage first)")
    parts = []
    with run.fs.open(run.path(*MANIFEST), "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=["sample_id", "selected"]):
            if batch.column("selected").null_count:
                raise ValueError(f"{run.url(*MANIFEST)}: column 'selected' has null values")
            parts.append(pc.filter(batch.column("sample_id"), batch.column("selected")))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _wanted_mask(batch: pa.RecordBatch, ids: pa.Array | None, splits: tuple[str, ...] | None) -> pa.Array:
    if ids is not None:  # selected rows, never the test split
        mask = pc.and_(pc.is_in(batch.column("sample_id"), value_set=ids), pc.fill_null(pc.not_equal(batch.column("split"), "test"), True))
    else:
        mask = pc.is_in(batch.column("split"), value_set=pa.array(splits, pa.string()))
    return pc.fill_null(mask, False)


def wanted_features(run: RunDir, path: str, ids: pa.Array | None, splits: tuple[str, ...] | None) -> tuple[pa.Table, int]:
    """The wanted rows of one features file (FEATURE_COLUMNS, file order) and, with `ids`, how many
    of its rows are selected (test rows included), which tells a missing feature row apart."""
    import pyarrow.parquet as pq

    parts, selected = [], 0
    with run.fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192, columns=FEATURE_COLUMNS):
            missing = [c for c in FEATURE_COLUMNS if c not in batch.schema.names]
            if missing:
                raise ValueError(f"{run.fs.unstrip_protocol(path)}: missing column(s) {', '.join(missing)}")
            if ids is not None:
                selected += pc.sum(pc.is_in(batch.column("sample_id"), value_set=ids)).as_py() or 0
            parts.append(pa.Table.from_batches([batch]).filter(_wanted_mask(batch, ids, splits)))
    table = pa.concat_tables(parts).combine_chunks() if parts else pa.table({c: [] for c in FEATURE_COLUMNS})
    return table, selected


def shard_captions(run: RunDir, features_path: str, ids: pa.Array) -> pa.Table:
    """Captions (sample_id, captions) of `ids` from the input shard named like `features_path`."""
    import pyarrow.parquet as pq

    shard = run.path("shards", features_path.rsplit("/", 1)[-1])
    if not run.fs.exists(shard):
        raise ValueError(f"{run.url('shards')}: no shard {features_path.rsplit('/', 1)[-1]} for {run.fs.unstrip_protocol(features_path)}")
    parts = []
    with run.fs.open(shard, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192, columns=["sample_id", "captions", "text"]):
            parts.append(pa.Table.from_batches([batch]).filter(pc.is_in(batch.column("sample_id"), value_set=ids)))
    table = pa.concat_tables(parts) if parts else pa.table({"sample_id": [], "captions": [], "text": []})
    return caption_lists(run, table)


def with_shard_captions(run: RunDir, features_path: str, rows: pa.Table) -> pa.Table:
    """`rows` with a `captions` column, in the rows' order (see join_captions)."""
    caps = shard_captions(run, features_path, rows.column("sample_id"))
    pos = pc.index_in(rows.column("sample_id"), value_set=caps.column("sample_id"))
    if pos.null_count:
        missing = pc.filter(rows.column("sample_id"), pc.is_null(pos))[0].as_py()
        raise ValueError(f"{run.url('shards')}: sample {missing} is in features but not in the shards")
    return rows.append_column("captions", caps.column("captions").take(pos))


def count_wanted(run: RunDir, path: str, selected: bool, splits: tuple[str, ...] | None) -> tuple[int, int]:
    """Ray task: (wanted rows, selected rows) of one features file."""
    ids = selected_id_set(run) if selected else None
    table, n_selected = wanted_features(run, path, ids, splits)
    return table.num_rows, n_selected


def manifest_summary(run: RunDir) -> tuple[int, str | None]:
    """Ray task: (selected rows in the manifest, the first selected id with no features row or None)."""
    import pyarrow.parquet as pq

    ids = selected_id_set(run)
    found = np.zeros(len(ids), dtype=bool)
    for path in run.parquet_files("features"):
        with run.fs.open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=["sample_id"]):
                pos = pc.index_in(batch.column("sample_id"), value_set=ids).drop_null().to_numpy()
                found[pos] = True
    missing = np.flatnonzero(~found)
    return len(ids), (ids[int(missing[0])].as_py() if len(missing) else None)


def read_rows(batch: dict, run: RunDir, selected: bool, splits: tuple[str, ...] | None, block_rows: int, caption_features: tuple | None = None):
    """Ray Data read task over items {file, skip, take, item}: the wanted rows [skip, skip + take) of
    each features file with their captions (and, with `caption_features` = (encoder, seed,
    max_tokens), the frozen text tower's `caption_feats`), yielded in blocks of at most `block_rows`
    rows. Evaluation rows also carry `item` and `pos` (the row's place in the item), by which a
    consumer restores the features order whatever order the blocks arrive in."""
    ids = selected_id_set(run) if selected else None
    for path, skip, take, item in zip(batch["file"], batch["skip"], batch["take"], batch["item"]):
        rows, _ = wanted_features(run, str(path), ids, splits)
        rows = rows.slice(int(skip), int(take))
        for start in range(0, rows.num_rows, block_rows):
            block = with_shard_captions(run, str(path), rows.slice(start, block_rows))
            if selected:
                block = block.select(["sample_id", "image_emb", "captions"])
            else:
                block = block.select(["sample_id", "split", "label", "image_emb", "captions"])
                block = block.append_column("item", pa.array(np.full(block.num_rows, int(item)), pa.int64()))
                block = block.append_column("pos", pa.array(np.arange(start, start + block.num_rows), pa.int64()))
            if caption_features is not None:
                from rsdist.models.text_cache import frozen_text_features

                block = with_caption_features(block, frozen_text_features(*caption_features))
            yield block


def rank_items(counts: list[tuple[str, int]], workers: int) -> list[list[dict]]:
    """Split the wanted rows, in file order, into `workers` equal contiguous ranges (the remainder
    dropped, as Ray Train's equal split does): per rank, the {file, skip, take} items to read."""
    total = sum(n for _, n in counts)
    per = total // workers
    ranks: list[list[dict]] = [[] for _ in range(workers)]
    offset = 0
    for path, n in counts:
        for r in range(workers):
            lo, hi = max(r * per, offset), min((r + 1) * per, offset + n)
            if hi > lo:
                ranks[r].append({"file": path, "skip": lo - offset, "take": hi - lo})
        offset += n
    return ranks


def worker_dataset(run: RunDir, items: list[dict], selected: bool, splits: tuple[str, ...] | None, block_rows: int, caption_features: tuple | None = None):
    """A lazy Ray Dataset of `read_rows` over `items` (one read task per item)."""
    import ray.data

    items = [{**it, "item": i} for i, it in enumerate(items)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_rows, batch_size=1, batch_format="numpy", num_cpus=0.25,
        fn_kwargs={"run": run, "selected": selected, "splits": splits, "block_rows": block_rows, "caption_features": caption_features})
