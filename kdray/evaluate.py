"""Final evaluation of a trained model: full-catalog ranking on the test split, size and scoring latency.

The test split is used only here, once per model, for the report; model selection uses the validation split
(kdray.train). At test time both the training and the validation items of a user are masked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kdray.checkpoint import check_matches_data, load_checkpoint, update_metrics
from kdray.data.prepare import PreparedData
from kdray.errors import CheckpointError
from kdray.metrics import full_ranking_evaluate
from kdray.models import RecModel, count_parameters


def evaluate_model(model: RecModel, data: PreparedData, split: str = "test", ks: Sequence[int] = (10, 20),
                   batch_size: int = 1024, device: str | torch.device = "cpu") -> dict[str, float]:
    """Full-ranking metrics on ``split`` ("valid" masks train items; "test" masks train and valid items)."""
    if split == "test":
        truth, exclude = data.test, [data.train, data.valid]
    elif split == "valid":
        truth, exclude = data.valid, [data.train]
    else:
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
    model = model.to(device).eval()
    with torch.inference_mode():
        return full_ranking_evaluate(model.score_all, truth, exclude, ks, batch_size=batch_size, device=device)


def scoring_latency_ms(model: RecModel, n_users: int = 1000, batch_size: int = 1000, k: int = 10,
                       repeats: int = 3, seed: int = 0) -> float:
    """Milliseconds to produce the top-``k`` of the whole catalog for ``n_users`` users (best of ``repeats``),
    in batches of ``batch_size``: what serving a recommendation costs, without the HTTP layer."""
    model.eval()
    users = torch.as_tensor(np.random.default_rng(seed).integers(0, model.n_users, n_users), dtype=torch.int64)
    best = float("inf")
    with torch.inference_mode():
        model.score_all(users[: min(8, n_users)])  # warm-up (allocations, lazy init)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for start in range(0, n_users, batch_size):
                model.score_all(users[start : start + batch_size]).topk(k, dim=1)
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0 * 1000.0 / n_users


def evaluate_checkpoint(path: str | Path, data: PreparedData, ks: Sequence[int] = (10, 20),
                        batch_size: int = 1024, write: bool = True) -> dict[str, Any]:
    """Test metrics, parameter count and latency of a checkpoint; merged into its metrics.json when ``write``."""
    ckpt = load_checkpoint(path)
    if ckpt.pointwise:
        raise CheckpointError(f"checkpoint {path} is a pointwise model; evaluate it with the config of its run "
                              "(task=pointwise, e.g. --config RUN/config.yaml)")
    check_matches_data(ckpt, data)  # the same catalog and ids, or a clear CheckpointError
    test = evaluate_model(ckpt.model, data, "test", ks, batch_size)
    out = {f"test_{k}": v for k, v in test.items() if "@" in k}
    out["test_n_users"] = test["n_users_evaluated"]
    out["n_params"] = count_parameters(ckpt.model)
    out["latency_ms_per_1000_users"] = scoring_latency_ms(ckpt.model)
    if write:
        update_metrics(path, out)
    return out


def evaluation_record(path: str | Path, data: Any, metrics: dict[str, Any], command: str) -> dict[str, Any]:
    """What ``kdray eval --output`` writes: the test metrics of a checkpoint with what it is and how it was trained
    (its model and training settings, its training pairs against the evaluation data's, its epochs), so that a table
    of models can be generated from files instead of copied from the console."""
    ckpt = load_checkpoint(path)
    role = ckpt.meta.get("role", "")
    trained = {k: v for k, v in ckpt.metrics.items()
               if k in ("best_epoch", "epochs_run", "train_seconds") or k.startswith("valid_")}
    return {
        "checkpoint": str(path), "command": command, "role": role,
        "model": ckpt.config.get(role, {}), "train": ckpt.config.get(f"{role}_train", {}),
        "data": ckpt.config.get("data", {}),
        # a refit (no validation split) trains on train + valid of the evaluation's split; the pointwise task's
        # data (kdray.data.pointwise_data) counts rows per split instead
        **({"pairs": {"trained_on": int(ckpt.vocab.seen.nnz), "train": int(data.train.nnz),
                      "valid": int(data.valid.nnz), "test": int(data.test.nnz)}} if isinstance(data, PreparedData)
           else {"rows": dict(data.counts)}),
        "trained": trained, "n_params": metrics["n_params"],
        "test": {k: v for k, v in metrics.items() if k.startswith("test_")},
    }
