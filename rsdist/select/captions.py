"""`caption-diversity` and `caption-typicality`: spend each cluster's quota by what the captions say.

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

`caption-typicality` scores an image by how typical its caption words are of its cluster: the mean
over its distinct words of the word's log lift in the cluster (`caption_typicality`). The highest
are images whose text and picture agree on what the cluster is about (a stadium described with
"stadium", "playground", "track"); the lowest are described by words the cluster rarely uses.
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
    info = np.array([sum(1.0 / df[c] for c in sorted(caps)) for caps in distinct], dtype=np.float64)  # sorted: the same sum in every process
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


def caption_select(
    k: int, groups: np.ndarray, score: np.ndarray, budget: int, quota: str, seed: int, keep: str = "highest", what: str = "caption information", draw: np.ndarray | None = None
) -> Selection:
    """Per-cluster quotas, then by `keep` of a caption score (`what`) in each cluster (seeded ties).
    For the caption information: 'highest' = the most informative captions, 'lowest' = the most
    repeated ones, 'both' = the two ends in turn (canonical and specific descriptions of each scene
    type). `draw`: the rows' tie-breaking draws (default: numpy's default_rng(seed).random(rows))."""
    if keep not in ("highest", "lowest", "both"):
        raise ValueError(f"keep {keep!r} is not one of: highest, lowest, both")
    score = np.asarray(score, dtype=np.float64)
    quotas = cluster_quotas(groups, k, budget, quota)
    draw = np.random.default_rng(seed).random(len(groups)) if draw is None else np.asarray(draw, dtype=np.float64)
    key = score_then_draw(-score if keep == "lowest" else score, draw)
    if keep == "both":
        key = alternate_ends(groups, key, k)
    selected, rank = top_per_group(groups, key, quotas)
    reason = np.empty(len(groups), dtype=object)
    for i in range(len(groups)):
        where = f"{what} {score[i]:.3f}, rank {rank[i] + 1} in cluster, quota {quotas[groups[i]]}"
        reason[i] = f"kept: {where}" if selected[i] else f"dropped: {where}"
    return Selection(selected, score.astype(np.float32), reason, quotas)


def score_then_draw(score: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """A key ordering rows by score, then by the seeded draw, then by row (each row's rank)."""
    order = np.lexsort((-np.arange(len(score)), draw, score))
    key = np.empty(len(score), dtype=np.float64)
    key[order] = np.arange(len(score))
    return key


_WORD = re.compile(r"[a-z]+")


def caption_words(captions: Sequence[Sequence[str]]) -> list[list[str]]:
    """The distinct lowercase words of each image's captions, sorted."""
    return [sorted({w for c in caps if c for w in _WORD.findall(c.lower())}) for caps in captions]


def caption_typicality(captions: Sequence[Sequence[str]], groups: np.ndarray, k: int) -> np.ndarray:
    """Per image, the mean over its distinct caption words w of log(P(w | its cluster) / P(w)).

    P(w | cluster) is the share of the cluster's images whose captions use w, P(w) the same share
    over the pool (each with one added to the number of images). Words no other pool image uses
    are left out: one image is no evidence of what a cluster is about. An image with no shared
    words scores 0.
    """
    groups = np.asarray(groups, dtype=np.int64)
    words = caption_words(captions)
    vocab = {w: j for j, w in enumerate(sorted({w for ws in words for w in ws}))}
    rows = np.repeat(np.arange(len(words)), [len(ws) for ws in words])
    cols = np.array([vocab[w] for ws in words for w in ws], dtype=np.int64)
    in_cluster = np.zeros((k, len(vocab)), dtype=np.float64)
    np.add.at(in_cluster, (groups[rows], cols), 1.0)
    in_pool = in_cluster.sum(axis=0)
    shared = in_pool[cols] >= 2
    rows, cols = rows[shared], cols[shared]
    sizes = np.bincount(groups, minlength=k).astype(np.float64)
    lift = np.log(in_cluster[groups[rows], cols] / (sizes[groups[rows]] + 1)) - np.log(in_pool[cols] / (len(groups) + 1))
    n_words = np.bincount(rows, minlength=len(words)).astype(np.float64)
    return np.bincount(rows, weights=lift, minlength=len(words)) / np.maximum(n_words, 1.0)
