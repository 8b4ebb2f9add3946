"""One distilled training step from a cached teacher top-K: the top-K as columns (kdray's path) against the dense
teacher block it replaced.

    python benchmarks/cached_topk_step.py --out benchmarks/results/cached-topk-step.json  # ~1 min on 2 cores
    python benchmarks/cached_topk_step.py --smoke-test                                    # a few seconds

``distill.cached_topk`` keeps each user's teacher top-K unobserved items. The losses that read only the teacher's
order (rd, rrd) used to get them as a dense ``[B, n_items]`` block (the cached logits at their items, a fill value
elsewhere), then masked it and took its top-K again; kdray now hands the loss the K columns
(``kdray.distill.losses.top_k_distill_loss``). This script times a whole step, forward and backward, of an MF student
on one batch of users over a Gowalla-sized catalog (40,981 items by default), both ways, alternating the two in one
process so that the machine's load falls on both alike, and checks that they give the same loss. The dense path is
rebuilt here from its old code for the comparison. Results to ``--out`` as JSON; a summary on stdout.
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.alternating import alternate  # noqa: E402
from kdray.distill import losses  # noqa: E402
from kdray.models import build_model  # noqa: E402
from kdray.train.objective import Batch, Objective, batch_from_lists, batch_loss, hard_loss  # noqa: E402

DENSE_FILL = -1e4  # the old path's teacher logit for items outside the cached top-K


def dense_step_loss(model: torch.nn.Module, batch: Batch, obj: Objective, cached_logits: torch.Tensor) -> torch.Tensor:
    """The loss as the dense path computed it (full catalog): a [B, N] teacher block, masked and top-K'd again."""
    logits = model(batch.users)
    targets = torch.zeros(batch.users.shape[0], obj.n_items)
    targets[batch.pos_rows, batch.pos_items] = 1.0
    hard = hard_loss(logits, targets, obj, None, None, None)
    dense = torch.full((batch.users.shape[0], obj.n_items), DENSE_FILL).scatter_(1, batch.teacher_items, cached_logits)
    distill = losses.distill_loss(obj.distill, logits, [dense], None, temperature=obj.temperature, k=obj.topk,
                                  mask=targets > 0)
    return losses.total_loss(hard, distill, obj.alpha)


def make_batch(n_users: int, n_items: int, batch_size: int, per_user: int, k: int, seed: int
               ) -> tuple[Batch, torch.Tensor]:
    """A batch of users with ``per_user`` random training items each, and a cached top-K of other items with
    decreasing logits (the teacher's order)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(n_users, batch_size, replace=False)
    picks = np.stack([rng.choice(n_items, per_user + k, replace=False) for _ in users])
    positives, cached = picks[:, :per_user], picks[:, per_user:]
    offsets = np.arange(0, batch_size * per_user + 1, per_user)
    batch = batch_from_lists(users, offsets, positives.reshape(-1), cached)
    logits = torch.sort(torch.randn(batch_size, k, generator=torch.Generator().manual_seed(seed)), descending=True,
                        dim=1).values
    return batch, logits


def timed_step(step, model: torch.nn.Module) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    step().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40_981)
    parser.add_argument("--users", type=int, default=29_858)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--per-user", type=int, default=25, help="training items per user (Gowalla: 27 on average)")
    parser.add_argument("--dim", type=int, default=12)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per path (after 2 warm-up steps each)")
    parser.add_argument("--smoke-test", action="store_true", help="a small catalog and few repeats")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.items, args.users, args.batch_size, args.repeats = 3_000, 2_000, 64, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("mf", n_users=args.users, n_items=args.items, dim=args.dim)
    batch, cached_logits = make_batch(args.users, args.items, args.batch_size, args.per_user, args.topk, seed=0)
    result: dict[str, Any] = {
        "command": "python benchmarks/cached_topk_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__},
        "setup": {"items": args.items, "batch_size": args.batch_size, "per_user": args.per_user, "dim": args.dim,
                  "topk": args.topk, "repeats": args.repeats, "hard_loss": "softmax", "alpha": 0.5},
        "losses": {},
    }
    for kind in losses.TOP_K_ORDER_LOSSES:
        obj = Objective(n_items=args.items, hard_loss="softmax", n_negatives=1, alpha=0.5, distill=kind,
                        topk=args.topk)
        columns = lambda: batch_loss(model, [], batch, obj)[0]  # noqa: E731
        dense = lambda: dense_step_loss(model, batch, obj, cached_logits)  # noqa: E731
        with torch.no_grad():
            same = abs(float(columns()) - float(dense())) <= 1e-5 * abs(float(dense()))
        if not same:
            raise SystemExit(f"{kind}: the two paths disagree ({float(columns())} vs {float(dense())})")
        times = alternate({"columns": lambda: timed_step(columns, model), "dense": lambda: timed_step(dense, model)},
                          args.repeats, warmup=2)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        result["losses"][kind] = {"median_seconds": med, "seconds": times, "same_loss": same,
                                  "dense_over_columns": med["dense"] / med["columns"]}
        print(f"{kind}: step {med['columns'] * 1e3:.0f} ms with the top-K columns, {med['dense'] * 1e3:.0f} ms with "
              f"the dense block ({med['dense'] / med['columns']:.2f}x), median of {args.repeats}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
