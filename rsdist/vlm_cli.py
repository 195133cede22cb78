"""`rsdist vlm train|eval [CONFIG.yaml] --out RUN [--set section.field=value ...]`

A thin alias: the job's train or eval stage with `train.model` set to 'vlm' (the settings are the
one run config's: `train.vlm`, `eval.vlm`), on a run directory whose upstream stages are complete.
`rsdist run CONFIG` with `train: {model: vlm}` runs the whole job.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("vlm", help="the job's train or eval stage with train.model=vlm (instruction LoRA, evaluation by generation)")
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument("config", nargs="?", help="YAML run config (defaults when omitted)")
    p.add_argument("--out", help="run directory (any fsspec URI Ray workers can reach); overrides run_dir")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting")
    p.add_argument("--force", action="store_true", help="re-run even when the output is complete")


def main(args: argparse.Namespace) -> int:
    from rsdist.cli import build_config
    from rsdist.pipeline import run_pipeline

    cfg = build_config(args.config, {"run_dir": args.out, "train.model": "vlm"}, args.set)
    summary = run_pipeline(cfg, only=[args.action], force=args.force)
    record = summary["stages"][args.action]
    print(json.dumps({k: v for k, v in record.items() if k != "metrics"} | ({"metrics": summary.get("metrics", {})} if args.action == "eval" else {}), default=float))
    print(f"run directory: {cfg.run_dir} ({'vlm_checkpoints/final/adapter' if args.action == 'train' else 'vlm_eval/metrics.json'})")
    return 0
