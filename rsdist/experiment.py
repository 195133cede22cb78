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

Output: results.json (every cell, the table, and "vs_random": each method against random at the
same budget, paired by seed), experiment.md (the table: mean and sd per method and budget,
relative to full data, selection and training seconds; and the paired comparison),
budget_curve.png (metric against budget per method).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from rsdist.config import SELECT_METHODS, ConfigError, RunConfig, SelectConfig, _choice, _help, config_from_dict
from rsdist.io.rundir import RunDir

log = logging.getLogger("rsdist")

INHERITED = ("synthetic_source", "shards", "features", "clusters")
PROTOCOLS = ("epochs", "steps")


@dataclass
class ExperimentConfig:
    methods: list = _help("Strategies to compare: a method name, or a mapping {label, method, <select settings>} for a variant (e.g. a dedup filter in front).", default_factory=lambda: ["random", "shift"])
    budgets: list[float] = _help("Budgets as fractions of the training pool.", default_factory=lambda: [0.1, 0.2, 0.33])
    seeds: list[int] = _help("Seeds; each seeds both selection and training.", default_factory=lambda: [0, 1, 2])
    protocol: str = _help(f"Training protocol, one of {PROTOCOLS}.", default="epochs")
    epochs_by_budget: dict = _help("`epochs` protocol: epochs per budget, {budget: epochs} (1 = full data), for each budget at its own schedule; a budget not listed trains train.epochs.", default_factory=dict)
    include_full: bool = _help("Also train on the full pool (the reference every cell is compared with).", default=True)
    metrics: list[str] = _help("Metrics the table and plot show.", default_factory=lambda: ["mR", "zero_shot_acc"])

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
    with fsspec.open(path, "r") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
    exp_values = values.pop("experiment", {}) or {}
    if out:
        values["run_dir"] = out
    unknown = set(exp_values) - {f.name for f in dataclasses.fields(ExperimentConfig)}
    if unknown:
        raise ConfigError(f"experiment.{sorted(unknown)[0]}: unknown setting")
    return config_from_dict(values), ExperimentConfig(**exp_values)


def cell_name(method: str, budget: float, seed: int) -> str:
    return f"{method}_b{budget:g}_s{seed}"


def cell_config(cfg: RunConfig, exp: ExperimentConfig, variant: dict, budget: float, seed: int) -> RunConfig:
    """The run config of one cell; the variant {'label': 'full', 'method': 'random'} at budget 1 is full data."""
    settings = {k: v for k, v in variant.items() if k != "label"}
    epochs = exp.epochs_by_budget.get(float(budget), cfg.train.epochs)
    if exp.protocol == "steps":
        epochs = max(1, math.ceil(cfg.train.epochs / budget))
    return dataclasses.replace(
        cfg,
        run_dir=f"{cfg.run_dir}/cells/{cell_name(variant['label'], budget, seed)}",
        select=dataclasses.replace(cfg.select, **settings, budget=budget, seed=seed),
        train=dataclasses.replace(cfg.train, seed=seed, epochs=epochs),
    )


def run_experiment(cfg: RunConfig, exp: ExperimentConfig) -> dict:
    """Run every cell (skipping finished ones) and write the table, the plot and the raw results."""
    from rsdist.pipeline import run_pipeline

    out = RunDir(cfg.run_dir)
    base_dir = f"{cfg.run_dir}/base"
    base_cfg = dataclasses.replace(cfg, run_dir=base_dir)
    run_pipeline(base_cfg, only=["ingest", "features", "cluster"], write_summary=False)
    cells = [(v, b, s) for v in exp.methods for b in exp.budgets for s in exp.seeds]
    if exp.include_full:
        cells = [({"label": "full", "method": "random"}, 1.0, s) for s in exp.seeds] + cells
    results = []
    for i, (variant, budget, seed) in enumerate(cells, 1):
        method = variant["label"]
        log.info("experiment cell %d/%d: %s", i, len(cells), cell_name(method, budget, seed))
        ccfg = cell_config(cfg, exp, variant, budget, seed)
        run = RunDir(ccfg.run_dir, base=base_dir, inherited=INHERITED)
        summary = run_pipeline(ccfg, only=["select", "train", "eval"], run=run)
        results.append({
            "method": method, "budget": budget, "seed": seed, "epochs": ccfg.train.epochs,
            "selected": summary["selection"]["selected"], "pool": summary["selection"]["pool"],
            "select_seconds": summary["stages"]["select"]["seconds"],
            "train_seconds": summary["stages"]["train"]["seconds"],
            "metrics": summary.get("metrics", {}),
        })
    table = aggregate(results, exp.metrics)
    paired = paired_against_random(results, exp.metrics)
    report = {"protocol": exp.protocol, "settings": dataclasses.asdict(exp), "cells": results, "table": table, "vs_random": paired}
    out.write_json(report, "results.json")
    plot = plot_budget_curves(out, table, exp.metrics[0])
    out.write_text(render_table(table, exp, plot) + render_paired(paired, exp.metrics), "experiment.md")
    return report


def _metric(cell: dict, name: str) -> float | None:
    value = cell["metrics"].get(name)
    return float(value) if isinstance(value, (int, float)) else None


def aggregate(results: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and sd per (method, budget) of each metric, relative to the full-data mean."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    full = groups.get(("full", 1.0), [])
    rows = []
    for (method, budget), cells in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(cells),
                               "select_seconds": statistics.mean(c["select_seconds"] for c in cells),
                               "train_seconds": statistics.mean(c["train_seconds"] for c in cells)}
        for m in metrics:
            values = [v for v in (_metric(c, m) for c in cells) if v is not None]
            if not values:
                continue
            row[f"{m}_mean"] = statistics.mean(values)
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            ref = [v for v in (_metric(c, m) for c in full) if v is not None]
            if ref and statistics.mean(ref):
                row[f"{m}_rel_full"] = row[f"{m}_mean"] / statistics.mean(ref)
        rows.append(row)
    return rows


def paired_against_random(results: list[dict], metrics: list[str]) -> list[dict]:
    """Each method against random at the same budget, paired by seed (the seed draws both selections
    and initialises both trainings): mean and sd of the per-seed difference, the mean difference in
    units of random's sd over those seeds, and how many seeds are above random."""
    by_cell = {(r["method"], r["budget"], r["seed"]): r for r in results}
    rows = []
    for method, budget in sorted({(r["method"], r["budget"]) for r in results if r["method"] not in ("random", "full")}):
        seeds = sorted(s for (m, b, s) in by_cell if m == method and b == budget and ("random", budget, s) in by_cell)
        if not seeds:
            continue
        row: dict[str, Any] = {"method": method, "budget": budget, "seeds": len(seeds)}
        for m in metrics:
            pairs = [(_metric(by_cell[(method, budget, s)], m), _metric(by_cell[("random", budget, s)], m)) for s in seeds]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            diff = [a - b for a, b in pairs]
            random_sd = statistics.stdev(b for _, b in pairs) if len(pairs) > 1 else 0.0
            row[f"{m}_diff"] = statistics.mean(diff)
            row[f"{m}_diff_sd"] = statistics.stdev(diff) if len(diff) > 1 else 0.0
            row[f"{m}_random_sd"] = random_sd
            row[f"{m}_diff_in_random_sd"] = row[f"{m}_diff"] / random_sd if random_sd else None
            row[f"{m}_seeds_above"] = sum(d > 0 for d in diff)
        rows.append(row)
    return rows


def render_paired(paired: list[dict], metrics: list[str]) -> str:
    if not paired:
        return ""
    head = ["method", "budget", "seeds"]
    for m in metrics:
        head += [f"{m} - random", "sd", "/ random sd", "seeds above"]
    lines = ["", "Against random at the same budget, paired by seed:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in paired:
        cells = [row["method"], f"{row['budget']:g}", str(row["seeds"])]
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
    head += ["select s", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["method"], f"{row['budget']:g}", str(row["seeds"])]
        for m in exp.metrics:
            cells += [f"{row.get(m + '_mean', float('nan')):.2f}", f"{row.get(m + '_sd', float('nan')):.2f}", f"{row.get(m + '_rel_full', float('nan')):.3f}"]
        cells += [f"{row['select_seconds']:.1f}", f"{row['train_seconds']:.1f}"]
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
