"""The run's summary (`summary.json`, for programs) and report (`report.md` + plots, for people).

summary.json holds, per stage: rows_in, rows_out, seconds, and whether it was skipped as already
complete; the selection (method, budget, count); and the evaluation metrics.
"""

from __future__ import annotations

import io
import logging

from rsdist.config import RunConfig
from rsdist.core.rundir import RunDir

log = logging.getLogger("rsdist")

_KEEP = ("rows_in", "rows_out", "seconds", "skipped")


def build_summary(run: RunDir, cfg: RunConfig, records: dict[str, dict], wall_seconds: float) -> dict:
    stages = {name: {k: rec.get(k) for k in _KEEP} for name, rec in records.items()}
    for name, rec in records.items():
        extra = {k: v for k, v in rec.items() if k not in _KEEP and k not in ("stage", "fingerprint", "metrics")}
        stages[name].update(extra)
    summary = {
        "run_dir": run.uri,
        "data": {"source": cfg.data.source, "format": cfg.data.format},
        "encoder": cfg.features.encoder,
        "stages": stages,
        "wall_seconds": round(wall_seconds, 2),
    }
    sel = records.get("select")
    if sel is not None:
        summary["selection"] = {
            "method": sel.get("method", cfg.select.method),
            "budget": cfg.select.budget,
            "pool": sel.get("pool", sel.get("rows_in")),
            "selected": sel.get("selected", sel.get("rows_out")),
        }
    ev = records.get("eval")
    if ev is not None:
        summary["metrics"] = ev.get("metrics", {})
    return summary


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _save_png(run: RunDir, fig, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    run.write_bytes(buf.getvalue(), "report", name)
    return f"report/{name}"


def plot_selection(run: RunDir) -> list[str]:
    """Per-cluster pool vs selected counts, and score distributions of kept vs dropped samples."""
    if not run.exists("selection", "manifest.parquet"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = run.read_table("selection", "manifest.parquet", columns=["cluster", "score", "selected"]).to_pandas()
    by = m.groupby("cluster")["selected"].agg(["size", "sum"]).sort_values("size", ascending=False)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(len(by))
    a.bar(x, by["size"], color="#c8d3e0", label="pool")
    a.bar(x, by["sum"], color="#2f6db3", label="selected")
    a.set_xlabel("cluster (by size)")
    a.set_ylabel("samples")
    a.set_title("Budget spent per cluster")
    a.legend()
    scores = m["score"].to_numpy(dtype=float)
    bins = np.linspace(np.nanmin(scores), np.nanmax(scores) + 1e-9, 30) if len(scores) else 10
    b.hist(scores[~m["selected"].to_numpy()], bins=bins, alpha=0.6, label="dropped", color="#999999")
    b.hist(scores[m["selected"].to_numpy()], bins=bins, alpha=0.8, label="selected", color="#2f6db3")
    b.set_xlabel("selection score")
    b.set_title("Scores of kept and dropped samples")
    b.legend()
    path = _save_png(run, fig, "selection.png")
    plt.close(fig)
    return [path]


def plot_training(run: RunDir) -> list[str]:
    if not run.exists("checkpoints", "final", "train_meta.json"):
        return []
    meta = run.read_json("checkpoints", "final", "train_meta.json")
    losses = meta.get("epoch_loss") or []
    if not losses:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", color="#2f6db3")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean InfoNCE loss")
    ax.set_title("Training loss on the selected subset")
    path = _save_png(run, fig, "training.png")
    plt.close(fig)
    return [path]


def write_report(run: RunDir, summary: dict) -> str:
    """Write report.md (and its plots) from the summary; returns the report's path."""
    lines = [f"# rsdist run: {summary['run_dir']}", ""]
    data = summary["data"]
    synthetic = "synthetic" in str(data.get("source"))
    lines += [f"Data: `{data['source']}`" + (" (SYNTHETIC demo data, generated)" if synthetic else ""), f"Encoder: `{summary['encoder']}`", ""]
    lines += ["## Stages", "", "| stage | rows in | rows out | seconds | |", "|---|---:|---:|---:|---|"]
    for name, st in summary["stages"].items():
        lines.append(f"| {name} | {st.get('rows_in')} | {st.get('rows_out')} | {_fmt(st.get('seconds'))} | {'skipped (complete)' if st.get('skipped') else ''} |")
    ingest = summary["stages"].get("ingest", {})
    if ingest.get("quarantined"):
        lines += ["", f"Quarantined at ingest: {ingest['quarantined']} ({ingest.get('quarantined_by_reason')}); see `shards/quarantine/`."]
    if "selection" in summary:
        s = summary["selection"]
        lines += ["", "## Selection", "", f"Method `{s['method']}`, budget {_fmt(s['budget'])}: {s['selected']} of {s['pool']} training samples selected."]
    if summary.get("metrics"):
        lines += ["", "## Evaluation (held-out split)", ""] + metrics_table(summary["metrics"])
    plots = []
    try:
        plots = plot_selection(run) + plot_training(run)
    except Exception as e:  # a plot must never fail the run
        log.warning("report: plots skipped: %s", e)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Total wall time: {summary['wall_seconds']:.1f} s", ""]
    return run.write_text("\n".join(lines), "report.md")


_METRIC_NAMES = {
    "i2t_r1": "image->text R@1", "i2t_r5": "image->text R@5", "i2t_r10": "image->text R@10",
    "t2i_r1": "text->image R@1", "t2i_r5": "text->image R@5", "t2i_r10": "text->image R@10",
    "mR": "mR (mean of the six)", "zero_shot_acc": "zero-shot scene accuracy (%)",
}


def metrics_table(metrics: dict) -> list[str]:
    """Trained-on-the-subset metrics beside the untrained model's (heads at initialisation)."""
    flat = _flatten(metrics)
    lines = [f"{flat.get('images', '?')} held-out images, {flat.get('texts', '?')} captions.", "",
             "| metric | trained on the subset | untrained |", "|---|---:|---:|"]
    for key, name in _METRIC_NAMES.items():
        if key in flat:
            base = flat.get(f"untrained_{key}")
            lines.append(f"| {name} | {_fmt(flat[key])} | {'' if base is None else _fmt(base)} |")
    return lines


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if k in ("per_class",):
                continue
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out
