"""Evaluation math as pure functions: similarity matrices and ground truth in, percentages out.

Retrieval with several captions per image is counted the standard way (as in the RSICD/RSITMD
literature and HarMA's code): image->text is a hit at K when any caption of the image ranks
within the top K; text->image is a hit at K when the caption's own image ranks within the top K.
A rank is the number of candidates scored strictly higher than the ground truth (ties favour the
ground truth). mR is the mean of the six recalls (R@1/5/10 both ways).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

CHUNK = 1024


def _check(sim: np.ndarray, text_image: np.ndarray) -> None:
    if sim.ndim != 2 or text_image.ndim != 1 or sim.shape[1] != text_image.shape[0]:
        raise ValueError(f"similarity {sim.shape} and text_image {text_image.shape}: need [images, texts] and [texts]")
    if text_image.size and (text_image.min() < 0 or text_image.max() >= sim.shape[0]):
        raise ValueError("text_image holds an index outside the images")


def image_to_text_ranks(sim: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """For each image, the rank of its best-ranked own caption. `sim[i, j]`: image i vs text j;
    `text_image[j]`: the image text j belongs to. Images without a caption get rank len(texts)."""
    sim, text_image = np.asarray(sim), np.asarray(text_image)
    _check(sim, text_image)
    best_own = np.full(sim.shape[0], -np.inf, dtype=np.float64)
    np.maximum.at(best_own, text_image, sim[text_image, np.arange(sim.shape[1])])
    ranks = np.empty(sim.shape[0], dtype=np.int64)
    for start in range(0, sim.shape[0], CHUNK):
        block = sim[start:start + CHUNK]
        ranks[start:start + CHUNK] = (block > best_own[start:start + CHUNK, None]).sum(axis=1)
    ranks[np.isneginf(best_own)] = sim.shape[1]
    return ranks


def text_to_image_ranks(sim: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """For each text, the rank of its own image among all images."""
    sim, text_image = np.asarray(sim), np.asarray(text_image)
    _check(sim, text_image)
    ranks = np.empty(sim.shape[1], dtype=np.int64)
    for start in range(0, sim.shape[1], CHUNK):
        block = sim[:, start:start + CHUNK]
        own = block[text_image[start:start + CHUNK], np.arange(block.shape[1])]
        ranks[start:start + CHUNK] = (block > own[None, :]).sum(axis=0)
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of queries whose rank is below K, for each K."""
    ranks = np.asarray(ranks)
    return {int(k): float(100.0 * (ranks < k).mean()) if ranks.size else 0.0 for k in ks}


def retrieval_metrics(sim: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`i2t_r{K}`, `t2i_r{K}` for each K and `mR`, the mean of them all, in percent."""
    i2t = recall_at_k(image_to_text_ranks(sim, text_image), ks)
    t2i = recall_at_k(text_to_image_ranks(sim, text_image), ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    out["mR"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
    return out


def classification_accuracy(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """Top-1 accuracy (percent) of argmax over `scores` [N, C] against label indices [N], overall
    and per class (classes without samples are left out of the per-class table)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != (labels.shape[0], len(class_names)):
        raise ValueError(f"scores {scores.shape} must be [{labels.shape[0]}, {len(class_names)}]")
    correct = scores.argmax(axis=1) == labels
    per_class = {name: float(100.0 * correct[labels == c].mean()) for c, name in enumerate(class_names) if (labels == c).any()}
    return {"accuracy": float(100.0 * correct.mean()) if labels.size else 0.0, "per_class": per_class, "count": int(labels.size)}


def label_words(label: str) -> str:
    """A class name as words for a prompt: 'DenseResidential' -> 'dense residential',
    'storage_tanks' -> 'storage tanks'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", label)
    return " ".join(re.split(r"[\s_\-]+", spaced)).strip().lower()


def class_prompts(labels: Sequence[str], template: str) -> list[str]:
    return [template.format(label=label_words(label)) for label in labels]
