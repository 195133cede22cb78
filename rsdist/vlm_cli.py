"""`rsdist vlm train|eval [CONFIG.yaml] --out RUN [--task scene|vqa] [--set SECTION.vlm.FIELD=VALUE ...]`

VLM instruction LoRA and VLM evaluation by generation on a run directory whose `shards/` (and,
for training, `selection/manifest.parquet`) the pipeline wrote. The YAML holds the two settings
sections under the names their errors use, plus Ray's:

    train: {vlm: {model: hf:/models/qwen2-vl-2b, batch_size: 4, grad_accum: 8, epochs: 1}}
    eval:  {vlm: {task: scene, batch_size: 16, num_actors: 2}}
    ray:   {address: null}

`vlm train` runs `rsdist.train.vlm_loop.run_vlm` (resuming from the run's checkpoints) and prints
its result as JSON; `vlm eval` runs `rsdist.eval.vlm.run_vlm_eval` and prints the metrics.
"""

from __future__ import annotations

import argparse
import json

from rsdist.eval.vlm_metrics import TASKS


def add_parser(sub) -> None:
    p = sub.add_parser("vlm", help="VLM instruction LoRA (train) or evaluation by generation (eval) on a run directory")
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument("config", nargs="?", help="YAML with train.vlm / eval.vlm / ray sections (defaults when omitted)")
    p.add_argument("--out", required=True, help="run directory (any fsspec URI Ray workers can reach)")
    p.add_argument("--task", choices=TASKS, help="eval: what to evaluate (overrides eval.vlm.task)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.vlm.FIELD=VALUE", help="override one setting")


def main(args: argparse.Namespace) -> int:
    from rsdist.core.rundir import RunDir
    from rsdist.core.raycluster import init_ray
    from rsdist.vlm_job import load_job

    job = load_job(args.config, args.set, args.task)
    run = RunDir(args.out)
    needs_ray = args.action == "train" or job.eval.vlm.num_actors > 0
    if needs_ray:
        init_ray(job.ray.address, job.ray.num_cpus)
    if args.action == "train":
        from rsdist.train.vlm_loop import run_vlm

        result = run_vlm(run, job.train.vlm)
        print(json.dumps({"rows_in": result.rows_in, **result.extra}, default=float))
        print(f"adapter: {run.url('checkpoints', 'vlm', 'final', 'adapter')}")
    else:
        from rsdist.eval.vlm import run_vlm_eval

        out = run_vlm_eval(run, job.eval.vlm)
        print(json.dumps({"task": out["task"], "rows": out["rows"], "metrics": {k: v for k, v in out["metrics"].items() if not k.startswith("per_")}}, default=float))
        print(f"results: {run.url('eval', 'vlm_' + out['task'] + '.json')}")
    return 0

