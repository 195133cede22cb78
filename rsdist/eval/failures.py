"""A trained model's failures on the validation rows: where `error-driven` selection spends its budget.

Input: the similarity matrix of the validation images against all their captions (the eval
stage's encoders) and which image each caption belongs to.
Output: `<run>/eval/failures.parquet`, one row per failing validation image: `sample_id`,
`weight` (the share of its retrieval queries that miss), `i2t_rank` (rank of its best own caption
among all captions) and `t2i_rank` (its captions' best rank of it among all images). An image's
queries are the image itself (image -> text) and each of its captions (text -> image); a query
misses when its match is not among the first `rank` results. Images with no miss are not failures.
error-driven reads the rows' embeddings from `features/` by sample_id (validation rows are never
selected or trained on), so the file holds no embeddings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rsdist.core.metrics import image_to_text_ranks, text_to_image_ranks

SCHEMA = pa.schema([("sample_id", pa.string()), ("weight", pa.float64()), ("i2t_rank", pa.int64()), ("t2i_rank", pa.int64())])


def failure_table(sample_ids: list[str], sim: np.ndarray, text_image: np.ndarray, rank: int) -> pa.Table:
    """The failing images of `sample_ids` (rows of `sim`, columns its captions; see module docstring)."""
    n = len(sample_ids)
    i2t = image_to_text_ranks(sim, text_image)
    t2i = text_to_image_ranks(sim, text_image)
    caption_misses = np.bincount(text_image, weights=(t2i >= rank).astype(np.float64), minlength=n)
    queries = 1 + np.bincount(text_image, minlength=n)
    weight = ((i2t >= rank) + caption_misses) / queries
    best_t2i = np.full(n, sim.shape[0], dtype=np.int64)
    np.minimum.at(best_t2i, text_image, t2i)
    failing = np.flatnonzero(weight > 0)
    return pa.table(
        {
            "sample_id": pa.array([sample_ids[i] for i in failing], pa.string()),
            "weight": pa.array(weight[failing], pa.float64()),
            "i2t_rank": pa.array(i2t[failing], pa.int64()),
            "t2i_rank": pa.array(best_t2i[failing], pa.int64()),
        },
        schema=SCHEMA,
    )
