"""CLIP and SigLIP adapters: tiny random models from configs, the DualEncoder protocol, and a saved checkpoint."""

from __future__ import annotations

import pytest
import torch

from rsdist.config import ConfigError, FeaturesConfig
from rsdist.features.embed import image_features, mean_text_features
from rsdist.models.encoders import build_encoder


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_tiny_hf_encoders_follow_the_protocol(name):
    enc = build_encoder(name, embed_dim=16)
    pixels = torch.randint(0, 256, (3, 3, 40, 40)).float()  # not the model's 32 px: the tower resizes
    feats = enc.encode_image_features(pixels)
    assert feats.shape == (3, enc.image_dim) and torch.isfinite(feats).all()
    tokens = enc.tokenize(["a road near a river", "many buildings"], max_len=16)
    text = enc.encode_text_features(**tokens)
    assert text.shape == (2, enc.text_dim) and not torch.allclose(text[0], text[1])
    assert enc.project_image(feats).shape == (3, 16)
    # deterministic from the seed, so every actor builds the same model
    again = build_encoder(name, embed_dim=16)
    torch.testing.assert_close(again.encode_image_features(pixels), feats)


def test_feature_helpers_run_on_clip(tmp_path):
    enc = build_encoder("clip-tiny")
    imgs = torch.randint(0, 256, (2, 48, 48, 3), dtype=torch.uint8).numpy()
    assert image_features(enc, imgs).shape == (2, 32)
    mean = mean_text_features(enc, [["a", "b c"], ["a field"]])
    assert mean.shape == (2, 32)


def test_hf_folder_checkpoint_loads(tmp_path):
    enc = build_encoder("clip-tiny")
    folder = tmp_path / "clip"
    enc.text_tower.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    loaded = build_encoder(f"hf:{folder}")
    pixels = torch.randint(0, 256, (1, 3, 32, 32)).float()
    torch.testing.assert_close(loaded.encode_image_features(pixels), enc.encode_image_features(pixels))
    assert FeaturesConfig(encoder=f"hf:{folder}").encoder.startswith("hf:")


def test_unknown_encoder_is_named():
    with pytest.raises(ConfigError, match="features.encoder: 'clip' is not one of"):
        FeaturesConfig(encoder="clip")
    with pytest.raises(FileNotFoundError, match="hf:/nowhere"):
        build_encoder("hf:/nowhere")
