"""Deploy an exported student behind an HTTP endpoint with Ray Serve (``kdray serve``) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/serve.py --checkpoint /mnt/kdray/runs/ml-100k/student serve.host=0.0.0.0

The checkpoint must be readable on every node (the shared filesystem). By default the job ends once the
application is deployed and the endpoint stays up, because Serve applications outlive the driver that deployed them;
``--blocking`` keeps the job running until it is stopped (``ray job stop``). ``serve.host=0.0.0.0`` makes the endpoint
reachable from outside the node (the default, 127.0.0.1, serves only the node itself). The ingress is
``serve.ingress`` (HAProxy by default) when this job starts Serve; a Serve instance already running keeps its own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from _job import parser, run_kdray


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("Serve a kdray checkpoint on the Ray cluster this job runs on.")
    p.add_argument("--checkpoint", required=True, help="exported checkpoint directory, readable on every node")
    p.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the job running while the application serves (default: return once deployed)")
    args = p.parse_intermixed_args(argv)
    return run_kdray("serve", args, ["--checkpoint", args.checkpoint,
                                     "--blocking" if args.blocking else "--no-blocking"])


if __name__ == "__main__":
    sys.exit(main())
