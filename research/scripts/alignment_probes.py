"""How much the choice of alignment probe changes alignment-mmd's ranking and selection on a pool.

    python research/scripts/alignment_probes.py runs/exp-align-both/splits/o0/base [--budgets 0.2,0.33]

Scores the pool of a run (its features/ and clusters/) with four held-out ridge probes: image ->
text (the default), text -> image, both (their mean; `select.alignment_direction: both`) and a
kernel probe (image -> text on the image embedding plus 2,048 random Fourier features of it,
width = the median distance between 1,000 pool images); the default probe's contrastive score
(`select.alignment_score: contrastive`, temperature 0.07, the clusters of the run; a random subset
shares the budget's fraction of a selection by chance); and the default with 5% of its sd
of Gaussian noise added (`jitter`: how much a selection moves on scores that barely differ; the
greedy MMD among the candidates amplifies small changes of the candidate set). Prints each probe's Spearman
correlation with the default and, per budget, the share of the default's alignment-mmd selection
(candidates 2, seed 0) it selects too; the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import spearmanr

from rsdist.core.rundir import RunDir
from rsdist.select import stage as select
from rsdist.select.alignment import pair_alignment
from rsdist.select.coincide import mmd_among_top


def random_fourier_features(x: np.ndarray, n_features: int = 2048, seed: int = 0) -> np.ndarray:
    """sqrt(2 / D) cos(x W / width + b): a Gaussian kernel's features, width the median pair distance."""
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), min(len(x), 1000), replace=False)].astype(np.float64)
    sq = (sample**2).sum(axis=1)
    distances = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * sample @ sample.T, 0.0))
    width = float(np.median(distances[np.triu_indices(len(sample), 1)]))
    w = rng.normal(size=(x.shape[1], n_features)) / max(width, 1e-12)
    b = rng.uniform(0, 2 * np.pi, n_features)
    return (np.sqrt(2.0 / n_features) * np.cos(x @ w + b)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (or experiment base) with features/ and clusters/")
    parser.add_argument("--budgets", default="0.2,0.33", help="comma-separated fractions of the pool")
    args = parser.parse_args()
    run = RunDir(args.run)
    pool = select.read_pool(run)
    image, text = select.pool_embeddings(run, pool, "image"), select.pool_embeddings(run, pool, "text")
    probes = {
        "image-to-text": pair_alignment(image, text)[0],
        "text-to-image": pair_alignment(text, image)[0],
        "both": pair_alignment(image, text, direction="both")[0],
        "kernel": pair_alignment(np.hstack([image, random_fourier_features(image)]), text)[0],
        "contrastive": pair_alignment(image, text, score="contrastive", groups=pool.groups, temperature=0.07, block_rows=4096)[0],
    }
    default = probes["image-to-text"]
    probes["jitter"] = default + 0.05 * default.std() * np.random.default_rng(0).normal(size=len(default))
    joint = select.pool_embeddings(run, pool, "joint")
    figures: dict = {"pool": pool.size}
    for budget in (float(b) for b in args.budgets.split(",")):
        count = int(round(budget * pool.size))
        chosen = {name: mmd_among_top(joint, pool.groups, pool.k, score, count, "proportional", 2.0).selected for name, score in probes.items()}
        for name, score in probes.items():
            row = figures.setdefault(name, {"spearman": float(spearmanr(probes["image-to-text"], score).correlation)})
            row[f"overlap_{budget:g}"] = float((chosen[name] & chosen["image-to-text"]).sum() / count)
    for name in probes:
        print(name, " ".join(f"{k} {v:.3f}" for k, v in figures[name].items()))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
