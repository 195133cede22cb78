"""HarMA adapters and loss on the tiny encoder."""

from __future__ import annotations

import math

import pytest
import torch

from rsdist.models.encoders import build_encoder
from rsdist.models.harma import attach_harma, harma_loss
from rsdist.models.tuned import count_parameters

TEXTS = ["many houses and roads", "a forest of green trees with a river", "an airport", "bare land"]


def embed(encoder, feats, texts=TEXTS):
    tokens = encoder.tokenize(texts)
    return encoder.project_image(feats), encoder.project_text(encoder.encode_text_features(**tokens))


def test_adapters_start_as_identity_and_only_they_and_heads_train():
    torch.manual_seed(0)
    feats = torch.randn(4, 32)
    encoder = build_encoder("tiny", embed_dim=16)
    before = embed(encoder, feats)
    total_before = count_parameters(encoder)[1]
    attach_harma(encoder, hidden=16, heads=2, mini_dim=8)
    after = embed(encoder, feats)
    assert torch.allclose(before[0], after[0], atol=1e-6) and torch.allclose(before[1], after[1], atol=1e-6)
    trainable, total = count_parameters(encoder)
    added = total - total_before
    heads = sum(p.numel() for m in (encoder.image_head[1], encoder.text_head) for p in m.parameters()) + 1
    assert trainable == added + heads
    assert all(not p.requires_grad for p in encoder.text_tower.embeddings.parameters())


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    feats = torch.randn(4, 32)
    encoder = build_encoder("tiny", embed_dim=16)
    attach_harma(encoder, hidden=16, heads=2, mini_dim=8)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        image, text = embed(encoder, feats)
        loss = harma_loss(image, text, encoder.logit_scale)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    assert any(float(a.up.weight.detach().abs().sum()) > 0 for a in encoder.harma.text)


def test_padding_does_not_change_a_caption_embedding():
    torch.manual_seed(0)
    encoder = build_encoder("tiny", embed_dim=16)
    adapters = attach_harma(encoder, hidden=16, heads=2, mini_dim=8)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    encoder.eval()
    with torch.no_grad():
        alone = encoder.encode_text_features(**encoder.tokenize(["an airport"]))
        padded = encoder.encode_text_features(**encoder.tokenize(["an airport", "a very long caption about a dense residential area with many roads"]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_loss_by_hand_on_orthogonal_embeddings():
    # Perfectly matched orthonormal pairs: every s_ii = 1, s_ij = 0, so each triplet cost is
    # [0.2 + 0 - 1]+ = 0 and the InfoNCE term is -log(e^s / (e^s + (n-1))) with s = exp(logit_scale).
    n, scale = 3, torch.tensor(math.log(2.0))
    eye = torch.eye(n)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + n - 1))
    assert float(harma_loss(eye, eye, scale)) == pytest.approx(expected, rel=1e-5)
    # Margin larger than the gap: cost = 1.5 - 1 = 0.5 per negative, weight (1 - e^-0.5)^2.
    w = (1 - math.exp(-0.5)) ** 2 * 0.5
    triplet = 0.5 * (2 * w + 2 * w)  # per anchor: n - 1 = 2 negatives, both directions, halved
    assert float(harma_loss(eye, eye, scale, margin=1.5)) == pytest.approx(expected + triplet, rel=1e-5)


def test_rows_of_the_same_image_are_positives():
    # Two identical rows: as captions of one image neither is the other's negative (soft InfoNCE
    # target 1/2 each, no triplet term); as two images each is the other's negative at cost 0.2.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    scale = torch.tensor(0.0)
    same = harma_loss(image, image, scale, image_ids=torch.tensor([0, 0]))
    assert float(same) == pytest.approx(math.log(2.0), rel=1e-6)
    w = (1 - math.exp(-0.2)) ** 2 * 0.2
    distinct = harma_loss(image, image, scale)
    assert float(distinct) == pytest.approx(math.log(2.0) + w, rel=1e-6)
