"""Argument checks, reductions and the teacher's top-K, shared by the loss functions (the checks are cheap: Python
scalars and shapes only, no device synchronisation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    _check_logits_and_mask(student_logits, mask)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
                         f"{tuple(student_logits.shape)}")


def check_top(student_logits: Tensor, top: Tensor, mask: Tensor | None) -> None:
    """A teacher's top-K given as columns: ``[B, k]`` integer indices, one row per student row."""
    _check_logits_and_mask(student_logits, mask)
    if top.ndim != 2 or top.shape[0] != student_logits.shape[0] or not 1 <= top.shape[1] <= student_logits.shape[1]:
        raise ValueError(f"top must be [B, k] with 1 <= k <= C for student_logits of shape "
                         f"{tuple(student_logits.shape)}, got shape {tuple(top.shape)}")
    if top.dtype != torch.int64:
        raise ValueError(f"top must hold int64 column indices, got {top.dtype}")


def _check_logits_and_mask(student_logits: Tensor, mask: Tensor | None) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if mask is not None:
        if mask.shape != student_logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits shape {tuple(student_logits.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = leave out), got {mask.dtype}")


def masked_value(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf: exp() of it underflows to exactly 0, yet a row of only such values still has a
    finite (uniform) softmax, and differences of two of them stay finite, so nothing turns into NaN."""
    return torch.finfo(dtype).min / 4


def row_mean(per_row: Tensor, usable: Tensor) -> Tensor:
    """Mean of ``per_row [B]`` over the usable rows; 0 when there are none."""
    return torch.where(usable, per_row, torch.zeros_like(per_row)).sum() / usable.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# Hard losses


def teacher_top_k(teacher_logits: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The teacher's top-``k`` unmasked columns in teacher order ``[B, k]`` and which of them are real (False where a
    row has fewer than ``k`` unmasked candidates and the slot holds a masked one). Ties follow ``torch.topk``."""
    t = teacher_logits.detach()
    if mask is not None:
        t = t.masked_fill(mask, -math.inf)
    top = t.topk(min(k, t.shape[1]), dim=-1).indices  # [B, k]
    return top, top_k_valid(top, mask)


def top_k_valid(top: Tensor, mask: Tensor | None) -> Tensor:
    """Which columns of a top-K ``[B, k]`` are real candidates (not masked) ``[B, k]`` bool."""
    return torch.ones_like(top, dtype=torch.bool) if mask is None else ~mask.gather(1, top)
