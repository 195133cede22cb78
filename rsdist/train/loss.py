"""Contrastive losses over a batch of matched (image, text) embeddings (row i matches row i)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy.

    `image`, `text`: L2-normalised [B, D]; `logit_scale`: log of the inverse temperature.
    """
    logits = logit_scale.exp() * image @ text.t()
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
