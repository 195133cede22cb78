"""`alignment-mmd`: keep the pairs whose caption the picture predicts, spread by greedy MMD.

A pair's alignment is how well its image embedding predicts its text embedding under one linear
map fitted on the whole pool, scored without the pair itself: a ridge regression from the image
embedding to the text embedding (intercept unpenalised), and per row the cosine between the text
embedding and its leave-one-out prediction (both centred). A pair whose caption the rest of the
pool would have predicted from its picture is one the projection heads can learn from; a low score
is a caption that says something else (a generic sentence on a specific scene, a caption of
another image) and, in a contrastive batch, mostly noise.

Exact leave-one-out needs no refits: for ridge with hat matrix H, the held-out residual of row i
is e_i / (1 - H_ii). Two passes over the rows in chunks: one accumulates the joint Gram of
[image, text] (ScalSelect's `GramAccumulator`), an eigen-decomposition of the image block gives
every ridge strength of a grid at once, and the second scores the rows for each strength. The
strength kept is the one of least mean leave-one-out error (no setting to tune); beyond the rows,
memory O(d^2 + chunk d), time O(N d^2).

Each cluster then keeps its quota by greedy MMD among its `candidates` x quota best-aligned rows
(`coincide.mmd_among_top`), as `typicality-mmd` does with caption typicality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsdist.select.scalselect import GramAccumulator

RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Ridge strengths, in units of the mean eigenvalue of the centred image Gram (scale-free)."""


@dataclass
class RidgeMap:
    """The image -> text ridge regression of a pool, for every strength of RIDGE_GRID."""

    image_mean: np.ndarray  # (dx,)
    text_mean: np.ndarray  # (dy,)
    vectors: np.ndarray  # (dx, dx) eigenvectors of the centred image Gram
    eigenvalues: np.ndarray  # (dx,)
    projected_cross: np.ndarray  # (dx, dy): V^T X_c^T Y_c
    n: int
    strengths: np.ndarray  # absolute ridge strengths, one per RIDGE_GRID entry


def fit_ridge_map(acc: GramAccumulator, image_dim: int) -> RidgeMap:
    """The ridge map from the joint Gram of rows [image | text] (image the first `image_dim` columns)."""
    if acc.n < 2:
        raise ValueError(f"alignment: {acc.n} pool rows, at least 2 are needed to fit the image -> text map")
    gram = acc.centred_gram()
    gxx, gxy = gram[:image_dim, :image_dim], gram[:image_dim, image_dim:]
    eigenvalues, vectors = np.linalg.eigh(gxx)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    scale = max(float(eigenvalues.mean()), 1e-12)
    mean = acc.mean()
    return RidgeMap(mean[:image_dim], mean[image_dim:], vectors, eigenvalues, vectors.T @ gxy, acc.n, np.asarray(RIDGE_GRID) * scale)


def held_out_fit(image: np.ndarray, text: np.ndarray, ridge: RidgeMap) -> tuple[np.ndarray, np.ndarray]:
    """Per row and ridge strength: (squared leave-one-out error, cosine of the leave-one-out
    prediction with the centred text), each of shape (rows, strengths)."""
    z = (np.asarray(image, dtype=np.float64) - ridge.image_mean) @ ridge.vectors
    y = np.asarray(text, dtype=np.float64) - ridge.text_mean
    errors = np.empty((len(z), len(ridge.strengths)))
    cosines = np.empty_like(errors)
    y_norm = np.linalg.norm(y, axis=1)
    for j, strength in enumerate(ridge.strengths):
        inverse = 1.0 / (ridge.eigenvalues + strength)
        fitted = (z * inverse) @ ridge.projected_cross
        leverage = (z * z * inverse).sum(axis=1) + 1.0 / ridge.n
        residual = (y - fitted) / (1.0 - leverage)[:, None]
        predicted = y - residual
        errors[:, j] = (residual**2).sum(axis=1)
        denom = np.linalg.norm(predicted, axis=1) * y_norm
        cosines[:, j] = np.where(denom > 0, (predicted * y).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return errors, cosines


def pair_alignment(image: np.ndarray, text: np.ndarray, chunk_rows: int = 4096) -> tuple[np.ndarray, float]:
    """(alignment per row, ridge strength kept in units of the mean eigenvalue) of the unit image
    and text rows of a pool; see the module docstring. Rows are taken `chunk_rows` at a time, so
    no float64 copy of the whole pool is made."""
    chunks = [slice(s, s + chunk_rows) for s in range(0, len(image), chunk_rows)]
    acc = GramAccumulator(image.shape[1] + text.shape[1])
    for c in chunks:
        acc.add(np.hstack([image[c], text[c]]))
    ridge = fit_ridge_map(acc, image.shape[1])
    errors = np.empty((len(image), len(RIDGE_GRID)))
    cosines = np.empty_like(errors)
    for c in chunks:
        errors[c], cosines[c] = held_out_fit(image[c], text[c], ridge)
    best = int(np.argmin(errors.mean(axis=0)))
    return cosines[:, best], float(RIDGE_GRID[best])
