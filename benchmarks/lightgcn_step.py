"""One LightGCN training step with the graph in CSR layout and a symmetric backward (kdray now) against torch's COO
sparse product and its own backward (kdray before 2026-12-02), side by side in one process.

    python benchmarks/lightgcn_step.py --config configs/gowalla.yaml --out benchmarks/results/lightgcn-step.json \\
        data.path=DATA/gowalla teacher.name=lightgcn teacher.dim=64 teacher_train.batch_size=1024
    python benchmarks/lightgcn_step.py --smoke-test   # tiny generated data, seconds

The config's teacher (a LightGCN) and its training batches, the shared objective (``kdray.train.objective``) and
Adam. Each timed run is ``--steps`` training steps (loss, backward, optimiser step) one way; the two ways alternate
(``benchmarks/alternating.py``) so that the machine's load falls on both alike. Before timing, both ways compute the
loss and gradients of one batch from the same weights, which must agree. Results to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kdray

from benchmarks.alternating import alternate  # noqa: E402
from benchmarks.plain_training import plain_setup  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402
from kdray.models import LightGCN  # noqa: E402
from kdray.models.lightgcn import normalized_adjacency  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.train.objective import Objective, batch_loss  # noqa: E402

SMOKE = ["data.n_users=150", "data.n_items=90", "data.n_interactions=3000", "teacher.name=lightgcn", "teacher.dim=8",
         "teacher.hidden=[]", "student.dim=4", "teacher_train.batch_size=32"]


def coo_propagate(model: LightGCN, coo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``LightGCN.propagate`` as it was: ``Â`` in COO layout (built once, as ``adjacency`` kept it) and torch's
    sparse product with its own backward."""
    e = torch.cat([model.user_emb.weight, model.item_emb.weight])
    total = e
    for _ in range(model.n_layers):
        e = torch.sparse.mm(coo, e)
        total = total + e
    final = total / (model.n_layers + 1)
    users, items = final[: model.n_users], final[model.n_users:]
    if model.cosine_temperature:
        users = torch.nn.functional.normalize(users, dim=-1) / model.cosine_temperature
        items = torch.nn.functional.normalize(items, dim=-1)
    return users, items


@contextmanager
def old_way(model: LightGCN) -> Iterator[LightGCN]:
    """The same model (same parameters, same optimiser), propagated the old way while the block runs."""
    coo = normalized_adjacency(model.graph_edges, model.n_users, model.n_items)  # outside the timed steps
    model.propagate = types.MethodType(lambda m: coo_propagate(m, coo), model)  # shadows the method
    try:
        yield model
    finally:
        del model.propagate


def loss_and_gradients(model: LightGCN, batch, obj: Objective) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss, _ = batch_loss(model, [], batch, obj)
    loss.backward()
    grads = [p.grad.clone() for p in (model.user_emb.weight, model.item_emb.weight)]
    model.zero_grad()
    return float(loss.detach()), grads


def check_agreement(model: LightGCN, batch, obj: Objective) -> dict[str, float]:
    """Loss and gradients of one batch from the same weights, both ways: the largest differences."""
    a, ga = loss_and_gradients(model, batch, obj)
    with old_way(model):
        b, gb = loss_and_gradients(model, batch, obj)
    return {"loss_csr": a, "loss_coo": b,
            "max_grad_difference": max(float((x - y).abs().max()) for x, y in zip(ga, gb)),
            "max_grad": max(float(x.abs().max()) for x in ga)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per way (after one warm-up of each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke-test", action="store_true", help="tiny generated data, one repeat")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    overrides = [*SMOKE, *a.overrides] if a.smoke_test else a.overrides
    repeats = 1 if a.smoke_test else a.repeats
    with tempfile.TemporaryDirectory(prefix="kdray-lgcn-step-") as runs:
        try:
            cfg = load_config(a.config, [f"runs_dir={runs}", "name=step", *overrides])
            data = prepare_data(cfg)
            if cfg.teacher.name != "lightgcn":
                raise KdrayError(f"teacher.name is {cfg.teacher.name!r}; this benchmark times a LightGCN teacher "
                                 "(teacher.name=lightgcn)")
        except KdrayError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        model, opt, shard, obj = plain_setup(cfg, data, "teacher")
        bs = cfg.teacher_train.batch_size
        batches = list(shard.batches(bs, -(-len(shard) // bs), np.random.default_rng(0)))
        agreement = check_agreement(model, batches[0], obj)
        position = [0]

        def steps() -> float:
            start = time.perf_counter()
            for _ in range(a.steps):
                batch = batches[position[0] % len(batches)]
                position[0] += 1
                opt.zero_grad()
                loss, _ = batch_loss(model, [], batch, obj)
                loss.backward()
                opt.step()
            return (time.perf_counter() - start) / a.steps

        def coo_steps() -> float:
            with old_way(model):
                return steps()

        times = alternate({"csr": steps, "coo": coo_steps}, repeats=repeats, warmup=1)
    argv_shown = list(argv if argv is not None else sys.argv[1:])
    result = {
        "command": shlex.join(["python", "benchmarks/lightgcn_step.py", *argv_shown]),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"{a.threads} torch threads",
        "graph": {"users": data.n_users, "items": data.n_items, "edges": int(model.graph_edges.shape[1]),
                  "dim": cfg.teacher.dim, "layers": model.n_layers, "batch_users": bs},
        "agreement": agreement, "seconds_per_step": times,
        "median_seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
    }
    med = result["median_seconds_per_step"]
    result["coo_over_csr"] = med["coo"] / med["csr"]
    print(f"median seconds per step: csr {med['csr']:.3f}, coo {med['coo']:.3f} ({result['coo_over_csr']:.2f}x); "
          f"loss {agreement['loss_csr']:.6f} vs {agreement['loss_coo']:.6f}, largest gradient difference "
          f"{agreement['max_grad_difference']:.2e} (largest gradient {agreement['max_grad']:.2e})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
