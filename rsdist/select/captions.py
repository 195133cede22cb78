"""`caption-diversity`: spend each cluster's quota on the images whose captions say the most.

Caption pools are redundant on the text side: in RSICD, 54% of images repeat one sentence five
times and the most common sentence describes 101 different images. An image whose captions are
distinct and rare gives a contrastive learner several different, specific text views; one whose
five captions are the same generic sentence gives one, and that sentence is also a false negative
for every other image it describes.

Score of image i: its caption information, the sum over its distinct (normalised) captions c of
1 / df(c), where df(c) is the number of pool images that have caption c. So a unique sentence
counts 1 and a sentence shared by 100 images counts 0.01. The budget is split over clusters by
the quota rule (proportional keeps the scene mix of the pool), and each cluster keeps its
highest-scoring images (`select.keep: lowest` keeps the most repeated captions instead, `both`
takes the two ends in turn); equal scores are ordered by a seeded random draw.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

from rsdist.select.budget import top_per_group
from rsdist.select.strategies import Selection, cluster_quotas, members_of

_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.!?,;:]+$")


def normalize_caption(text: str) -> str:
    """Lowercase, single spaces, no trailing punctuation: 'A  bridge .' and 'a bridge' are one caption."""
    return _TRAILING.sub("", _SPACE.sub(" ", text.strip().lower()))


def caption_information(captions: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(information, distinct count) per image: sum of 1 / df over its distinct captions (see module doc)."""
    distinct = [{normalize_caption(c) for c in caps if c and c.strip()} for caps in captions]
    df = Counter(c for caps in distinct for c in caps)
    info = np.array([sum(1.0 / df[c] for c in caps) for caps in distinct], dtype=np.float64)
    counts = np.array([len(caps) for caps in distinct], dtype=np.int64)
    return info, counts


def alternate_ends(groups: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    """A new key under which each group's rows come lowest, highest, second lowest, second highest, ... of `key`."""
    out = np.empty(len(key), dtype=np.float64)
    for rows in members_of(groups, k):
        order = rows[np.argsort(key[rows], kind="stable")]
        n = len(order)
        position = np.arange(n)
        # Taking order: low end at even turns (0, 2, ...), high end at odd turns (1, 3, ...).
        turn = np.minimum(2 * position, 2 * (n - 1 - position) + 1)
        out[order] = -turn.astype(np.float64)
    return out


def caption_diversity_select(k: int, groups: np.ndarray, information: np.ndarray, budget: int, quota: str, seed: int, keep: str = "highest") -> Selection:
    """Per-cluster quotas, then by `keep` of the caption information in each cluster (seeded ties):
    'highest' = the most informative captions, 'lowest' = the most repeated ones, 'both' = the two
    ends in turn (canonical and specific descriptions of each scene type)."""
    if keep not in ("highest", "lowest", "both"):
        raise ValueError(f"keep {keep!r} is not one of: highest, lowest, both")
    information = np.asarray(information, dtype=np.float64)
    quotas = cluster_quotas(groups, k, budget, quota)
    # Order by information first and a seeded draw second: dense rank + a draw in [0, 0.5).
    dense = np.unique(-information if keep == "lowest" else information, return_inverse=True)[1].astype(np.float64)
    key = dense + 0.5 * np.random.default_rng(seed).random(len(groups))
    if keep == "both":
        key = alternate_ends(groups, key, k)
    selected, rank = top_per_group(groups, key, quotas)
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        where = f"caption information {information[i]:.3f}, rank {rank[i] + 1} in cluster, quota {quotas[groups[i]]}"
        reason[i] = f"kept: {where}" if selected[i] else f"dropped: {where}"
    return Selection(selected, information.astype(np.float32), reason, quotas)
