"""How the training schedule moves the experiment: mR and zero-shot accuracy against epochs.

    python research/scripts/schedule_curve.py runs/exp-3ep runs/exp-short runs/exp-grid runs/exp-long \
        [--methods full,random,caption-both] [--budgets 1,0.2,0.33] [--out research/results/results_schedule.png]

Reads every cell of the given experiment folders (`<out>/cells/<method>_b<budget>_s<seed>/
summary.json`), groups the cells by method, budget and the epochs they trained for (the train
stage's record), and prints one table row per group (mean and sd over seeds), a plot of both
metrics against epochs per method and budget (with `--out`), and the groups as one JSON object on
the last line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics

CELL = re.compile(r"(?P<method>.+)_b(?P<budget>[0-9.]+)_s(?P<seed>\d+)$")
METRICS = ("mR", "zero_shot_acc")


def read_cells(folders: list[str]) -> dict[tuple[str, float, int], list[dict]]:
    """(method, budget, epochs) -> the metrics of every finished cell, one per seed."""
    groups: dict[tuple[str, float, int], dict[int, dict]] = collections.defaultdict(dict)
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "cells", "*", "summary.json"))):
            m = CELL.match(os.path.basename(os.path.dirname(path)))
            with open(path) as f:
                summary = json.load(f)
            if not m or "metrics" not in summary or "train" not in summary.get("stages", {}):
                continue
            key = (m["method"], float(m["budget"]), int(summary["stages"]["train"]["epochs"]))
            groups[key][int(m["seed"])] = summary["metrics"]
    return {k: [v[s] for s in sorted(v)] for k, v in groups.items()}


def summarise(groups: dict[tuple[str, float, int], list[dict]], methods: set[str] | None, budgets: set[float] | None = None) -> list[dict]:
    rows = []
    for (method, budget, epochs), cells in sorted(groups.items()):
        if (methods and method not in methods) or (budgets and budget not in budgets):
            continue
        row = {"method": method, "budget": budget, "epochs": epochs, "seeds": len(cells)}
        for name in METRICS:
            values = [c[name] for c in cells]
            row[f"{name}_mean"] = round(statistics.mean(values), 3)
            row[f"{name}_sd"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = collections.defaultdict(list)
    for r in rows:
        lines[(r["method"], r["budget"])].append(r)
    for ax, name, title in zip(axes, METRICS, ("mR", "zero-shot accuracy (%)")):
        for (method, budget), points in sorted(lines.items()):
            points.sort(key=lambda r: r["epochs"])
            label = method if method == "full" else f"{method} {budget:g}"
            ax.errorbar([p["epochs"] for p in points], [p[f"{name}_mean"] for p in points], yerr=[p[f"{name}_sd"] for p in points], marker="o", capsize=3, label=label)
        ax.set_xlabel("epochs")
        ax.set_ylabel(title)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["epochs"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="experiment output folders (each holds cells/)")
    parser.add_argument("--methods", default="", help="comma-separated methods to keep (default: all)")
    parser.add_argument("--budgets", default="", help="comma-separated budgets to keep (default: all; full data is budget 1)")
    parser.add_argument("--out", default=None, help="write the plot here (PNG)")
    args = parser.parse_args()
    missing = [f for f in args.folders if not os.path.isdir(os.path.join(f, "cells"))]
    if missing:
        raise SystemExit(f"{missing[0]}: no cells/ folder (not an experiment output)")
    methods = {m for m in args.methods.split(",") if m} or None
    budgets = {float(b) for b in args.budgets.split(",") if b} or None
    rows = summarise(read_cells(args.folders), methods, budgets)
    print("| method | budget | epochs | seeds | mR mean | mR sd | zero-shot % | zero-shot sd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['budget']:g} | {r['epochs']} | {r['seeds']} | {r['mR_mean']:.2f} | {r['mR_sd']:.2f} | {r['zero_shot_acc_mean']:.2f} | {r['zero_shot_acc_sd']:.2f} |")
    if args.out:
        plot(rows, args.out)
    print(json.dumps({"groups": rows}))


if __name__ == "__main__":
    main()
