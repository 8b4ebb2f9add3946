"""Fold-in at request time: how good (ml-100k) and how fast (the in-process predictor).

    python benchmarks/foldin_latency.py --data DATA/ml-100k  # ~1 min on 2 cores
    python benchmarks/foldin_latency.py --smoke-test         # built-in synthetic data, a few seconds

Quality: an MF-16 student is trained with kdray's own epoch function (full softmax, Adam, the ml-100k config's lr and
weight decay, no Ray: the model, not the cluster, is measured), then every test user is treated as new and folded
in from their training items alone. NDCG@10 on the test split (training and validation items masked) compares:
the trained user vectors (the ceiling), kdray's softmax fold-in (:mod:`kdray.serve.foldin`) at several L2 strengths,
and implicit-ALS least-squares fold-in (Hu, Koren & Volinsky 2008) at its best (alpha, lambda) of a small grid.

Latency: ``Recommender.recommend_queries`` for one query at a time, in-process (what a Serve replica runs per batch):
a known user without history, a new user with a history of 10 / 50 / 200 items, and a known user with 10 recent
items; then the same on an untrained MF-16 over a Gowalla-sized catalog (``--large-items``, 40,981 items by default;
fold-in's cost depends on the catalog and the dimension, not on the weights' values). Results to ``--out`` as JSON,
a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.checkpoint import Vocab, save_checkpoint  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.distill import without_distillation  # noqa: E402
from kdray.data.prepare import TRAIN_BY_USER, PreparedData, prepare  # noqa: E402
from kdray.metrics import full_ranking_evaluate  # noqa: E402
from kdray.models import build_model, model_from_config  # noqa: E402
from kdray.serve.foldin import ItemSide, fold_in, item_side  # noqa: E402
from kdray.serve.predictor import Query, Recommender  # noqa: E402
from kdray.sparse import Csr  # noqa: E402
from kdray.train.loop import run_epoch  # noqa: E402
from kdray.train.objective import Objective, batch_loss  # noqa: E402
from kdray.train.shard import LocalShard  # noqa: E402

L2_GRID = (0.3, 1.0, 3.0, 10.0)
ALS_GRID = [(alpha, lam) for alpha in (1.0, 10.0, 40.0) for lam in (0.1, 1.0, 10.0)]


def train_student(cfg, data: PreparedData, epochs: int) -> torch.nn.Module:
    """The student of ``cfg`` trained alone for ``epochs`` with kdray's epoch function, in this process."""
    t = cfg.student_train
    torch.manual_seed(t.seed)
    model = model_from_config(cfg.student, data)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    shard = LocalShard.from_tables([pq.read_table(data.path / TRAIN_BY_USER)])
    obj = Objective.from_config(without_distillation(cfg), "student", data.n_items)
    n_steps = -(-len(shard) // t.batch_size)
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(epoch)
        run_epoch(model, opt, shard.batches(t.batch_size, n_steps, np.random.default_rng(epoch)),
                  lambda m, b: batch_loss(m, [], b, obj, None, gen))
    return model.eval()


def als_fold_in(side: ItemSide, history: np.ndarray, alpha: float, lam: float) -> torch.Tensor:
    """Implicit-ALS fold-in: p = (Q^T Q + alpha Q_H^T Q_H + lam I)^{-1} (1 + alpha) Q_H^T 1 (Hu et al. 2008, eq. 4)."""
    q, q_h = side.vectors, side.vectors[torch.as_tensor(history)]
    a = q.T @ q + alpha * q_h.T @ q_h + lam * torch.eye(side.dim, dtype=q.dtype)
    return torch.linalg.solve(a, (1.0 + alpha) * q_h.sum(0))


def ndcg_of(side: ItemSide, vectors: torch.Tensor, data: PreparedData) -> float:
    res = full_ranking_evaluate(lambda u: side.scores(vectors[u]), data.test, [data.train, data.valid], [10],
                                batch_size=512)
    return float(res["ndcg@10"])


def quality(side: ItemSide, model: torch.nn.Module, data: PreparedData, l2_grid, als_grid) -> dict[str, Any]:
    users = range(data.n_users)
    histories = [data.train.row(u) for u in users]
    out: dict[str, Any] = {"trained vectors": ndcg_of(side, model.user_emb.weight.detach().double(), data)}
    for l2 in l2_grid:
        t0 = time.perf_counter()
        p = torch.stack([fold_in(side, torch.as_tensor(h), l2=l2) for h in histories])
        out[f"softmax fold-in, l2={l2:g}"] = ndcg_of(side, p, data)
        out[f"softmax fold-in, l2={l2:g} ms/user"] = 1000 * (time.perf_counter() - t0) / data.n_users
    als = {f"ALS fold-in, alpha={a:g}, lambda={lam:g}":
           ndcg_of(side, torch.stack([als_fold_in(side, h, a, lam) for h in histories]), data) for a, lam in als_grid}
    best = max(als, key=als.get)
    out["ALS fold-in, best of grid"] = {"setting": best, "ndcg@10": als[best]}
    out["ALS grid"] = als
    return out


def large_catalog(n_items: int, dim: int, directory: Path) -> tuple[Recommender, np.ndarray, np.ndarray]:
    """An untrained MF over ``n_items`` items (and as many users, one seen item each), for latency only."""
    torch.manual_seed(0)
    users, items = np.array([f"u{n}" for n in range(n_items)]), np.array([f"i{n}" for n in range(n_items)])
    seen = Csr.from_pairs(np.arange(n_items), np.arange(n_items), n_items, n_items)
    model = build_model("mf", n_users=n_items, n_items=n_items, dim=dim)
    ckpt = save_checkpoint(directory, model, role="student", config={"name": "large"},
                           vocab=Vocab(user_ids=users, item_ids=items, seen=seen))
    return Recommender.from_checkpoint(ckpt, max_history=200), users, items


def latency(rec: Recommender, user_ids: np.ndarray, items: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    cases = {"known user, no history": lambda: Query(user_ids[rng.integers(user_ids.size)], 10)}
    for n in (10, 50, 200):
        cases[f"new user, history of {n}"] = (
            lambda n=n: Query("new-user", 10, history=rng.choice(items, min(n, items.size), replace=False).tolist()))
    cases["known user, 10 recent items"] = lambda: Query(user_ids[rng.integers(user_ids.size)], 10,
                                                         history=rng.choice(items, 10, replace=False).tolist())
    out = {}
    for name, make in cases.items():
        rec.recommend_queries([make()])  # warm-up
        times = []
        for _ in range(repeats):
            query = make()
            t0 = time.perf_counter()
            rec.recommend_queries([query])
            times.append(1000 * (time.perf_counter() - t0))
        times.sort()
        out[name] = {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="the unpacked ml-100k folder (not needed with --smoke-test)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--large-items", type=int, default=40_981, help="the large catalog's size (0: skip it)")
    p.add_argument("--smoke-test", action="store_true", help="built-in synthetic data, 2 epochs, a small grid")
    p.add_argument("--out", type=Path, default=Path("foldin_latency.json"))
    args = p.parse_args(argv)
    if args.data is None and not args.smoke_test:
        p.error("--data DATA/ml-100k is required (the unpacked ml-100k folder), or use --smoke-test")
    torch.set_num_threads(1)  # one Serve replica's share (serve.num_cpus = 1)
    work = Path(tempfile.mkdtemp(prefix="kdray-foldin-"))
    if args.smoke_test:
        cfg = load_config(None, ["data.n_users=300", "data.n_items=200", "data.n_interactions=6000",
                                 "student.dim=8", f"runs_dir={work}"])
        args.epochs, args.repeats, args.large_items, l2_grid, als_grid = 2, 20, 2000, (1.0,), ALS_GRID[:1]
    else:
        cfg = load_config(REPO / "configs" / "ml-100k.yaml", [f"data.path={args.data}", "data.download=false",
                                                                f"runs_dir={work}"])
        l2_grid, als_grid = L2_GRID, ALS_GRID
    data = prepare(cfg.data, work / "data")
    t0 = time.perf_counter()
    model = train_student(cfg, data, args.epochs)
    train_s = time.perf_counter() - t0
    side = item_side(model)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread",
        "data": {"source": cfg.data.source, "users": data.n_users, "items": data.n_items},
        "student": f"{cfg.student.name}-{cfg.student.dim}, {args.epochs} epochs ({train_s:.0f} s)",
        "quality_ndcg@10": quality(side, model, data, l2_grid, als_grid),
    }
    ckpt = save_checkpoint(work / "student", model, role="student", config={"name": "foldin-bench"},
                           vocab=Vocab(user_ids=data.user_ids, item_ids=data.item_ids, seen=data.train))
    rec = Recommender.from_checkpoint(ckpt, max_history=cfg.serve.max_history)
    result["latency"] = {f"{data.n_items} items (trained)": latency(rec, data.user_ids, data.item_ids, args.repeats)}
    if args.large_items:
        large = large_catalog(args.large_items, cfg.student.dim, work / "large")
        result["latency"][f"{args.large_items} items (untrained)"] = latency(*large, args.repeats)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["quality_ndcg@10"], indent=2))
    print("\n| catalog | query (in-process, 1 thread) | p50 ms | p99 ms |\n|---|---|---|---|")
    for catalog, cases in result["latency"].items():
        for name, v in cases.items():
            print(f"| {catalog} | {name} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |")
    return result


if __name__ == "__main__":
    main()
