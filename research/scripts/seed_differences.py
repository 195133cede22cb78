"""Each method against random, seed by seed: the per-seed mR difference of one budget, with the
2-random-sd line the selection target asks for.

    python research/scripts/seed_differences.py runs/exp-20s20/results.json runs/exp-20img/results.json \
        --budget 0.2 [--metric mR] [--seeds 5-19] [--out research/results/results_20_seeds.png] [--pools]

Reads experiments' results.json (their `cells`), pairs every method's cell with random's cell of
the same seed, budget and development split (the first file that has a cell wins, so overlapping
runs may be passed together; with several splits, random's sd is pooled within splits), prints one line per method (mean difference, random's sd over the same seeds, seeds
above) and, with --out, plots the per-seed differences. The figures as one JSON object on the last
line. With --pools every argument is its own set of held-out splits (other data, or other splits
that reuse test_offset values): argument i's split o is keyed 10 i + o, so nothing is paired or
pooled across arguments; one argument may join several files of the same pool with commas (a
method's new cells and the random cells they pair with: new.json,old.json).
"""

from __future__ import annotations

import argparse
import json

from rsdist.experiment import cell_split, paired_against_random


def read_cells(paths: list[str], budget: float, seeds: range | None = None, pools: bool = False) -> list[dict]:
    """The cells of `budget` (and `seeds`) in the files (an entry may join files with commas); the
    first file wins on a repeated (method, split, seed). With `pools`, entry i's splits are renamed
    10 i + test_offset."""
    out: dict[tuple[str, float, int], dict] = {}
    for i, entry in enumerate(paths):
        cells = []
        for path in entry.split(","):
            with open(path) as f:
                cells += json.load(f)["cells"]
        for cell in cells:
            if abs(float(cell["budget"]) - budget) < 1e-9 and (seeds is None or int(cell["seed"]) in seeds):
                if pools:
                    cell = dict(cell, test_offset=10 * i + cell_split(cell))
                out.setdefault((cell["method"], cell_split(cell), int(cell["seed"])), cell)
    return list(out.values())


def paired(cells: list[dict], metric: str) -> dict[str, dict]:
    """Per method with at least two cells paired with random's: the experiment's own paired figures
    (rsdist.experiment.paired_against_random) plus each pair's split, seed and difference."""
    if not any(c["method"] == "random" for c in cells):
        raise SystemExit("seed_differences: no random cells at this budget in the given files")
    value = {(c["method"], cell_split(c), int(c["seed"])): c["metrics"][metric] for c in cells}
    out = {}
    for row in paired_against_random(cells, [metric]):
        if row["seeds"] < 2:
            continue
        pairs = sorted((o, s) for m, o, s in value if m == row["method"] and ("random", o, s) in value)
        out[row["method"]] = {
            "seeds": [s for _, s in pairs],
            "test_offsets": [o for o, _ in pairs],
            "differences": [value[(row["method"], o, s)] - value[("random", o, s)] for o, s in pairs],
            "mean": row[f"{metric}_diff"],
            "random_sd": row[f"{metric}_random_sd"],
            "in_random_sd": row[f"{metric}_diff_in_random_sd"],
            "seeds_above": row[f"{metric}_seeds_above"],
        }
    return out


def plot(result: dict[str, dict], metric: str, budget: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(o, s) for r in result.values() for o, s in zip(r["test_offsets"], r["seeds"])})
    splits = len({o for o, _ in keys}) > 1
    x = {k: i for i, k in enumerate(keys)} if splits else {k: k[1] for k in keys}
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.35), 5.2))
    for i, (method, r) in enumerate(result.items()):
        shift = (i - (len(result) - 1) / 2) * 0.12
        ax.plot([x[k] + shift for k in zip(r["test_offsets"], r["seeds"])], r["differences"], "o", ms=4, label=f"{method}: mean {r['mean']:+.2f} ({r['in_random_sd']:+.1f} random sd)")
        ax.axhline(r["mean"], color=ax.lines[-1].get_color(), lw=0.8, alpha=0.6)
    sd = max(r["random_sd"] for r in result.values())
    ax.axhline(2 * sd, color="k", ls="--", lw=1, label=f"2 random sd ({2 * sd:.2f})")
    ax.axhline(0, color="grey", lw=0.8)
    if splits:
        ax.set_xticks(range(len(keys)), [f"{o:g}/{s}" for o, s in keys], rotation=90, fontsize=7)
    ax.set_xlabel("test_offset/seed" if splits else "seed")
    ax.set_ylabel(f"{metric} - random's {metric}, same seed and split")
    ax.set_title(f"Against random at {budget:g}, " + ("by split and seed" if splits else "seed by seed"))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="experiments' results.json files (with --pools, files of one pool joined by commas)")
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--metric", default="mR")
    parser.add_argument("--seeds", default=None, help="only these seeds, FIRST-LAST (e.g. 5-19: the seeds no setting was chosen on)")
    parser.add_argument("--out", default=None, help="PNG of the per-seed differences")
    parser.add_argument("--pools", action="store_true", help="each argument is its own set of splits (split o of argument i becomes 10 i + o)")
    args = parser.parse_args()
    seeds = None
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        seeds = range(int(first), int(last or first) + 1)
    result = paired(read_cells(args.results, args.budget, seeds, args.pools), args.metric)
    for method, r in result.items():
        print(f"{method}: {args.metric} {r['mean']:+.2f} over {len(r['seeds'])} pairs = {r['in_random_sd']:+.2f} random sd ({r['random_sd']:.2f}), {r['seeds_above']} above")
    if args.out:
        plot(result, args.metric, args.budget, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
