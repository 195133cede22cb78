"""alignment-mmd's image-text alignment: exact leave-one-out ridge, and mismatched pairs scored lowest."""

import numpy as np
import pytest

from rsdist.select.alignment import RIDGE_GRID, fit_ridge_map, held_out_fit, pair_alignment
from rsdist.select.scalselect import GramAccumulator


def ridge_of(image, text, batches=1):
    acc = GramAccumulator(image.shape[1] + text.shape[1])
    for part in np.array_split(np.hstack([image, text]), batches):
        acc.add(part)
    return fit_ridge_map(acc, image.shape[1])


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
    assert strength == chunked_strength and strength in RIDGE_GRID


def test_fit_needs_two_rows():
    acc = GramAccumulator(3)
    acc.add(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        fit_ridge_map(acc, 2)
