"""The experiment: full data vs each strategy at several budgets over several seeds.

    rsdist experiment CONFIG.yaml [--out DIR]

The config is a run config plus an `experiment:` section (ExperimentConfig). Ingest, features
and clusters are computed once in `<out>/base`; each cell (method, budget, seed) is a run
directory `<out>/cells/<method>_b<budget>_s<seed>` that inherits those folders and writes its own
selection, checkpoints and eval, so finished cells are skipped when the experiment is run again.

Two training protocols: `epochs` (every cell trains the same number of epochs: the cost-saving
view, time falls with the budget; `epochs_by_budget` gives a budget its own count, e.g. each
budget at its best schedule) and `steps` (epochs scaled by 1 / budget so every cell takes about
as many optimiser steps as full data: the data-quality view).

Several development splits (`test_offsets`): every cell runs on each held-out window
[offset, offset + data.test_fraction) of the hash split, under `<out>/splits/o<offset>/{base,cells}`.
The first split's base computes the features; the others take them (rsdist/features/resplit.py)
and only ingest and cluster again. Against random, cells pair by (split, seed), and random's sd is
pooled within splits: a split's held-out set moves every cell on it alike, which pairing removes.

Output: results.json (every cell, the table, and "vs_random": each method against random at the
same budget, paired by seed; "vs_random_by_split" with several splits), experiment.md (the table: mean and sd per method and budget,
relative to full data, selection and training seconds; and the paired comparison),
budget_curve.png (metric against budget per method).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import posixpath
import statistics
from dataclasses import dataclass, field
from typing import Any

from rsdist.config import SELECT_METHODS, ConfigError, RunConfig, SelectConfig, _choice, _help, config_from_dict, load_yaml
from rsdist.core.rundir import RunDir

log = logging.getLogger("rsdist")

INHERITED = ("synthetic_source", "shards", "features", "clusters")
PROTOCOLS = ("epochs", "steps")


@dataclass
class ExperimentConfig:
    methods: list = _help("Strategies to compare: a method name, or a mapping {label, method, <select settings>} for a variant (e.g. a dedup filter in front). Cells run in this order; an error-driven variant's `failures` may name an earlier cell's eval/failures.parquet relative to the split's folder, '{seed}' standing for the cell's seed.", default_factory=lambda: ["random", "shift"])
    budgets: list[float] = _help("Budgets as fractions of the training pool.", default_factory=lambda: [0.1, 0.2, 0.33])
    seeds: list[int] = _help("Seeds; each seeds both selection and training.", default_factory=lambda: [0, 1, 2])
    protocol: str = _help(f"Training protocol, one of {PROTOCOLS}.", default="epochs")
    epochs_by_budget: dict = _help("`epochs` protocol: epochs per budget, {budget: epochs} (1 = full data), for each budget at its own schedule; a budget not listed trains train.epochs.", default_factory=dict)
    include_full: bool = _help("Also train on the full pool (the reference every cell is compared with).", default=True)
    metrics: list[str] = _help("Metrics the table and plot show.", default_factory=lambda: ["mR", "zero_shot_acc"])
    features_from: str | None = _help("A finished run or experiment base made with the same features settings from the same rows (under any split): the experiment's first base takes its features from there instead of computing them.", default=None)
    test_offsets: list[float] = _help("Development splits: run every cell on each of these data.test_offset values (held-out windows of the hash split; disjoint when they are data.test_fraction or more apart); empty = data.test_offset alone.", default_factory=list)

    def __post_init__(self) -> None:
        self.methods = [self._variant(m) for m in self.methods]
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ConfigError(f"experiment.budgets: {b!r} must be a fraction in (0, 1]")
        if not self.seeds:
            raise ConfigError("experiment.seeds: must hold at least one seed")
        _choice("experiment.protocol", self.protocol, PROTOCOLS)
        self.epochs_by_budget = self._epochs_by_budget(self.epochs_by_budget)
        if not self.metrics:
            raise ConfigError("experiment.metrics: must name at least one metric")
        self.test_offsets = self._test_offsets(self.test_offsets)
        if self.features_from is not None and (not isinstance(self.features_from, str) or not self.features_from):
            raise ConfigError(f"experiment.features_from: {self.features_from!r} must be a run directory (a path or URI)")

    @staticmethod
    def _test_offsets(offsets: Any) -> list[float]:
        if not isinstance(offsets, list):
            raise ConfigError(f"experiment.test_offsets: {offsets!r} must be a list of offsets in [0, 1)")
        for o in offsets:
            if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0 <= o < 1:
                raise ConfigError(f"experiment.test_offsets: {o!r} must be an offset in [0, 1)")
        if len(set(offsets)) != len(offsets):
            raise ConfigError(f"experiment.test_offsets: {offsets} repeats an offset")
        return [float(o) for o in offsets]


    def _epochs_by_budget(self, mapping: Any) -> dict[float, int]:
        if not isinstance(mapping, dict):
            raise ConfigError(f"experiment.epochs_by_budget: {mapping!r} must be a mapping of budget to epochs")
        if mapping and self.protocol != "epochs":
            raise ConfigError(f"experiment.epochs_by_budget: only with protocol 'epochs' (the '{self.protocol}' protocol sets epochs from the budget)")
        out = {}
        for budget, epochs in mapping.items():
            try:
                b = float(budget)
            except (TypeError, ValueError):
                raise ConfigError(f"experiment.epochs_by_budget: key {budget!r} must be a budget fraction") from None
            if b != 1 and b not in self.budgets:
                raise ConfigError(f"experiment.epochs_by_budget: budget {budget!r} is not one of experiment.budgets {self.budgets} (or 1, full data)")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ConfigError(f"experiment.epochs_by_budget.{budget}: {epochs!r} must be a whole number of epochs >= 1")
            out[b] = epochs
        return out

    @staticmethod
    def _variant(entry: Any) -> dict:
        """A method entry as {label, method, settings}; settings are validated as SelectConfig fields."""
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"experiment.methods: {entry!r} must be a method name or a mapping with `method`")
        entry = dict(entry)
        label = str(entry.pop("label", entry["method"]))
        if label == "full":
            raise ConfigError("experiment.methods: the label 'full' is reserved for the full-data cells")
        _choice("experiment.methods", entry["method"], SELECT_METHODS)
        known = {f.name for f in dataclasses.fields(SelectConfig)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"experiment.methods.{label}.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}")
        SelectConfig(**entry)  # raises ConfigError naming select.<field>
        return {"label": label, **entry}


def load_experiment(path: str, out: str | None = None) -> tuple[RunConfig, ExperimentConfig]:
    values = load_yaml(path)
    exp_values = values.pop("experiment", {}) or {}
    if out:
        values["run_dir"] = out
    unknown = set(exp_values) - {f.name for f in dataclasses.fields(ExperimentConfig)}
    if unknown:
        raise ConfigError(f"experiment.{sorted(unknown)[0]}: unknown setting")
    return config_from_dict(values), ExperimentConfig(**exp_values)


def cell_name(method: str, budget: float, seed: int) -> str:
    return f"{method}_b{budget:g}_s{seed}"


def cell_failures(split_dir: str, failures: str, seed: int) -> str:
    """A variant's `failures` file for one cell: `{seed}` becomes the cell's seed, and a relative
    path is taken inside the split's folder, so `cells/random_b0.1_s{seed}/eval/failures.parquet`
    is the failures of the same split's pilot cell of the same seed (listed before the variant)."""
    path = failures.format(seed=seed)
    return path if "://" in path or posixpath.isabs(path) else posixpath.join(split_dir, path)


def cell_config(cfg: RunConfig, exp: ExperimentConfig, variant: dict, budget: float, seed: int) -> RunConfig:
    """The run config of one cell; the variant {'label': 'full', 'method': 'random'} at budget 1 is full data."""
    settings = {k: v for k, v in variant.items() if k != "label"}
    if isinstance(settings.get("failures"), str):
        settings["failures"] = cell_failures(cfg.run_dir, settings["failures"], seed)
    epochs = exp.epochs_by_budget.get(float(budget), cfg.train.epochs)
    if exp.protocol == "steps":
        epochs = max(1, math.ceil(cfg.train.epochs / budget))
    return dataclasses.replace(
        cfg,
        run_dir=f"{cfg.run_dir}/cells/{cell_name(variant['label'], budget, seed)}",
        select=dataclasses.replace(cfg.select, **settings, budget=budget, seed=seed),
        train=dataclasses.replace(cfg.train, seed=seed, epochs=epochs),
    )


def split_config(cfg: RunConfig, offset: float | None) -> RunConfig:
    """The experiment's config on one development split: with `test_offsets`, its own folder."""
    if offset is None:
        return cfg
    return dataclasses.replace(cfg, run_dir=f"{cfg.run_dir}/splits/o{offset:g}", data=dataclasses.replace(cfg.data, test_offset=offset))


def build_base(cfg: RunConfig, features_from: str | None = None) -> str:
    """Ingest, features and clusters in `<cfg.run_dir>/base`; with `features_from`, the features are
    taken from that base (same rows, another split) instead of computed."""
    from rsdist.features import resplit
    from rsdist.pipeline import run_pipeline

    base_dir = f"{cfg.run_dir}/base"
    bodies = None
    if features_from is not None:
        bodies = {"features": lambda run: resplit.run(run, cfg.features, RunDir(features_from))}
    run_pipeline(dataclasses.replace(cfg, run_dir=base_dir), only=["ingest", "features", "cluster"], write_summary=False, bodies=bodies)
    return base_dir


def run_experiment(cfg: RunConfig, exp: ExperimentConfig) -> dict:
    """Run every cell (skipping finished ones) and write the table, the plot and the raw results."""
    from rsdist.pipeline import run_pipeline

    out = RunDir(cfg.run_dir)
    splits, first_base = [], exp.features_from
    for offset in exp.test_offsets or [None]:
        scfg = split_config(cfg, offset)
        base_dir = build_base(scfg, features_from=first_base)
        first_base = first_base or base_dir
        splits.append((scfg, base_dir))
    variants = [(v, b, s) for v in exp.methods for b in exp.budgets for s in exp.seeds]
    if exp.include_full:
        variants = [({"label": "full", "method": "random"}, 1.0, s) for s in exp.seeds] + variants
    cells = [(scfg, base_dir, *v) for scfg, base_dir in splits for v in variants]
    results = []
    for i, (scfg, base_dir, variant, budget, seed) in enumerate(cells, 1):
        method = variant["label"]
        log.info("experiment cell %d/%d: %s (test_offset %g)", i, len(cells), cell_name(method, budget, seed), scfg.data.test_offset)
        ccfg = cell_config(scfg, exp, variant, budget, seed)
        run = RunDir(ccfg.run_dir, base=base_dir, inherited=INHERITED)
        summary = run_pipeline(ccfg, only=["select", "train", "eval"], run=run)
        results.append({
            "method": method, "budget": budget, "seed": seed, "test_offset": scfg.data.test_offset, "epochs": ccfg.train.epochs,
            "kept_epoch": summary["stages"]["train"].get("kept_epoch", ccfg.train.epochs),
            "selected": summary["selection"]["selected"], "pool": summary["selection"]["pool"],
            "select_seconds": summary["stages"]["select"]["seconds"],
            "train_seconds": summary["stages"]["train"]["seconds"],
            "metrics": summary.get("metrics", {}),
        })
    table = aggregate(results, exp.metrics)
    paired = paired_against_random(results, exp.metrics)
    report = {"protocol": exp.protocol, "settings": dataclasses.asdict(exp), "cells": results, "table": table, "vs_random": paired}
    if len(splits) > 1:
        report["vs_random_by_split"] = paired_by_split(results, exp.metrics)
    out.write_json(report, "results.json")
    plot = plot_budget_curves(out, table, exp.metrics[0])
    text = render_table(table, exp, plot) + render_paired(paired, exp.metrics)
    if len(splits) > 1:
        text += render_paired(report["vs_random_by_split"], exp.metrics, title="Against random on each split, paired by seed:")
    out.write_text(text, "experiment.md")
    return report


def _metric(cell: dict, name: str) -> float | None:
    value = cell["metrics"].get(name)
    return float(value) if isinstance(value, (int, float)) else None


def aggregate(results: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and sd per (method, budget) of each metric, relative to the full-data mean; with
    several development splits, the sd is pooled within splits (seed-to-seed spread)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    full = groups.get(("full", 1.0), [])
    rows = []
    for (method, budget), cells in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(cells),
                               "epochs": max(c["epochs"] for c in cells),
                               "kept_epoch_mean": statistics.mean(c.get("kept_epoch", c["epochs"]) for c in cells),
                               "select_seconds": statistics.mean(c["select_seconds"] for c in cells),
                               "train_seconds": statistics.mean(c["train_seconds"] for c in cells)}
        for m in metrics:
            values = [v for v in (_metric(c, m) for c in cells) if v is not None]
            if not values:
                continue
            row[f"{m}_mean"] = statistics.mean(values)
            row[f"{m}_sd"] = pooled_sd(by_split([(cell_split(c), v) for c in cells if (v := _metric(c, m)) is not None]))
            ref = [v for v in (_metric(c, m) for c in full) if v is not None]
            if ref and statistics.mean(ref):
                row[f"{m}_rel_full"] = row[f"{m}_mean"] / statistics.mean(ref)
        rows.append(row)
    return rows


def cell_split(cell: dict) -> float:
    """A result cell's development split (its test_offset; results written before test_offsets: 0)."""
    return float(cell.get("test_offset", 0.0))


def by_split(items: list[tuple[float, float]]) -> list[list[float]]:
    """(split, value) pairs as one list of values per split, splits in order (for pooled_sd)."""
    groups: dict[float, list[float]] = {}
    for split, value in sorted(items, key=lambda kv: kv[0]):
        groups.setdefault(split, []).append(value)
    return list(groups.values())


def pooled_sd(groups: list[list[float]]) -> float:
    """The within-group sd pooled over groups (sum of squared deviations from each group's mean,
    over n - groups); with one group, the sample sd."""
    groups = [g for g in groups if g]
    dof = sum(len(g) for g in groups) - len(groups)
    if dof < 1:
        return 0.0
    return math.sqrt(sum(sum((x - statistics.mean(g)) ** 2 for x in g) for g in groups) / dof)


def paired_against_random(results: list[dict], metrics: list[str]) -> list[dict]:
    """Each method against random at the same budget, paired by seed on the same split (the seed
    draws both selections and initialises both trainings; the split fixes both held-out sets):
    mean and sd of the per-pair difference, the mean difference in units of random's sd over
    those seeds (pooled within splits), and how many pairs are above random."""
    by_cell = {(r["method"], r["budget"], cell_split(r), r["seed"]): r for r in results}
    rows = []
    for method, budget in sorted({(r["method"], r["budget"]) for r in results if r["method"] not in ("random", "full")}):
        keys = sorted((o, s) for (m, b, o, s) in by_cell if m == method and b == budget and ("random", budget, o, s) in by_cell)
        if not keys:
            continue
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(keys), "splits": len({o for o, _ in keys})}
        for m in metrics:
            pairs = [(o, _metric(by_cell[(method, budget, o, s)], m), _metric(by_cell[("random", budget, o, s)], m)) for o, s in keys]
            pairs = [(o, a, b) for o, a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            diff = [a - b for _, a, b in pairs]
            random_sd = pooled_sd(by_split([(o, b) for o, _, b in pairs]))
            row[f"{m}_diff"] = statistics.mean(diff)
            row[f"{m}_diff_sd"] = statistics.stdev(diff) if len(diff) > 1 else 0.0
            row[f"{m}_random_sd"] = random_sd
            row[f"{m}_diff_in_random_sd"] = row[f"{m}_diff"] / random_sd if random_sd else None
            row[f"{m}_seeds_above"] = sum(d > 0 for d in diff)
        rows.append(row)
    return rows


def paired_by_split(results: list[dict], metrics: list[str]) -> list[dict]:
    """paired_against_random on each split alone, each row with its test_offset."""
    rows = []
    for offset in sorted({cell_split(r) for r in results}):
        rows += [{**row, "test_offset": offset} for row in paired_against_random([r for r in results if cell_split(r) == offset], metrics)]
    return sorted(rows, key=lambda r: (r["method"], r["budget"], r["test_offset"]))


def render_paired(paired: list[dict], metrics: list[str], title: str = "Against random at the same budget, paired by seed:") -> str:
    if not paired:
        return ""
    per_split = any("test_offset" in row for row in paired)
    pairs = "split x seed" if any(row.get("splits", 1) > 1 for row in paired) else "seeds"
    head = ["method", "budget"] + (["test_offset"] if per_split else []) + [pairs]
    for m in metrics:
        head += [f"{m} - random", "sd", "/ random sd", "seeds above"]
    lines = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in paired:
        cells = [row["method"], f"{row['budget']:g}"] + ([f"{row['test_offset']:g}"] if per_split else []) + [str(row["seeds"])]
        for m in metrics:
            if f"{m}_diff" not in row:
                cells += ["", "", "", ""]
                continue
            ratio = row[f"{m}_diff_in_random_sd"]
            cells += [f"{row[m + '_diff']:+.2f}", f"{row[m + '_diff_sd']:.2f}", "" if ratio is None else f"{ratio:+.1f}", f"{row[m + '_seeds_above']} / {row['seeds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_table(table: list[dict], exp: ExperimentConfig, plot: str | None) -> str:
    lines = [f"# Experiment ({exp.protocol} protocol, seeds {exp.seeds})", ""]
    head = ["method", "budget", "seeds"]
    for m in exp.metrics:
        head += [f"{m} mean", f"{m} sd", f"{m} / full"]
    head += ["epochs (mean kept)", "select s", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["method"], f"{row['budget']:g}", str(row["seeds"])]
        for m in exp.metrics:
            cells += [f"{row.get(m + '_mean', float('nan')):.2f}", f"{row.get(m + '_sd', float('nan')):.2f}", f"{row.get(m + '_rel_full', float('nan')):.3f}"]
        cells += [f"{row['epochs']} ({row['kept_epoch_mean']:.1f})", f"{row['select_seconds']:.1f}", f"{row['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_budget_curves(out: RunDir, table: list[dict], metric: str) -> str | None:
    """Metric against budget per method, with one-sd error bars and the full-data band."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in (r for r in table if r["method"] == "full" and f"{metric}_mean" in r):
        m, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
        ax.axhspan(m - sd, m + sd, color="#dddddd")
        ax.axhline(m, color="#555555", label="full data")
    for method in sorted({r["method"] for r in table} - {"full"}):
        rows = sorted((r for r in table if r["method"] == method and f"{metric}_mean" in r), key=lambda r: r["budget"])
        if rows:
            ax.errorbar([r["budget"] for r in rows], [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_sd"] for r in rows], marker="o", capsize=3, label=method)
    ax.set_xlabel("budget (fraction of the training pool)")
    ax.set_ylabel(metric)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)  # outside: with many methods it would hide the curves
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    out.write_bytes(buf.getvalue(), "budget_curve.png")
    return "budget_curve.png"
