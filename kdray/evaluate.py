"""Final evaluation of a trained model: full-catalog ranking on the test split, size and scoring latency.

The test split is used only here, once per model, for the report; model selection uses the validation split
(kdray.train). At test time both the training and the validation items of a user are masked, and a graph model
(LightGCN) propagates over both: what the mask treats as a user's known history is also what the model ranks from
(:meth:`kdray.models.RecModel.with_history`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kdray.checkpoint import Checkpoint, check_matches_data, load_checkpoint, update_metrics
from kdray.data.prepare import PreparedData
from kdray.errors import CheckpointError, ConfigError
from kdray.metrics import full_ranking_evaluate
from kdray.models import RecModel, count_parameters
from kdray.sparse import Csr


def evaluate_model(model: RecModel, data: PreparedData, split: str = "test", ks: Sequence[int] = (10, 20),
                   batch_size: int = 1024, device: str | torch.device = "cpu") -> dict[str, float]:
    """Full-ranking metrics on ``split`` ("valid" masks train items; "test" masks train and valid items). The masked
    pairs are the users' known history: a graph model ranks over their graph (``with_history``)."""
    if split == "test":
        truth, exclude = data.test, [data.train, data.valid]
    elif split == "valid":
        truth, exclude = data.valid, [data.train]
    else:
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
    model = model.with_history(Csr.union(*exclude)).to(device).eval()
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


def _ranking_checkpoint(path: str | Path, data: PreparedData) -> Checkpoint:
    ckpt = load_checkpoint(path)
    if ckpt.pointwise:
        raise CheckpointError(f"checkpoint {path} is a pointwise model; evaluate it with the config of its run "
                              "(task=pointwise, e.g. --config RUN/config.yaml)")
    check_matches_data(ckpt, data)  # the same catalog and ids, or a clear CheckpointError
    return ckpt


def _test_summary(model: torch.nn.Module, data: PreparedData, ks: Sequence[int], batch_size: int) -> dict[str, Any]:
    test = evaluate_model(model, data, "test", ks, batch_size)
    out: dict[str, Any] = {f"test_{k}": v for k, v in test.items() if "@" in k}
    out["test_n_users"] = test["n_users_evaluated"]
    out["n_params"] = count_parameters(model)
    out["latency_ms_per_1000_users"] = scoring_latency_ms(model)
    return out


def evaluate_checkpoint(path: str | Path, data: PreparedData, ks: Sequence[int] = (10, 20),
                        batch_size: int = 1024, write: bool = True) -> dict[str, Any]:
    """Test metrics, parameter count and latency of a checkpoint; merged into its metrics.json when ``write``."""
    out = _test_summary(_ranking_checkpoint(path, data).model, data, ks, batch_size)
    if write:
        update_metrics(path, out)
    return out


def evaluate_ensemble(paths: Sequence[str | Path], data: PreparedData, weights: Sequence[float] | None = None,
                      ks: Sequence[int] = (10, 20), batch_size: int = 1024) -> dict[str, Any]:
    """The same summary for several checkpoints ranked as one ensemble, the way a student distils them
    (:class:`kdray.distill.teacher.Ensemble`): what the distilled student is trained to reproduce. Parameters are
    the members' sum. With a validation split, also the ensemble's validation metrics (``valid_*``): each member's
    own are in its checkpoint, and what may pick one ensemble over another is the ensemble's. Nothing is written
    into the members' checkpoints."""
    from kdray.distill.teacher import Ensemble

    members = [_ranking_checkpoint(p, data).model for p in paths]
    if weights and len(weights) != len(members):
        raise ConfigError(f"distill.teacher_weights has {len(weights)} weights for {len(members)} checkpoints: give "
                          "one per checkpoint, or none for equal weights")
    ensemble = Ensemble(members, list(weights or []) or None)
    out = _test_summary(ensemble, data, ks, batch_size)
    if data.valid.nnz:
        valid = evaluate_model(ensemble, data, "valid", ks, batch_size)
        out.update({f"valid_{k}": v for k, v in valid.items() if "@" in k})
    return out


def _trained_model(path: str | Path, data: Any) -> dict[str, Any]:
    """What a checkpoint is and how it was trained: its model and training settings, its training pairs against the
    evaluation data's, its epochs."""
    ckpt = load_checkpoint(path)
    role = ckpt.meta.get("role", "")
    trained = {k: v for k, v in ckpt.metrics.items()
               if k in ("best_epoch", "epochs_run", "train_seconds") or k.startswith("valid_")}
    return {
        "role": role, "model": ckpt.config.get(role, {}), "train": ckpt.config.get(f"{role}_train", {}),
        "data": ckpt.config.get("data", {}),
        # a refit (no validation split) trains on train + valid of the evaluation's split; the pointwise task's
        # data (kdray.data.pointwise_data) counts rows per split instead
        **({"pairs": {"trained_on": int(ckpt.vocab.seen.nnz), "train": int(data.train.nnz),
                      "valid": int(data.valid.nnz), "test": int(data.test.nnz)}} if isinstance(data, PreparedData)
           else {"rows": dict(data.counts)}),
        "trained": trained,
        # a graph model ranks the test split over every pair it masks (evaluate_model); older records lack the field
        # and were ranked over the model's own training graph
        **({"test_graph_pairs": Csr.union(data.train, data.valid).nnz}
           if isinstance(data, PreparedData) and type(ckpt.model).with_history is not RecModel.with_history else {}),
    }


def evaluation_record(path: str | Path, data: Any, metrics: dict[str, Any], command: str) -> dict[str, Any]:
    """What ``kdray eval --output`` writes: the test metrics of a checkpoint with what it is and how it was trained
    (its model and training settings, its training pairs against the evaluation data's, its epochs), so that a table
    of models can be generated from files instead of copied from the console."""
    return {"checkpoint": str(path), "command": command, **_trained_model(path, data),
            "n_params": metrics["n_params"], "test": {k: v for k, v in metrics.items() if k.startswith("test_")}}


def ensemble_record(paths: Sequence[str | Path], data: Any, metrics: dict[str, Any], command: str,
                    weights: Sequence[float] | None) -> dict[str, Any]:
    """``kdray eval --output`` for several checkpoints ranked as one ensemble: each member as
    :func:`evaluation_record` describes it (without test metrics of its own), the weights, the ensemble's metrics
    (test, and validation where the data has a validation split)."""
    return {"checkpoints": [str(p) for p in paths], "command": command, "role": "ensemble",
            "weights": list(weights) if weights else None,
            "members": [{"checkpoint": str(p), **_trained_model(p, data)} for p in paths],
            "n_params": metrics["n_params"], "test": {k: v for k, v in metrics.items() if k.startswith("test_")},
            **({"valid": valid} if (valid := {k: v for k, v in metrics.items() if k.startswith("valid_")}) else {})}
