"""Features of the same rows under another held-out split, taken from a run that computed them.

Input: `<run>/shards/` (this run's rows and their split) and `<source>/features/` (complete, made
with the same features settings from the same rows under another split).
Output: `<run>/features/`, the features stage's output exactly: the source's feature rows with the
`split` column of this run's shards, one file per shard, and the source's features_meta.json.

Why: embeddings and shift scores are functions of a row's image and captions, not of its split,
so a run that differs from another only in `data.test_offset` or `data.test_fraction` (a second
development split) need not encode every image again: the RSICD pool's features take 11 minutes
on 2 CPU cores, this takes seconds. The experiment uses it for each split after the first.
"""

from __future__ import annotations

import json
import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from rsdist.config import FeaturesConfig, config_to_dict
from rsdist.core.rundir import RunDir
from rsdist.stage import StageResult, completed

log = logging.getLogger("rsdist")

NAME = "features"
META = "features_meta.json"


def source_features_settings(source: RunDir) -> dict:
    """The features settings the source run was made with (its config.json)."""
    if completed(source, NAME) is None:
        raise FileNotFoundError(f"{source.url(NAME)}: no complete features output to take rows from")
    if not source.exists("config.json"):
        raise FileNotFoundError(f"{source.url('config.json')}: missing; cannot check the source's features settings")
    return source.read_json("config.json")["features"]


def check_same_settings(source: RunDir, cfg: FeaturesConfig) -> None:
    theirs = source_features_settings(source)
    ours = json.loads(json.dumps(config_to_dict(cfg), default=str))
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"{source.url('config.json')}: features.{differ[0]} is {theirs.get(differ[0])!r} there and "
                         f"{ours.get(differ[0])!r} here; features can only be taken from a run with the same features settings")


def resplit_table(features: pa.Table, shard: pa.Table, where: str) -> pa.Table:
    """`features` with its split column taken from `shard` (sample_id, split), matched by sample_id."""
    index = pc.index_in(features.column("sample_id"), value_set=shard.column("sample_id"))
    if features.num_rows != shard.num_rows or index.null_count:
        raise ValueError(f"{where}: the source's feature rows are not this shard's rows "
                         f"({features.num_rows} feature rows, {shard.num_rows} shard rows); was it made from the same data?")
    split = pc.take(shard.column("split"), index)
    return features.set_column(features.schema.get_field_index("split"), "split", split)


def run(run: RunDir, cfg: FeaturesConfig, source: RunDir) -> StageResult:
    check_same_settings(source, cfg)
    shards = run.parquet_files("shards")
    if not shards:
        raise FileNotFoundError(f"features: no parquet shards under {run.url('shards')}")
    splits: dict[str, int] = {}
    rows = 0
    for path in shards:
        name = posixpath.basename(path)
        if not source.exists(NAME, name):
            raise FileNotFoundError(f"{source.url(NAME, name)}: missing; the source has no features for shard {name}")
        shard = run.read_table("shards", name, columns=["sample_id", "split"])
        table = resplit_table(source.read_table(NAME, name), shard, source.url(NAME, name))
        run.write_table(table, NAME, name)
        rows += table.num_rows  # equal to the shard's rows: resplit_table checks it
        for value, count in zip(*pc.value_counts(table.column("split")).flatten()):
            splits[str(value)] = splits.get(str(value), 0) + count.as_py()
    run.write_json(source.read_json(NAME, META), NAME, META)
    log.info("features: took %d rows from %s with this run's split %s", rows, source.url(NAME), splits)
    return StageResult(rows_in=rows, rows_out=rows, extra={"taken_from": source.url(NAME), "splits": splits})
