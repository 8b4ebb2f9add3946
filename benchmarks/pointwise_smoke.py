"""Plain-PyTorch smoke check of the pointwise task on MovieLens-100K (no Ray): trains the DCN-v2 teacher (single-task,
and multi-task with MMoE), the baselines (logistic regression = FM with its factors fixed at 0, FM, biased MF, a
narrow MLP) and an FM student distilled from the multi-task teacher, and prints their test metrics. The check: the
teacher's AUC beats logistic regression's and FM's.

Each model trains ``--epochs`` epochs with Adam; the epoch with the best validation AUC is kept (early stopping) and
its validation-best F1 threshold is applied on test.

    python benchmarks/pointwise_smoke.py --data /path/to/ml-100k [--epochs 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import numpy as np
import torch

from kdray.data.features import PointwiseTable, build_table, ml100k_rows, split_rows, to_batch
from kdray.distill.pointwise_losses import pointwise_objective
from kdray.metrics import auc, best_threshold, pointwise_report
from kdray.models.pointwise import PointwiseModel, build_pointwise_model


def predict(model: PointwiseModel, columns: dict[str, np.ndarray], batch_size: int = 8192) -> dict[str, torch.Tensor]:
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, columns["user"].shape[0], batch_size):
            out = model(to_batch({k: v[start : start + batch_size] for k, v in columns.items()}))
            for head, value in out.items():
                parts.setdefault(head, []).append(value)
    return {head: torch.cat(values) for head, values in parts.items()}


def train(model: PointwiseModel, table: PointwiseTable, *, epochs: int, lr: float, weight_decay: float,
          batch_size: int, seed: int, teacher: PointwiseModel | None = None, alpha: float = 0.0,
          temperature: float = 1.0, freeze: Callable[[PointwiseModel], None] | None = None,
          ) -> tuple[PointwiseModel, float, float]:
    """Trains on the training split; returns the model of the best validation epoch (by AUC, or by -RMSE for a
    rating-only model), that score and the training time in seconds."""
    g = torch.Generator().manual_seed(seed)
    cols, valid = table.columns("train"), table.columns("valid")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    teacher_out = predict(teacher, cols) if teacher is not None else None  # the teacher is fixed: one pass
    best, best_score, seconds = copy.deepcopy(model), -np.inf, 0.0
    n = cols["user"].shape[0]
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=g).numpy()
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            batch = to_batch({k: v[idx] for k, v in cols.items()})
            t = {h: v[idx] for h, v in teacher_out.items()} if teacher_out is not None else None
            loss, _ = pointwise_objective(model(batch), batch, t, alpha=alpha, temperature=temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if freeze is not None:
                freeze(model)
        seconds += time.perf_counter() - start
        out = predict(model, valid)
        score = auc(out["like"], torch.as_tensor(valid["like"])) if "like" in out else \
            -float((out["rating"] - torch.as_tensor(valid["rating"])).square().mean().sqrt())
        if score > best_score:
            best, best_score = copy.deepcopy(model), score
    return best, best_score, seconds


def report(name: str, model: PointwiseModel, table: PointwiseTable, seconds: float) -> dict[str, float]:
    valid, test = table.columns("valid"), table.columns("test")
    v, t = predict(model, valid), predict(model, test)
    threshold = best_threshold(torch.sigmoid(v["like"]), torch.as_tensor(valid["like"])) if "like" in v else None
    row = pointwise_report(t.get("like"), torch.as_tensor(test["like"]), t.get("rating"),
                           torch.as_tensor(test["rating"]), threshold)
    row.update(params=sum(p.numel() for p in model.parameters()), train_s=seconds)
    keys = ("auc", "logloss", "accuracy@0.5", "f1@0.5", "f1@best", "threshold", "rmse", "mae", "params", "train_s")
    print(f"{name:<24}" + "  ".join(f"{k}={row[k]:.4f}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                    for k in keys if k in row), flush=True)
    return row


def zero_factors(model: PointwiseModel) -> None:
    """Logistic regression: an FM whose pairwise factors stay 0."""
    with torch.no_grad():
        model.fields.table.weight.zero_()
        model.num_factors.zero_()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the unpacked ml-100k folder (u.data, u.user, u.item)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    rows, categorical, numeric = ml100k_rows(args.data)
    table = build_table(rows, split_rows(rows["user"].to_numpy(), seed=args.seed), categorical, numeric)
    shape = table.model_shape()
    print(f"ml-100k: {len(rows)} ratings, {shape}, like rate {table.like.mean():.3f}, "
          f"rows per split {np.bincount(table.split).tolist()}", flush=True)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    both = dict(heads=["like", "rating"], rating_init=table.rating_mean())
    results = {}

    def run(name: str, model_name: str, options: dict, lr: float, wd: float, **kw) -> PointwiseModel:
        torch.manual_seed(args.seed)
        model = build_pointwise_model(model_name, **shape, **options)
        if kw.get("freeze"):
            kw["freeze"](model)
            model.fields.table.weight.requires_grad_(False)
            model.num_factors.requires_grad_(False)
        model, _, seconds = train(model, table, lr=lr, weight_decay=wd, **common, **kw)
        results[name] = report(name, model, table, seconds)
        return model

    run("lr (fm, factors 0)", "fm", {}, 1e-2, 1e-6, freeze=zero_factors)
    run("fm", "fm", {"dim": 8}, 1e-3, 1e-5)
    run("mf (biased)", "mf", {"dim": 16}, 1e-3, 1e-5)
    run("mlp [32]", "mlp", {"dim": 8, "hidden": [32]}, 1e-3, 1e-5)
    run("dcnv2 (like)", "dcnv2", {"dropout": 0.2}, 1e-3, 1e-5)
    teacher = run("dcnv2+mmoe (like+rating)", "dcnv2", {"multitask": "mmoe", "dropout": 0.2, **both}, 1e-3, 1e-5)
    run("fm (like+rating) alone", "fm", {"dim": 8, **both}, 1e-3, 1e-5)
    run("fm (like+rating) KD", "fm", {"dim": 8, **both}, 1e-3, 1e-5, teacher=teacher, alpha=0.5, temperature=2.0)
    best_baseline = max(results["lr (fm, factors 0)"]["auc"], results["fm"]["auc"])
    teacher_auc = max(results["dcnv2 (like)"]["auc"], results["dcnv2+mmoe (like+rating)"]["auc"])
    verdict = "PASS" if teacher_auc > best_baseline else "FAIL"
    print(f"{verdict}: teacher AUC {teacher_auc:.4f} vs best of LR/FM {best_baseline:.4f}")


if __name__ == "__main__":
    main()
