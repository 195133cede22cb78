"""Encoders by name: the embedded composite, a tiny one for tests, CLIP / SigLIP (rsdist.models.hf)."""

from __future__ import annotations

import torch

from rsdist.models.dual import DualEncoder, EfficientNetLiteTower, TinyConvTower, minilm_path, minilm_tokenizer
from rsdist.models.hf import build_hf_encoder


def build_encoder(name: str, embed_dim: int = 256, seed: int = 0) -> DualEncoder:
    """Build an encoder by name ('composite', 'tiny', or a CLIP/SigLIP one of rsdist.models.hf); heads are seeded."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    # The MiniLM checkpoint carries a pooler we do not use; its load report is noise in every worker.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if name in ("clip-tiny", "siglip-tiny") or name.startswith("hf:"):
        return build_hf_encoder(name, embed_dim, seed)
    if name == "composite":
        image_tower, image_dim = EfficientNetLiteTower(), EfficientNetLiteTower.dim
        text_tower = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False)
        text_dim = text_tower.config.hidden_size
    elif name == "tiny":
        torch.manual_seed(seed)
        image_tower, image_dim = TinyConvTower(), TinyConvTower.dim
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
        text_tower, text_dim = BertModel(cfg, add_pooling_layer=False), 32
    else:
        raise ValueError(f"encoder: {name!r} is not one of: composite, tiny, clip-tiny, siglip-tiny, hf:<folder>")
    image_tower.eval()
    text_tower.eval()
    torch.manual_seed(seed)
    return DualEncoder(image_tower, image_dim, text_tower, text_dim, minilm_tokenizer(), embed_dim)
