"""Hugging Face CLIP and SigLIP dual encoders behind the `DualEncoder` protocol.

Names `build_encoder` accepts through `build_hf_encoder`:
- `hf:<folder>`: any local CLIP or SigLIP checkpoint in Hugging Face format (OpenAI CLIP,
  RemoteCLIP or GeoRSCLIP converted to HF, SigLIP), with its own tokenizer; image mean, std and
  size come from its `preprocessor_config.json` when present.
- `clip-tiny`, `siglip-tiny`: random models built from small configs, for tests (no hub).

Tower features are what the models' `get_image_features` / `get_text_features` return as
`.pooler_output` (transformers 5): CLIP's projected embeddings, SigLIP's pooled head outputs.
Pixels arrive as the protocol's [B, 3, H, W] floats in [0, 255]; the tower resizes them to the
checkpoint's image size and normalises them with its mean and std.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsdist.models.dual import DualEncoder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class HFImageTower(nn.Module):
    """[B, 3, H, W] pixels in [0, 255] -> `get_image_features(...).pooler_output`."""

    def __init__(self, model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True)
        x = (pixels - self.mean) / self.std
        return self.model.get_image_features(pixel_values=x).pooler_output


class HFDualEncoder(DualEncoder):
    """A CLIPModel or SiglipModel as image and text towers (sharing one module), plus rsdist's heads."""

    def __init__(self, model: nn.Module, tokenizer, image_size: int, mean, std, embed_dim: int = 256, pad_to_max: bool = False):
        image_dim, text_dim = _feature_dims(model)
        super().__init__(HFImageTower(model, image_size, mean, std), image_dim, model, text_dim, tokenizer, embed_dim)
        self.pad_to_max = pad_to_max  # SigLIP was trained on max-length padded text

    def tokenize(self, texts: Sequence[str], max_len: int = 48) -> dict[str, torch.Tensor]:
        padding = "max_length" if self.pad_to_max else True
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pad_to_max:  # SigLIP's text tower attends to every position, as in its training
            return self.text_tower.get_text_features(input_ids=input_ids).pooler_output
        return self.text_tower.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _feature_dims(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    if cfg.model_type == "clip":
        return cfg.projection_dim, cfg.projection_dim
    return cfg.vision_config.hidden_size, cfg.text_config.hidden_size


def _tiny(kind: str, seed: int):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from rsdist.models.dual import minilm_tokenizer

    tokenizer = minilm_tokenizer()  # the BERT word-piece vocabulary of the composite encoder
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    if kind == "clip-tiny":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
        return model, tokenizer, 32, CLIP_MEAN, CLIP_STD, False
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    return model, tokenizer, 32, SIGLIP_MEAN, SIGLIP_STD, True


def _from_folder(path: str):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"encoder: hf:{path} is not a local checkpoint folder")
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in ("clip", "siglip"):
        raise ValueError(f"encoder: hf:{path} is a {cfg.model_type!r} checkpoint; supported: clip, siglip")
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    clip = cfg.model_type == "clip"
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else (SIGLIP_MEAN, SIGLIP_STD)
    size = cfg.vision_config.image_size
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre):
        with open(pre) as f:
            p = json.load(f)
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    return model, tokenizer, size, mean, std, not clip


def build_hf_encoder(name: str, embed_dim: int = 256, seed: int = 0) -> HFDualEncoder:
    """`clip-tiny`, `siglip-tiny` or `hf:<folder>` as an HFDualEncoder in eval mode."""
    if name in ("clip-tiny", "siglip-tiny"):
        parts = _tiny(name, seed)
    elif name.startswith("hf:"):
        parts = _from_folder(name[3:])
    else:
        raise ValueError(f"encoder: {name!r} is not one of: clip-tiny, siglip-tiny, hf:<folder>")
    model, tokenizer, size, mean, std, pad_to_max = parts
    model.eval()
    torch.manual_seed(seed)
    return HFDualEncoder(model, tokenizer, size, mean, std, embed_dim, pad_to_max)
