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

`score: contrastive` asks instead how much likelier the pair's own caption is than its cluster's
other captions under its held-out prediction: the log-probability of the own caption in a softmax
of the prediction's cosines with every caption of the cluster (InfoNCE, with the cluster as the
batch and the heads' starting temperature). A caption that its cluster-mates' pictures predict as
well as its own (a scene's stock sentence) is no evidence for this picture and scores low, however
well the picture predicts it; the contrastive heads learn only from what tells a pair from the
pairs around it. A cluster above `block_rows` rows is scored in random blocks of at most that many
rows, so the work stays linear in the pool.

Each cluster then keeps its quota by greedy MMD among its `candidates` x quota best-aligned rows
(`coincide.mmd_among_top`), as `typicality-mmd` does with caption typicality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsdist.config import ALIGNMENT_DIRECTIONS, ALIGNMENT_SCORES
from rsdist.core.tables import unit_rows
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
    z, y = _centred(inputs, outputs, ridge)
    errors = np.empty((len(z), len(ridge.strengths)))
    cosines = np.empty_like(errors)
    y_norm = np.linalg.norm(y, axis=1)
    for j in range(len(ridge.strengths)):
        residual = _held_out_residual(z, y, ridge, j)
        predicted = y - residual
        errors[:, j] = (residual**2).sum(axis=1)
        denom = np.linalg.norm(predicted, axis=1) * y_norm
        cosines[:, j] = np.where(denom > 0, (predicted * y).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return errors, cosines


def _centred(inputs: np.ndarray, outputs: np.ndarray, ridge: RidgeMap) -> tuple[np.ndarray, np.ndarray]:
    """Inputs centred and in the input Gram's eigenbasis, outputs centred (float64)."""
    z = (np.asarray(inputs, dtype=np.float64) - ridge.input_mean) @ ridge.vectors
    return z, np.asarray(outputs, dtype=np.float64) - ridge.output_mean


def _held_out_residual(z: np.ndarray, y: np.ndarray, ridge: RidgeMap, j: int) -> np.ndarray:
    """Each row's leave-one-out residual at strength j: e / (1 - h) (the prediction is y minus it)."""
    inverse = 1.0 / (ridge.eigenvalues + ridge.strengths[j])
    fitted = (z * inverse) @ ridge.projected_cross
    leverage = (z * z * inverse).sum(axis=1) + 1.0 / ridge.n
    return (y - fitted) / (1.0 - leverage)[:, None]


def contrastive_scores(predicted: np.ndarray, outputs: np.ndarray, groups: np.ndarray, temperature: float, block_rows: int = 0, seed: int = 0) -> np.ndarray:
    """Per row, the log-probability of its own output among its cluster's outputs under a softmax
    of the cosines with its prediction at `temperature` (InfoNCE with the cluster as the batch).
    `predicted`, `outputs`: unit rows. A cluster of more than `block_rows` rows (0: no limit) is
    dealt at random (with the seed) into equal blocks that play the cluster's part, so memory is
    block_rows^2 and the work linear in the pool at any cluster size."""
    scores = np.zeros(len(predicted))
    rng = np.random.default_rng(seed)
    order = np.argsort(groups, kind="stable")  # one sort: each cluster's rows, in pool order
    for members in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1):
        if len(members) == 0:
            continue
        parts = 1 if block_rows <= 0 else int(np.ceil(len(members) / block_rows))
        blocks = [members] if parts == 1 else np.array_split(rng.permutation(members), parts)
        for b in blocks:
            logits = predicted[b] @ outputs[b].T / temperature
            logits -= logits.max(axis=1, keepdims=True)
            scores[b] = np.diag(logits) - np.log(np.exp(logits).sum(axis=1))
    return scores


def pair_alignment(
    image: np.ndarray,
    text: np.ndarray,
    chunk_rows: int = 4096,
    direction: str = "image-to-text",
    score: str = "cosine",
    groups: np.ndarray | None = None,
    temperature: float = 0.07,
    block_rows: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """(alignment per row, ridge strength kept per direction in units of the mean eigenvalue) of
    the unit image and text rows of a pool; see the module docstring. `direction` is one of
    ALIGNMENT_DIRECTIONS; with "both" the alignment is the mean of the two directions' scores.
    `score` is one of ALIGNMENT_SCORES: the held-out cosine, or (with the rows' cluster `groups`)
    contrastive_scores of the held-out predictions. Rows are taken `chunk_rows` at a time, so no
    float64 copy of the whole pool is made."""
    if direction not in ALIGNMENT_DIRECTIONS:
        raise ValueError(f"alignment: direction {direction!r} is not one of {ALIGNMENT_DIRECTIONS}")
    if score not in ALIGNMENT_SCORES:
        raise ValueError(f"alignment: score {score!r} is not one of {ALIGNMENT_SCORES}")
    if score == "contrastive" and (groups is None or len(groups) != len(image)):
        raise ValueError("alignment: the contrastive score needs one cluster per row (groups)")
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
        scores, j = held_out_cosines(inputs, outputs, ridge, chunks)
        if score == "contrastive":
            predicted, centred = held_out_unit_predictions(inputs, outputs, ridge, j, chunks)
            scores = contrastive_scores(predicted, centred, groups, temperature, block_rows, seed)
        alignment += scores / len(maps)
        strengths.append(float(RIDGE_GRID[j]))
    return alignment, tuple(strengths)


def held_out_cosines(inputs: np.ndarray, outputs: np.ndarray, ridge: RidgeMap, chunks: list[slice]) -> tuple[np.ndarray, int]:
    """Each row's held-out cosine at the ridge strength of least mean held-out error, and that
    strength's index in RIDGE_GRID."""
    errors = np.empty((len(inputs), len(RIDGE_GRID)))
    cosines = np.empty_like(errors)
    for c in chunks:
        errors[c], cosines[c] = held_out_fit(inputs[c], outputs[c], ridge)
    best = int(np.argmin(errors.mean(axis=0)))
    return cosines[:, best], best


def held_out_unit_predictions(inputs: np.ndarray, outputs: np.ndarray, ridge: RidgeMap, j: int, chunks: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    """(unit leave-one-out predictions at strength j, unit centred outputs), float32."""
    predicted = np.empty((len(inputs), outputs.shape[1]), dtype=np.float32)
    centred = np.empty_like(predicted)
    for c in chunks:
        z, y = _centred(inputs[c], outputs[c], ridge)
        predicted[c], centred[c] = unit_rows(y - _held_out_residual(z, y, ridge, j)), unit_rows(y)
    return predicted, centred
