"""Entry script for `ray job submit`: run the whole rsdist job from a YAML config on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/select_and_tune.py jobs/rsicd.yaml [--out s3://bucket/runs/rsicd] [--set k=v ...]

Ray sets RAY_ADDRESS for the job, so the pipeline joins the cluster instead of starting a local
Ray; the working directory (this repository) is shipped to every worker, which is how workers
import rsdist. Stages size themselves from the cluster's resources (GPUs included), and the
autoscaler adds workers when a stage asks for more than the cluster has.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rsdist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
