"""The time selection saves on the VLM path, from an experiment's results.json.

    python research/vlm_time_ratio.py runs/exp-vlm-time/results.json

Prints, per method at its budget, the mean selection and training seconds over seeds and the
ratio (selection + training at the budget) / (training on full data), and the same with the
features and cluster seconds of the experiment's base run (one pass over the whole pool, shared
by every method) added to the selected side. One JSON object on the last line.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def ratios(results: dict, base_stages: dict | None = None) -> dict:
    cells = results["cells"]
    full = [c["train_seconds"] for c in cells if c["method"] == "full"]
    if not full:
        raise SystemExit("results.json has no full-data cells (experiment.include_full)")
    full_train = statistics.mean(full)
    upstream = sum(base_stages.get(s, {}).get("seconds", 0.0) for s in ("features", "cluster")) if base_stages else None
    out = {"full_train_seconds": round(full_train, 2), "full_seeds": len(full), "methods": {}}
    for method in sorted({c["method"] for c in cells} - {"full"}):
        own = [c for c in cells if c["method"] == method]
        select = statistics.mean(c["select_seconds"] for c in own)
        train = statistics.mean(c["train_seconds"] for c in own)
        row = {"budget": own[0]["budget"], "seeds": len(own), "select_seconds": round(select, 2), "train_seconds": round(train, 2),
               "ratio": round((select + train) / full_train, 3), "train_ratio": round(train / full_train, 3),
               "selected": own[0]["selected"], "pool": own[0]["pool"]}
        if upstream is not None:
            row["ratio_with_features_and_cluster"] = round((upstream + select + train) / full_train, 3)
        out["methods"][method] = row
    if upstream is not None:
        out["features_and_cluster_seconds"] = round(upstream, 2)
    return out


def main(path: str) -> None:
    results = json.loads(Path(path).read_text())
    base = Path(path).parent / "base" / "summary.json"
    stages = None
    if base.exists():
        stages = json.loads(base.read_text())["stages"]
    else:
        stages = {name: json.loads((Path(path).parent / "base" / folder / "_SUCCESS.json").read_text())
                  for name, folder in (("features", "features"), ("cluster", "clusters")) if (Path(path).parent / "base" / folder / "_SUCCESS.json").exists()} or None
    figures = ratios(results, stages)
    for method, row in figures["methods"].items():
        print(f"{method} at {row['budget']:.3g}: select {row['select_seconds']} s + train {row['train_seconds']} s vs full train "
              f"{figures['full_train_seconds']} s -> ratio {row['ratio']}", file=sys.stderr)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
