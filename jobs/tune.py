"""A Ray Tune search over the student's distillation settings (``kdray tune``) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/tune.py --config configs/ml-100k.yaml data.path=/mnt/kdray/data/ml-100k tune.num_samples=16

Trials that ask for more than the cluster has (``ray.use_gpu=true``, ``ray.num_workers``) make the autoscaler add
worker nodes; they go away after cluster.yaml's idle timeout. Submit the same command with ``--resume`` to continue
an interrupted search from its state under the run directory (or ``tune.storage_path``).
"""

from __future__ import annotations

import sys
from typing import Sequence

from _job import parser, run_kdray


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("Run a kdray Tune search on the Ray cluster this job runs on.")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    args = p.parse_intermixed_args(argv)
    return run_kdray("tune", args, ["--resume"] if args.resume else [])


if __name__ == "__main__":
    sys.exit(main())
