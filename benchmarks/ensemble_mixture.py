"""The ensemble of teachers as one ranking: the softmax mixture, one teacher at a time (kdray's way) against a
logsumexp over a stacked ``[M, B, C]`` block (the way it was computed before 2026-12-02).

    python benchmarks/ensemble_mixture.py --out benchmarks/results/ensemble-mixture.json  # ~1 min on 2 cores
    python benchmarks/ensemble_mixture.py --smoke-test                                    # a few seconds

``kdray.distill.losses.ensemble_teacher_logits`` turns M teachers' logits into one block whose softmax is the
weighted mixture of theirs. It runs wherever a student distils an ensemble: every step of a live teacher, the cached
top-K (``kdray.distill.teacher.TeacherTopK``), and ``kdray eval`` of several checkpoints. This script times it both
ways on random logits over a Gowalla-sized catalog (40,981 items), for 2 and 3 teachers and a training batch (256
users) and an evaluation batch (1,000 users), alternating the two in one process so that the machine's load falls on
both alike, and checks that they agree. Results to ``--out`` as JSON; a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.alternating import alternate  # noqa: E402
from kdray.distill import losses  # noqa: E402


def stacked_mixture(teachers: list[torch.Tensor]) -> torch.Tensor:
    """The former computation (equal weights, T = 1): log sum_m w_m softmax(t_m) over a stacked block."""
    stacked = torch.stack(teachers)  # [M, B, C]
    log_w = torch.full((len(teachers), 1, 1), 1.0 / len(teachers)).log()
    return torch.logsumexp(log_w + torch.log_softmax(stacked, dim=-1), dim=0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40_981)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per way and setting (after 1 warm-up)")
    parser.add_argument("--smoke-test", action="store_true", help="a small catalog and few repeats")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.items, args.repeats = 2_000, 2
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": "python benchmarks/ensemble_mixture.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__},
        "items": args.items, "repeats": args.repeats, "settings": [],
    }
    gen = torch.Generator().manual_seed(0)
    for n_teachers in (2, 3):
        for users in (256, 1000):
            teachers = [torch.randn(users, args.items, generator=gen) * 3 for _ in range(n_teachers)]
            one_at_a_time = lambda: losses.ensemble_teacher_logits(teachers, None, kind="rd")  # noqa: E731
            stacked = lambda: stacked_mixture(teachers)  # noqa: E731
            gap = float((one_at_a_time() - stacked()).abs().max())
            if gap > 1e-4:
                raise SystemExit(f"{n_teachers} teachers, {users} users: the two ways differ by {gap}")
            times = alternate({"one_at_a_time": lambda: timed(one_at_a_time), "stacked": lambda: timed(stacked)},
                              args.repeats, warmup=1)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            result["settings"].append({"teachers": n_teachers, "users": users, "median_seconds": med,
                                       "seconds": times, "max_abs_difference": gap,
                                       "stacked_over_one_at_a_time": med["stacked"] / med["one_at_a_time"]})
            print(f"{n_teachers} teachers, {users:>4} users: {med['one_at_a_time'] * 1e3:6.0f} ms one at a time, "
                  f"{med['stacked'] * 1e3:6.0f} ms stacked ({med['stacked'] / med['one_at_a_time']:.2f}x), "
                  f"median of {args.repeats}; max difference {gap:.1e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
