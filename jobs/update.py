"""An incremental refresh (``kdray update``: new interactions into a run's student, a new version, optionally rolled
out to the running Serve application) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/update.py --run /mnt/kdray/runs/ml-100k --interactions /mnt/kdray/new/today.parquet --rollout

The run directory and the interactions file must be readable on the head node (the shared filesystem); the config is
the run's own config.yaml unless ``--config`` names another. ``--rollout`` redeploys the Serve application running on
this cluster without dropping requests; without a running application the job fails before training.
"""

from __future__ import annotations

import sys
from typing import Sequence

from _job import parser, run_kdray


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("Fold new interactions into a kdray run's student on the Ray cluster this job runs on.")
    p.add_argument("--run", required=True, help="the run directory, on storage the head node can read")
    p.add_argument("--interactions", required=True, help="Parquet or CSV with columns user, item[, timestamp]")
    p.add_argument("--checkpoint", help="the student to start from (default: the run's latest version)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the warm-started training")
    p.add_argument("--rollout", action="store_true", help="redeploy the running Serve application")
    args = p.parse_args(argv)
    options = ["--run", args.run, "--interactions", args.interactions, "--epochs", str(args.epochs),
               *(["--checkpoint", args.checkpoint] if args.checkpoint else []), *(["--rollout"] if args.rollout else [])]
    return run_kdray("update", args, options)


if __name__ == "__main__":
    sys.exit(main())
