"""Evaluation metrics: full-catalog top-K ranking metrics and pointwise classification metrics.

Ranking follows RecBole and LightGCN, so numbers compare with their published tables: every item of
the catalog is ranked (no sampled negatives: Krichene & Rendle, KDD 2020), a user's training items (and validation
items, at test time) are excluded, and users without truth items are skipped. With ``R_k`` the top-k list, ``T`` the
user's truth set and ``rel_r = 1`` when the item at rank r is in ``T``:

    recall@k    = |R_k ∩ T| / |T|
    precision@k = |R_k ∩ T| / k
    hr@k        = 1 if R_k ∩ T is not empty else 0
    mrr@k       = 1 / (rank of the first hit) if it is within k else 0
    ndcg@k      = DCG / IDCG,  DCG = sum_{r=1..k} rel_r / log2(r + 1),  IDCG = sum_{r=1..min(|T|, k)} 1 / log2(r + 1)

Ties in the scores are broken by ``torch.topk``'s order (unspecified, as in RecBole); with continuous scores from a
trained model they do not occur in practice.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kdray.sparse import Csr

RANKING_METRICS = ("recall", "ndcg", "hr", "mrr", "precision")

__all__ = ["RANKING_METRICS", "full_ranking_evaluate", "pointwise_metrics", "topk_metrics"]


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return sorted({int(k) for k in ks})


def topk_metrics(scores: Tensor, truth: Tensor, ks: Sequence[int], n_truth: Tensor | None = None
                 ) -> dict[str, Tensor]:
    """Per-user top-K metrics ("recall@10", "ndcg@10", "hr@10", "mrr@10", "precision@10", ... for each k).

    ``scores`` must already hold ``-inf`` for excluded items; an item scored ``-inf`` never counts as a hit, even
    when ``k`` exceeds the number of rankable items. ``precision@k`` divides by ``k`` itself (RecBole), also when
    ``k`` is larger than the catalog. Rows without truth items give NaN for recall and ndcg (and 0 for the others):
    the caller leaves them out (``full_ranking_evaluate`` skips and counts them).

    ``n_truth``, the number of truth items per row, may be passed when the caller already knows it (from a CSR):
    counting a ``[B, N]`` bool block costs more than the top-k itself.

    Shape:
        scores: [B, N] float; truth: [B, N] bool; n_truth: [B] or None; output: each value [B] float32.
    """
    ks = _check_ks(ks)
    if scores.ndim != 2 or truth.shape != scores.shape:
        raise ValueError(f"scores and truth must both be [B, N], got {tuple(scores.shape)} and {tuple(truth.shape)}")
    truth = truth.to(torch.bool)
    b, n = scores.shape
    top_values, top_items = scores.topk(min(max(ks), n), dim=1)  # [B, K]
    hits = (truth.gather(1, top_items) & (top_values > -torch.inf)).float()  # [B, K]
    n_truth = (truth.sum(dim=1) if n_truth is None else n_truth.to(scores.device)).float()  # [B]
    nan = torch.full_like(n_truth, torch.nan)
    ranks = torch.arange(1, hits.shape[1] + 1, device=scores.device, dtype=torch.float32)  # [K] 1-based
    discounts = 1.0 / torch.log2(ranks + 1.0)  # [K]
    ideal_cumulative = torch.cumsum(discounts, dim=0)  # [K]: IDCG with 1..K truth items
    cum_hits = torch.cumsum(hits, dim=1)  # [B, K]
    cum_dcg = torch.cumsum(hits * discounts, dim=1)  # [B, K]
    first_hit = torch.where(hits > 0, ranks, torch.inf).min(dim=1).values  # [B], inf without a hit

    out: dict[str, Tensor] = {}
    for k in ks:
        kk = min(k, hits.shape[1])  # the ranked list cannot be longer than the catalog
        n_hits = cum_hits[:, kk - 1]  # [B]
        ideal = ideal_cumulative[(n_truth.clamp(max=kk).long() - 1).clamp(min=0)]  # [B]
        has_truth = n_truth > 0
        out[f"recall@{k}"] = torch.where(has_truth, n_hits / n_truth.clamp(min=1), nan)
        out[f"ndcg@{k}"] = torch.where(has_truth, cum_dcg[:, kk - 1] / ideal, nan)
        out[f"hr@{k}"] = (n_hits > 0).float()
        out[f"mrr@{k}"] = torch.where(first_hit <= kk, 1.0 / first_hit, torch.zeros_like(first_hit))
        out[f"precision@{k}"] = n_hits / k
    return out


def full_ranking_evaluate(score_all: Callable[[Tensor], Tensor], truth: Csr, exclude: Sequence[Csr] | Csr | None,
                          ks: Sequence[int], batch_size: int = 1024,
                          device: str | torch.device = "cpu") -> dict[str, float | int]:
    """Mean full-catalog top-K metrics over the users that have truth items.

    Users are scored ``batch_size`` at a time: one ``[batch_size, N]`` block of scores (plus a bool block of the same
    shape) is alive at once, never all users x items (30k users x 41k items in batches of 1024 peak at ~0.2 GB).
    The items of every ``exclude`` matrix (training items; training and validation items at test time) are set to
    ``-inf`` before ranking. Runs under ``torch.inference_mode`` and edits each score block in place, so
    ``score_all`` must return a fresh tensor (a model's ``score_all`` does).

    Returns ``{"recall@10": mean, ..., "n_users_evaluated": int, "n_users_skipped": int}`` where skipped users are
    those without truth items. With no user to evaluate the means are NaN.

    Shape:
        score_all: users [B] int64 -> [B, N]; truth, exclude: Csr with N columns.
    """
    ks = _check_ks(ks)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    excludes = [] if exclude is None else [exclude] if isinstance(exclude, Csr) else list(exclude)
    for i, ex in enumerate(excludes):
        if ex.n_cols != truth.n_cols or ex.n_rows != truth.n_rows:
            raise ValueError(f"exclude[{i}] is {ex.n_rows} x {ex.n_cols} but truth is {truth.n_rows} x {truth.n_cols}")
    n = truth.n_cols
    users = np.flatnonzero(truth.row_lengths() > 0)  # [U_eval]
    sums: dict[str, float] = {}
    with torch.inference_mode():
        for start in range(0, users.size, batch_size):
            batch = users[start : start + batch_size]  # [B]
            scores = score_all(torch.as_tensor(batch, dtype=torch.int64, device=device))  # [B, N]
            if scores.shape != (batch.size, n):
                raise ValueError(f"score_all returned shape {tuple(scores.shape)} for {batch.size} users, "
                                 f"expected ({batch.size}, {n})")
            scores = scores.float()
            for ex in excludes:
                rows, cols = ex.batch_pairs(batch)
                scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)] = (
                    -torch.inf)
            rows, cols = truth.batch_pairs(batch)
            hit_mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # [B, N]
            hit_mask[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)] = True
            n_truth = torch.as_tensor(truth.row_lengths()[batch], device=scores.device)  # [B]
            for name, values in topk_metrics(scores, hit_mask, ks, n_truth).items():
                sums[name] = sums.get(name, 0.0) + float(values.double().sum())
    n_eval = int(users.size)
    names = [f"{m}@{k}" for k in ks for m in RANKING_METRICS]
    out: dict[str, float | int] = {name: (sums[name] / n_eval if n_eval else float("nan")) for name in names}
    out["n_users_evaluated"] = n_eval
    out["n_users_skipped"] = int(truth.n_rows - n_eval)
    return out


def pointwise_metrics(pos_scores: Tensor, neg_scores: Tensor, threshold: float = 0.0) -> dict[str, float]:
    """Classification metrics of scores for known positives and negatives (e.g. logits of held-out interactions and
    of sampled non-interactions).

    An item is predicted positive when its score is ``> threshold`` (0 for logits = probability 0.5). With TP, FP,
    TN, FN counted against that: accuracy = (TP + TN) / (P + N), precision = TP / (TP + FP) (0 when nothing is
    predicted positive), recall = TP / P, f1 = 2 precision recall / (precision + recall) (0 when both are 0), and
    the exact AUC = P(score+ > score-) + 0.5 P(score+ = score-) over all (positive, negative) pairs, computed from
    mid-ranks (Mann-Whitney U) in O((P + N) log(P + N)).

    Shape:
        pos_scores: [P]; neg_scores: [N]; both non-empty; output: dict of Python floats.
    """
    pos = pos_scores.detach().reshape(-1).double()
    neg = neg_scores.detach().reshape(-1).double()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"pos_scores and neg_scores must both be non-empty, got {pos.numel()} and {neg.numel()}")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("pos_scores and neg_scores must be finite")
    n_pos, n_neg = pos.numel(), neg.numel()
    tp = int((pos > threshold).sum())
    fp = int((neg > threshold).sum())
    tn = n_neg - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    # Mid-ranks: tied scores share the mean of the ranks they span, which counts each tied pair as one half.
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, dim=0).double()  # last 1-based rank of each distinct value
    mid_rank = ends - (counts.double() - 1.0) / 2.0  # [distinct]
    rank_sum = float(mid_rank[inverse[:n_pos]].sum())
    auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return {"accuracy": (tp + tn) / (n_pos + n_neg), "precision": precision, "recall": recall, "f1": f1,
            "auc": auc}
