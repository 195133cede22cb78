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

Retrieval is scored both ways (image -> text and text -> image), so `direction: both` also fits
the reverse map from the same Gram (its text block) and averages the two held-out cosines: a pair
whose picture the caption does not predict (a specific sentence on an ambiguous picture) scores
low too.

Each cluster then keeps its quota by greedy MMD among its `candidates` x quota best-aligned rows
(`coincide.mmd_among_top`), as `typicality-mmd` does with caption typicality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsdist.config import ALIGNMENT_DIRECTIONS
from rsdist.select.scalselect import GramAccumulator

RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Ridge strengths, in units of the mean eigenvalue of the centred image Gram (scale-free)."""


@dataclass
class RidgeMap:
    """The inputs -> outputs ridge regression of a pool, for every strength of RIDGE_GRID."""

    input_mean: np.ndarray  # (dx,)
    output_mean: np.ndarray  # (dy,)
    vectors: np.ndarray  # (dx, dx) eigenvectors of the centred input Gram
    eigenvalues: np.ndarray  # (dx,)
    projected_cross: np.ndarray  # (dx, dy): V^T X_c^T Y_c
    n: int
    strengths: np.ndarray  # absolute ridge strengths, one per RIDGE_GRID entry


def fit_ridge_map(acc: GramAccumulator, inputs: slice, outputs: slice) -> RidgeMap:
    """The ridge map from the columns `inputs` to the columns `outputs` of the rows whose joint Gram
    `acc` holds (rows [image | text]: image -> text is slice(0, dx) -> slice(dx, dx + dy))."""
    if acc.n < 2:
        raise ValueError(f"alignment: {acc.n} pool rows, at least 2 are needed to fit a ridge map between image and text")
    gram = acc.centred_gram()
    gxx, gxy = gram[inputs, inputs], gram[inputs, outputs]
    eigenvalues, vectors = np.linalg.eigh(gxx)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    scale = max(float(eigenvalues.mean()), 1e-12)
    mean = acc.mean()
    return RidgeMap(mean[inputs], mean[outputs], vectors, eigenvalues, vectors.T @ gxy, acc.n, np.asarray(RIDGE_GRID) * scale)


def held_out_fit(inputs: np.ndarray, outputs: np.ndarray, ridge: RidgeMap) -> tuple[np.ndarray, np.ndarray]:
    """Per row and ridge strength: (squared leave-one-out error, cosine of the leave-one-out
    prediction with the centred output), each of shape (rows, strengths)."""
    z = (np.asarray(inputs, dtype=np.float64) - ridge.input_mean) @ ridge.vectors
    y = np.asarray(outputs, dtype=np.float64) - ridge.output_mean
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


def pair_alignment(image: np.ndarray, text: np.ndarray, chunk_rows: int = 4096, direction: str = "image-to-text") -> tuple[np.ndarray, tuple[float, ...]]:
    """(alignment per row, ridge strength kept per direction in units of the mean eigenvalue) of
    the unit image and text rows of a pool; see the module docstring. `direction` is one of
    ALIGNMENT_DIRECTIONS; with "both" the alignment is the mean of the two directions' cosines.
    Rows are taken `chunk_rows` at a time, so no float64 copy of the whole pool is made."""
    if direction not in ALIGNMENT_DIRECTIONS:
        raise ValueError(f"alignment: direction {direction!r} is not one of {ALIGNMENT_DIRECTIONS}")
    chunks = [slice(s, s + chunk_rows) for s in range(0, len(image), chunk_rows)]
    acc = GramAccumulator(image.shape[1] + text.shape[1])
    for c in chunks:
        acc.add(np.hstack([image[c], text[c]]))
    image_cols, text_cols = slice(0, image.shape[1]), slice(image.shape[1], acc.dim)
    maps = [(image, text, fit_ridge_map(acc, image_cols, text_cols))]
    if direction == "both":
        maps.append((text, image, fit_ridge_map(acc, text_cols, image_cols)))
    alignment, strengths = np.zeros(len(image)), []
    for inputs, outputs, ridge in maps:
        cosines, strength = held_out_cosines(inputs, outputs, ridge, chunks)
        alignment += cosines / len(maps)
        strengths.append(strength)
    return alignment, tuple(strengths)


def held_out_cosines(inputs: np.ndarray, outputs: np.ndarray, ridge: RidgeMap, chunks: list[slice]) -> tuple[np.ndarray, float]:
    """Each row's held-out cosine at the ridge strength of least mean held-out error, and that
    strength in units of the mean eigenvalue."""
    errors = np.empty((len(inputs), len(RIDGE_GRID)))
    cosines = np.empty_like(errors)
    for c in chunks:
        errors[c], cosines[c] = held_out_fit(inputs[c], outputs[c], ridge)
    best = int(np.argmin(errors.mean(axis=0)))
    return cosines[:, best], float(RIDGE_GRID[best])
