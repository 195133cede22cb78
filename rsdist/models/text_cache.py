"""Features of a frozen text tower, each distinct text encoded once per process.

When the text tower is not tuned (train.method 'heads', and the untrained baseline), the tower's
output for a caption is the same in every run of a process: an experiment's cells share one
cache instead of encoding the same pool and held-out captions again for every cell.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from rsdist.models.encoders import build_encoder

# Encoders whose towers are random (seeded) rather than pretrained: their features depend on the seed.
RANDOM_TOWERS = ("tiny", "clip-tiny", "siglip-tiny")


class FrozenTextFeatures:
    """Text-tower features (before the head) of texts, computed once per distinct text."""

    def __init__(self, encoder, max_tokens: int, batch_size: int = 256):
        self.encoder = encoder
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._features: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.encoder.text_dim

    def __len__(self) -> int:
        return len(self._features)

    def of(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 features, encoding only texts not seen before."""
        new = sorted({t for t in texts if t not in self._features})
        with torch.inference_mode():
            for start in range(0, len(new), self.batch_size):
                chunk = new[start:start + self.batch_size]
                tokens = self.encoder.tokenize(chunk, self.max_tokens)
                feats = self.encoder.encode_text_features(tokens["input_ids"], tokens["attention_mask"]).float().numpy()
                self._features.update(zip(chunk, feats))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._features[t] for t in texts])


@functools.lru_cache(maxsize=4)
def _cached(encoder: str, seed: int | None, max_tokens: int) -> FrozenTextFeatures:
    return FrozenTextFeatures(build_encoder(encoder, seed=seed or 0), max_tokens)


def frozen_text_features(encoder: str, seed: int, max_tokens: int) -> FrozenTextFeatures:
    """The process-wide cache of `encoder`'s frozen text tower (per seed only for random towers)."""
    return _cached(encoder, seed if encoder in RANDOM_TOWERS else None, max_tokens)
