"""The `rsdist` command line.

    rsdist demo [--data URI] [--budget F] [--method M] [--out DIR]
    rsdist run CONFIG.yaml [--out DIR] [--set section.field=value ...]
    rsdist ingest|features|cluster|select|train|eval [CONFIG.yaml] --out DIR [stage flags]
    rsdist experiment CONFIG.yaml [--out DIR]
    rsdist report --out DIR
    rsdist vlm train|eval [CONFIG.yaml] --out DIR [--task scene|vqa] [--set train.vlm.FIELD=VALUE ...]
    rsdist bench ingest|features|kmeans|select|train|vlm-train [flags]

Every stage reads and writes the run directory given by --out (any fsspec URI). A bad setting
or a bad input ends with one line naming the field, file or row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

import yaml

from rsdist.config import ConfigError, RunConfig, apply_sets, config_from_dict, config_to_dict, load_config
from rsdist.pipeline import STAGE_NAMES

BENCHES = {"ingest": "rsdist.bench.ingest", "features": "rsdist.bench.features", "kmeans": "rsdist.bench.kmeans", "select": "rsdist.bench.select", "train": "rsdist.bench.train",
           "vlm-train": "rsdist.bench.vlm_train"}


def build_config(path: str | None, overrides: dict[str, object], sets: list[str]) -> RunConfig:
    """Config file (or defaults) + CLI flags + --set overrides, validated once at the end."""
    values = config_to_dict(load_config(path)) if path else {}
    apply_sets(values, [f"{dotted}={yaml.safe_dump(value)}" for dotted, value in overrides.items() if value is not None])
    apply_sets(values, sets)
    return config_from_dict(values)


def demo_config(args) -> RunConfig:
    """The embedded default: synthetic data and small images, or the user's data with --data."""
    overrides = {"run_dir": args.out, "select.budget": args.budget, "select.method": args.method}
    if args.data:
        overrides.update({"data.source": args.data, "data.format": args.format})
    else:
        overrides.update({"features.image_size": 128, "train.epochs": 8})
    return build_config(None, overrides, args.set)


def _add_common(p: argparse.ArgumentParser, config_optional: bool = True) -> None:
    if config_optional:
        p.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    p.add_argument("--out", help="run directory (any fsspec URI); overrides run_dir")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting")
    p.add_argument("--force", action="store_true", help="re-run even when the output is complete")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsdist", description="Select the subset of an image-text pool worth fine-tuning on, and fine-tune on it.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole job on the embedded default (synthetic data) or --data")
    demo.add_argument("--data", help="real data instead of the synthetic demo set (folder or fsspec URI)")
    demo.add_argument("--format", default=None, help="layout of --data (default: detect)")
    demo.add_argument("--budget", type=float, default=None, help="fraction (0, 1] or count of training samples to keep (default 1/3)")
    demo.add_argument("--method", default=None, help="selection strategy (default alignment-mmd)")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    demo.add_argument("--force", action="store_true")

    run = sub.add_parser("run", help="run the whole job from a YAML config")
    run.add_argument("config")
    _add_common(run, config_optional=False)

    for name in STAGE_NAMES:
        p = sub.add_parser(name, help=f"run only the {name} stage (upstream stages must be complete)")
        _add_common(p)
        if name == "ingest":
            p.add_argument("--source", help="input data (folder or fsspec URI)")
            p.add_argument("--format", help="input layout (default: detect)")
            p.add_argument("--images", help="images root, when not inside the source")
        if name == "select":
            p.add_argument("--method", help="selection strategy")
            p.add_argument("--budget", type=float, help="fraction (0, 1] or count")

    exp = sub.add_parser("experiment", help="full data vs strategies at several budgets and seeds")
    exp.add_argument("config", help="YAML run config with an `experiment:` section")
    exp.add_argument("--out", help="experiment directory; overrides run_dir")

    rep = sub.add_parser("report", help="rewrite report.md from a run's summary.json")
    rep.add_argument("--out", required=True, help="run directory")

    from rsdist.vlm_cli import add_parser as add_vlm_parser

    add_vlm_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks; figures as one JSON object on the last line")
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _stage_overrides(args) -> dict:
    out = {"run_dir": args.out}
    for flag, key in (("source", "data.source"), ("format", "data.format"), ("images", "data.images"), ("method", "select.method"), ("budget", "select.budget")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    return out


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rsdist").setLevel(logging.WARNING if args.quiet else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "bench":
            module = importlib.import_module(BENCHES[args.name])
            figures = module.bench(args.args)
            print(json.dumps(figures, sort_keys=True, default=float))
            return 0
        if args.command == "vlm":
            from rsdist.vlm_cli import main as vlm_main

            return vlm_main(args)
        if args.command == "experiment":
            from rsdist.experiment import load_experiment, run_experiment

            cfg, exp = load_experiment(args.config, args.out)
            report = run_experiment(cfg, exp)
            print(json.dumps({"table": report["table"]}, default=float))
            return 0
        if args.command == "report":
            from rsdist.core.rundir import RunDir
            from rsdist.report import write_report

            run = RunDir(args.out)
            print(write_report(run, run.read_json("summary.json")))
            return 0
        from rsdist.pipeline import run_pipeline

        if args.command == "demo":
            cfg = demo_config(args)
            only = None
        else:
            cfg = build_config(args.config, _stage_overrides(args), args.set)
            only = None if args.command == "run" else [args.command]
        summary = run_pipeline(cfg, only=only, force=args.force)
        print(json.dumps({k: summary[k] for k in ("selection", "metrics") if k in summary}, default=float))
        print(f"run directory: {cfg.run_dir} (summary.json, report.md)")
        return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"rsdist: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
