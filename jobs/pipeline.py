"""The whole kdray pipeline (``kdray run``: data, teacher, distilled student, the student alone, report) as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/pipeline.py --config configs/ml-100k.yaml data.path=/mnt/kdray/data/ml-100k

It connects to the cluster it runs on ($RAY_ADDRESS, set by ``ray job submit``) and writes the run directory under
$KDRAY_RUNS_DIR (jobs/runtime_env.yaml sets it to the shared filesystem of cluster.yaml). A bad config or a missing
data path ends the job at once with status FAILED and a one-line ``kdray: error: ...`` in its logs.
"""

from __future__ import annotations

import sys
from typing import Sequence

from _job import parser, run_kdray


def main(argv: Sequence[str] | None = None) -> int:
    args = parser("Run the whole kdray pipeline on the Ray cluster this job runs on.").parse_intermixed_args(argv)
    return run_kdray("run", args)


if __name__ == "__main__":
    sys.exit(main())
