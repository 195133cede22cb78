"""What each selection of an experiment looks like: class mix against the pool, caption redundancy.

    python research/scripts/selection_mix.py runs/exp-grid [--budget 0.33]

For every cell of `<out>/cells/*` with a manifest, averaged over seeds per method and budget:
min class share (smallest ratio of a class's share of the selection to its share of the pool),
KL(selection || pool) of the class mix, the share of selected images whose captions are one
sentence, and the mean caption information (rsdist.select.captions). With --budget, also the
classes each method under- and over-samples most at that budget, and the held-out split's
single-caption share.
"""

from __future__ import annotations

import argparse
import collections
import math
import os

import numpy as np

from rsdist.core.rundir import RunDir
from rsdist.select.captions import caption_information


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="experiment output folder (holds base/ and cells/)")
    parser.add_argument("--budget", type=float, default=None, help="list the most under- and over-sampled classes at this budget")
    args = parser.parse_args()
    base = RunDir(os.path.join(args.out, "base"))
    shards = base.read_table("shards", columns=["sample_id", "captions", "label"]).to_pylist()
    label = {r["sample_id"]: r["label"] for r in shards}
    pool = base.read_table("clusters", columns=["sample_id"]).column("sample_id").to_pylist()
    captions = {r["sample_id"]: r["captions"] for r in shards}
    info, distinct = caption_information([captions[s] for s in pool])
    info, distinct = dict(zip(pool, info)), dict(zip(pool, distinct))
    pool_mix = collections.Counter(label[s] for s in pool)
    held_out = [r for r in shards if r["sample_id"] not in info]
    _, held_distinct = caption_information([r["captions"] for r in held_out])
    print(f"held-out images {len(held_out)}, single-caption share {np.mean(held_distinct == 1):.2f}")

    figures: dict[str, list] = collections.defaultdict(list)
    mixes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    cells = sorted(os.listdir(os.path.join(args.out, "cells")))
    for cell in cells:
        run = RunDir(os.path.join(args.out, "cells", cell))
        if not run.exists("selection", "manifest.parquet"):
            continue
        manifest = run.read_table("selection", "manifest.parquet", columns=["sample_id", "selected"]).to_pylist()
        chosen = [r["sample_id"] for r in manifest if r["selected"]]
        mix = collections.Counter(label[s] for s in chosen)
        n, size = len(chosen), len(pool)
        ratios = [mix.get(c, 0) / n / (v / size) for c, v in pool_mix.items()]
        kl = sum(mix[c] / n * math.log((mix[c] / n) / (v / size)) for c, v in pool_mix.items() if mix.get(c))
        key = cell.rsplit("_s", 1)[0]
        figures[key].append((min(ratios), kl, np.mean([distinct[s] == 1 for s in chosen]), np.mean([info[s] for s in chosen])))
        mixes[key].update(mix)

    print(f"{'method_budget':36s} min-class-share  KL(sel||pool)  single-caption  caption-info")
    print(f"{'pool':36s} {1:15.2f} {0:14.3f} {np.mean([d == 1 for d in distinct.values()]):15.2f} {np.mean(list(info.values())):13.2f}")
    for key, rows in figures.items():
        a = np.array(rows).mean(0)
        print(f"{key:36s} {a[0]:15.2f} {a[1]:14.3f} {a[2]:15.2f} {a[3]:13.2f}")
    if args.budget is not None:
        for key, mix in mixes.items():
            if not key.endswith(f"_b{args.budget:g}"):
                continue
            n = sum(mix.values())
            ratio = sorted(((mix[c] / n) / (v / len(pool)), c) for c, v in pool_mix.items())
            print(key, "under:", [(c, round(r, 2)) for r, c in ratio[:4]], "over:", [(c, round(r, 2)) for r, c in ratio[-3:][::-1]])


if __name__ == "__main__":
    main()
