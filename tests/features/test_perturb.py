"""Perturbations: seeded per sample (not per batch), shape-preserving, and actually perturbing."""

from __future__ import annotations

import numpy as np
import pytest

from rsdist.features.perturb import IMAGE_PERTURBATIONS, TEXT_PERTURBATIONS, perturb_batch, perturb_image, perturb_texts
from rsdist.features.preprocess import decode_resized, preprocess_batch

from .conftest import scene_jpeg


@pytest.fixture(scope="module")
def image():
    return decode_resized(scene_jpeg(np.random.default_rng(3)), 64)


@pytest.mark.parametrize("name", IMAGE_PERTURBATIONS)
def test_image_perturbation_is_seeded_and_changes_the_image(image, name):
    a = perturb_image(image, name, "sample-1", seed=0)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert not np.array_equal(a, image)
    np.testing.assert_array_equal(a, perturb_image(image, name, "sample-1", seed=0))
    if name not in ("rotate", "flip"):  # the deterministic ones do not depend on the generator
        assert not np.array_equal(a, perturb_image(image, name, "sample-1", seed=1))
        assert not np.array_equal(a, perturb_image(image, name, "sample-2", seed=0))


@pytest.mark.parametrize("name", TEXT_PERTURBATIONS)
def test_text_perturbation_is_seeded_and_keeps_words(name):
    caps = ["many green trees are around a white building near a road", "a parking lot with many cars"]
    out = perturb_texts(caps, name, "s", seed=0)
    assert out == perturb_texts(caps, name, "s", seed=0)
    assert out != caps
    for before, after in zip(caps, out):
        assert after and set(after.split()) <= set(before.split())


def _canonical_batch(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "sample_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "image": np.array([scene_jpeg(rng) for _ in range(n)], dtype=object),
        "text": np.array([f"caption {i}" for i in range(n)], dtype=object),
        "captions": np.array([None] * n, dtype=object),
        "label": np.array(["a"] * n, dtype=object),
        "split": np.array(["train"] * n, dtype=object),
        "path": np.array(["/x/shards/part-00000.parquet"] * n, dtype=object),
    }


def test_preprocess_does_not_depend_on_batching():
    batch = _canonical_batch(6)
    names = ["noise", "crop", "jpeg", "word_shuffle"]
    whole = preprocess_batch(batch, 40, names, seed=7, perturb_images=True)
    halves = [preprocess_batch({k: v[s] for k, v in batch.items()}, 40, names, seed=7, perturb_images=True) for s in (slice(0, 2), slice(2, 6))]
    for key in ("pixels", "perturbed", "texts", "texts_word_shuffle"):
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    assert whole["perturbed"].shape == (6, 3, 40, 40, 3)
    assert list(whole["shard"]) == ["part-00000.parquet"] * 6


def test_bad_image_names_shard_and_sample():
    batch = _canonical_batch(2)
    batch["image"][1] = b"not an image"
    with pytest.raises(ValueError, match=r"part-00000.parquet: sample id1: image could not be decoded"):
        preprocess_batch(batch, 32, ["noise"], seed=0)


def test_missing_text_names_sample():
    batch = _canonical_batch(1)
    batch["text"][0] = None
    with pytest.raises(ValueError, match="sample id0: no text and no captions"):
        preprocess_batch(batch, 32, ["noise"], seed=0)


def test_image_perturbations_stay_out_of_the_cpu_stage_unless_asked():
    batch = _canonical_batch(3)
    lean = preprocess_batch(batch, 40, ["noise", "rotate", "word_shuffle"], seed=3)
    assert "perturbed" not in lean and "texts_word_shuffle" in lean  # one image per row to ship
    full = preprocess_batch(batch, 40, ["noise", "rotate", "word_shuffle"], seed=3, perturb_images=True)
    np.testing.assert_array_equal(full["perturbed"], perturb_batch(lean["pixels"], lean["sample_id"], ["noise", "rotate"], seed=3))


def test_actor_side_and_cpu_side_perturbation_give_the_same_features():
    from rsdist.features.embed import embed_batch, load_encoder

    model = load_encoder("tiny", threads=1)
    batch = _canonical_batch(4)
    names = ["noise", "crop", "token_dropout"]
    in_actor = embed_batch(model, preprocess_batch(batch, 32, names, seed=5), ["noise", "crop"], ["token_dropout"], seed=5)
    in_cpu = embed_batch(model, preprocess_batch(batch, 32, names, seed=5, perturb_images=True), ["noise", "crop"], ["token_dropout"], seed=5)
    for key in ("image_emb", "text_emb", "shift", "shift_noise", "shift_crop", "shift_token_dropout"):
        np.testing.assert_allclose(in_actor[key], in_cpu[key], rtol=1e-5, atol=1e-6)
    other_seed = embed_batch(model, preprocess_batch(batch, 32, names, seed=5), ["noise", "crop"], ["token_dropout"], seed=6)
    assert not np.allclose(other_seed["shift_noise"], in_actor["shift_noise"])
