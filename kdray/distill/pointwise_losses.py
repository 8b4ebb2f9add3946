"""Pointwise training objectives as pure functions of tensors: the hard losses of the two heads, their distillation
losses, the alpha blend and the multi-task combination.

Heads (see kdray.models.pointwise): ``like`` is a logit of ``P(rating >= threshold)``, ``rating`` a real-valued
prediction of the rating. Every function takes ``[B]`` tensors and returns a scalar; an empty batch gives 0 with a
gradient of 0. Teacher outputs are treated as constants (``detach``); compute them under ``torch.no_grad``.

``pointwise_objective`` is the one call a training loop needs per batch: student outputs, the batch (labels) and
optionally the teacher's outputs in, the loss and its parts out.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.distill.losses import bce, total_loss

__all__ = [
    "hard_loss",
    "multitask_loss",
    "pointwise_objective",
    "rating_distill_mse",
    "rating_mse",
    "soft_label_bce",
]


def _check_same(a: Tensor, b: Tensor, names: str) -> None:
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"{names} must both be [B] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def rating_mse(pred: Tensor, rating: Tensor) -> Tensor:
    """Hard loss of the rating head: ``L = mean_b (r_hat_b - r_b)^2``.

    Shape:
        pred: [B]; rating: [B]; output: scalar.
    """
    _check_same(pred, rating, "pred and rating")
    if pred.numel() == 0:
        return pred.sum()
    return F.mse_loss(pred, rating.to(pred.dtype))


def soft_label_bce(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton soft labels for a binary head (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015), the two-class softmax at temperature T written with sigmoids:

    ``L = T^2 * mean_b -[p_b log q_b + (1 - p_b) log(1 - q_b)]``, ``p_b = sigmoid(t_b / T)``, ``q_b = sigmoid(s_b / T)``

    The ``T^2`` keeps the gradient's scale independent of ``T`` (dL/ds = T (q - p) ~ (s - t) / T for large T), so
    ``alpha`` means the same at every temperature. Its minimum, at ``s = t``, is ``T^2`` times the targets' entropy,
    not 0.

    Shape:
        student_logits: [B]; teacher_logits: [B]; output: scalar.
    """
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_same(student_logits, teacher_logits, "student_logits and teacher_logits")
    if student_logits.numel() == 0:
        return student_logits.sum()
    p = torch.sigmoid(teacher_logits.detach().to(student_logits.dtype) / temperature)
    return temperature**2 * F.binary_cross_entropy_with_logits(student_logits / temperature, p)


def rating_distill_mse(student_pred: Tensor, teacher_pred: Tensor) -> Tensor:
    """Regression distillation: the student matches the teacher's predicted rating (the regression counterpart of
    logit matching, Ba & Caruana, NeurIPS 2014): ``L = mean_b (s_b - t_b)^2``.

    Shape:
        student_pred: [B]; teacher_pred: [B]; output: scalar.
    """
    _check_same(student_pred, teacher_pred, "student_pred and teacher_pred")
    if student_pred.numel() == 0:
        return student_pred.sum()
    return F.mse_loss(student_pred, teacher_pred.detach().to(student_pred.dtype))


def hard_loss(head: str, output: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """The supervised loss of one head against its label in ``batch``: ``bce(output, batch["like"])`` for ``like``,
    ``rating_mse(output, batch["rating"])`` for ``rating``.

    Shape:
        output: [B]; batch[head]: [B]; output: scalar.
    """
    if head not in ("like", "rating"):
        raise ValueError(f"head must be 'like' or 'rating', got {head!r}")
    if head not in batch:
        raise ValueError(f"the batch has no {head!r} labels; it has {sorted(batch)}")
    label = batch[head]
    if head == "like":
        _check_same(output, label, "like logits and labels")
        return bce(output, label)
    return rating_mse(output, label)


def multitask_loss(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``L = sum_k w_k L_k`` over the tasks in ``losses``; each needs a weight ``w_k >= 0`` (weights of tasks not in
    ``losses`` are ignored, so one weights mapping serves single- and multi-task models). A task of weight 0 is left
    out rather than multiplied by 0, so a non-finite value in it cannot leak into the sum.

    Shape:
        losses: {task: scalar}; output: scalar.
    """
    if not losses:
        raise ValueError("losses is empty: need at least one task")
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise ValueError(f"no task weight for {missing[0]!r}; weights has {sorted(weights)}")
    bad = {k: w for k, w in weights.items() if k in losses and not w >= 0}
    if bad:
        raise ValueError(f"task weights must be >= 0, got {bad}")
    kept = [float(weights[k]) * loss for k, loss in losses.items() if weights[k] > 0]
    if not kept:
        return sum(loss for loss in losses.values()) * 0.0  # every task switched off: 0, still attached to the graph
    return torch.stack(kept).sum()


def pointwise_objective(student: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                        teacher: Mapping[str, Tensor] | None = None, *, alpha: float = 0.0,
                        temperature: float = 1.0, task_weights: Mapping[str, float] | None = None,
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-batch loss of a pointwise model, alone (``teacher`` None or ``alpha`` 0) or distilled:

    ``L_k = (1 - alpha) * hard_k + alpha * distill_k`` for each head k of the student, with
    ``distill_like = soft_label_bce(s, t, T)`` and ``distill_rating = rating_distill_mse(s, t)``;
    ``L = sum_k w_k L_k`` (``task_weights``; None = weight 1 for every head).

    Returns the loss and its parts, detached, for logging: ``{"like/hard", "like/distill", "rating/hard", ...}``.

    Shape:
        student, teacher: {head: [B]}; batch: {"like": [B], "rating": [B], ...}; output: scalar.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    distil = teacher is not None and alpha > 0
    per_task: dict[str, Tensor] = {}
    parts: dict[str, Tensor] = {}
    for head, output in student.items():
        hard = hard_loss(head, output, batch)
        parts[f"{head}/hard"] = hard.detach()
        if not distil:
            per_task[head] = hard
            continue
        if head not in teacher:
            raise ValueError(f"the teacher has no {head!r} head to distil from; it has {sorted(teacher)}")
        soft = soft_label_bce(output, teacher[head], temperature) if head == "like" else \
            rating_distill_mse(output, teacher[head])
        parts[f"{head}/distill"] = soft.detach()
        per_task[head] = total_loss(hard, soft, alpha)
    loss = multitask_loss(per_task, task_weights if task_weights is not None else dict.fromkeys(per_task, 1.0))
    return loss, parts
