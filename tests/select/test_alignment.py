"""alignment-mmd's image-text alignment: exact leave-one-out ridge, and mismatched pairs scored lowest."""

import numpy as np
import pytest

from rsdist.select.alignment import RIDGE_GRID, contrastive_scores, fit_ridge_map, held_out_fit, pair_alignment
from rsdist.select.scalselect import GramAccumulator


def ridge_of(image, text, batches=1):
    acc = GramAccumulator(image.shape[1] + text.shape[1])
    for part in np.array_split(np.hstack([image, text]), batches):
        acc.add(part)
    return fit_ridge_map(acc, slice(0, image.shape[1]), slice(image.shape[1], acc.dim))


def refit_without(image, text, i, strength):
    """Ridge with an unpenalised intercept fitted on every row but i, predicting row i."""
    keep = np.arange(len(image)) != i
    x, y = image[keep], text[keep]
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + strength * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
    return ym + (image[i] - xm) @ w


@pytest.mark.parametrize("j", [0, 3, len(RIDGE_GRID) - 1])
def test_held_out_fit_equals_refitting_without_each_row(j):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(25, 6))
    text = image @ rng.normal(size=(6, 4)) + 0.3 * rng.normal(size=(25, 4)) + 2.0
    ridge = ridge_of(image, text, batches=3)  # batches of the stream give the same map
    errors, cosines = held_out_fit(image, text, ridge)
    y = text - text.mean(axis=0)
    for i in range(len(image)):
        predicted = refit_without(image, text, i, ridge.strengths[j])
        assert errors[i, j] == pytest.approx(((text[i] - predicted) ** 2).sum(), rel=1e-8)
        # The cosine is taken around the pool mean, between the text and its held-out prediction.
        p = predicted - text.mean(axis=0)
        assert cosines[i, j] == pytest.approx(p @ y[i] / (np.linalg.norm(p) * np.linalg.norm(y[i])), rel=1e-8)


def test_swapped_captions_are_the_least_aligned_pairs():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(300, 12))
    text = np.tanh(image @ rng.normal(size=(12, 8))) + 0.1 * rng.normal(size=(300, 8))
    swapped = np.arange(0, 30, 3)
    text[swapped] = text[swapped[::-1] + 1]  # ten captions of other images
    errors, cosines = held_out_fit(image, text, ridge_of(image, text))
    best = int(np.argmin(errors.mean(axis=0)))
    assert set(np.argsort(cosines[:, best])[:10]) == set(swapped)


def test_pair_alignment_does_not_depend_on_the_chunks():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(50, 6))
    text = image @ rng.normal(size=(6, 3)) + 0.5 * rng.normal(size=(50, 3))
    whole, strength = pair_alignment(image, text)
    chunked, chunked_strength = pair_alignment(image, text, chunk_rows=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-9, atol=1e-12)
    assert strength == chunked_strength and len(strength) == 1 and strength[0] in RIDGE_GRID


def test_both_directions_average_the_two_held_out_maps():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(60, 5))
    text = image @ rng.normal(size=(5, 7)) + 0.4 * rng.normal(size=(60, 7))
    forward, (s_forward,) = pair_alignment(image, text)
    backward, (s_backward,) = pair_alignment(text, image)  # the caption predicting the picture
    both, strengths = pair_alignment(image, text, chunk_rows=11, direction="both")
    np.testing.assert_allclose(both, (forward + backward) / 2, rtol=1e-9, atol=1e-12)
    assert strengths == (s_forward, s_backward)


def test_both_directions_still_score_swapped_captions_lowest():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(300, 8))
    text = image @ rng.normal(size=(8, 12)) + 0.3 * rng.normal(size=(300, 12))
    swapped = np.arange(0, 30, 3)
    text[swapped] = text[swapped[::-1] + 1]
    both, _ = pair_alignment(image, text, direction="both")
    assert set(np.argsort(both)[:10]) == set(swapped)


def test_unknown_direction_is_a_one_line_error():
    with pytest.raises(ValueError, match="direction 'text-to-image' is not one of"):
        pair_alignment(np.ones((3, 2)), np.ones((3, 2)), direction="text-to-image")


def test_fit_needs_two_rows():
    acc = GramAccumulator(3)
    acc.add(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        fit_ridge_map(acc, slice(0, 2), slice(2, 3))


def unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_contrastive_score_is_the_log_probability_of_the_own_caption_in_its_cluster():
    rng = np.random.default_rng(5)
    predicted, captions = unit(rng.normal(size=(12, 4))), unit(rng.normal(size=(12, 4)))
    groups = np.array([0, 1, 0, 2, 1, 0, 0, 1, 2, 2, 0, 1])
    scores = contrastive_scores(predicted, captions, groups, temperature=0.2)
    for i in range(12):
        mates = np.flatnonzero(groups == groups[i])
        logits = predicted[i] @ captions[mates].T / 0.2
        own = logits[list(mates).index(i)]
        assert scores[i] == pytest.approx(own - np.log(np.exp(logits).sum()), rel=1e-6)


def test_contrastive_blocks_of_a_large_cluster_hold_fewer_rivals():
    """A cluster above block_rows is dealt into blocks; each row competes with its block only, so
    its log-probability can only rise, and a block as large as the cluster changes nothing."""
    rng = np.random.default_rng(6)
    predicted, captions = unit(rng.normal(size=(40, 5))), unit(rng.normal(size=(40, 5)))
    groups = np.repeat([0, 1], 20)
    whole = contrastive_scores(predicted, captions, groups, 0.1)
    np.testing.assert_array_equal(contrastive_scores(predicted, captions, groups, 0.1, block_rows=20), whole)
    blocked = contrastive_scores(predicted, captions, groups, 0.1, block_rows=7, seed=3)
    assert np.all(blocked >= whole - 1e-12) and np.any(blocked > whole + 1e-6)
    np.testing.assert_array_equal(contrastive_scores(predicted, captions, groups, 0.1, block_rows=7, seed=3), blocked)


def test_contrastive_alignment_caps_a_caption_shared_in_its_cluster():
    """Eight pictures of one cluster share one sentence (a canonical caption): among the cluster's
    captions it is no likelier than 1 in 8 for any of them, whatever the held-out cosine says."""
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(4), 50)
    image = rng.normal(size=(4, 10))[groups] + 0.5 * rng.normal(size=(200, 10))
    text = image @ rng.normal(size=(10, 8)) + 0.2 * rng.normal(size=(200, 8))
    shared = np.arange(60, 68)  # cluster 1
    text[shared] = text[shared].mean(axis=0)
    contrastive, _ = pair_alignment(image, text, score="contrastive", groups=groups, temperature=0.07)
    cosine, _ = pair_alignment(image, text)
    assert np.all(contrastive[shared] <= -np.log(8) + 1e-9)
    assert np.median(contrastive[np.setdiff1d(np.arange(200), shared)]) > -np.log(8)
    assert np.all(cosine[shared] > 0.5)  # the picture does predict the sentence


def test_contrastive_alignment_needs_the_clusters():
    with pytest.raises(ValueError, match="needs one cluster per row"):
        pair_alignment(np.eye(3), np.eye(3), score="contrastive")
    with pytest.raises(ValueError, match="score 'rank' is not one of"):
        pair_alignment(np.eye(3), np.eye(3), score="rank")
