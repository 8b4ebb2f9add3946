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

The labelled pointwise metrics (the rating/like task) take the model's outputs and the labels of the same rows:
``classification_metrics`` (accuracy, precision, recall, F1 at a threshold), ``best_threshold`` (by F1, on
validation), ``auc``, ``logloss``, ``rmse``, ``mae``, and ``pointwise_report`` with all of them for one split.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kdray.sparse import Csr

RANKING_METRICS = ("recall", "ndcg", "hr", "mrr", "precision")

__all__ = ["RANKING_METRICS", "auc", "best_threshold", "classification_metrics", "full_ranking_evaluate", "logloss",
           "mae", "pointwise_metrics", "pointwise_report", "rmse", "topk_metrics"]


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


def mask_excluded(scores: Tensor, users: np.ndarray, excludes: Sequence[Csr]) -> Tensor:
    """``scores [B, N]`` of ``users [B]`` with every item of those users' rows in ``excludes`` set to ``-inf``, in
    place (and returned): what full-ranking evaluation never ranks."""
    for ex in excludes:
        rows, cols = ex.batch_pairs(users)
        scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)] = -torch.inf
    return scores


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
            scores = mask_excluded(scores.float(), batch, excludes)
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

    return {"accuracy": (tp + tn) / (n_pos + n_neg), "precision": precision, "recall": recall, "f1": f1,
            "auc": _mann_whitney_auc(pos, neg)}


def _mann_whitney_auc(pos: Tensor, neg: Tensor) -> float:
    """Exact AUC of non-empty float64 ``pos [P]`` and ``neg [N]`` scores from mid-ranks (Mann-Whitney U)."""
    n_pos, n_neg = pos.numel(), neg.numel()
    # Mid-ranks: tied scores share the mean of the ranks they span, which counts each tied pair as one half.
    _, inverse, counts = torch.unique(torch.cat([pos, neg]), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, dim=0).double()  # last 1-based rank of each distinct value
    mid_rank = ends - (counts.double() - 1.0) / 2.0  # [distinct]
    rank_sum = float(mid_rank[inverse[:n_pos]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


# ----------------------------------------------------------------------------------------------------------------
# Labelled pointwise metrics: probabilities (or logits) and 0/1 labels of the same rows, ratings and predictions.


def _labelled(scores: Tensor, labels: Tensor, what: str = "scores") -> tuple[Tensor, Tensor]:
    """Flat float64 copies of non-empty, same-length, finite ``scores`` and 0/1 ``labels``; ValueError otherwise."""
    s = scores.detach().reshape(-1).double()
    y = labels.detach().reshape(-1).double()
    if s.numel() == 0 or s.numel() != y.numel():
        raise ValueError(f"{what} and labels must be non-empty and of one length, got {s.numel()} and {y.numel()}")
    if not torch.isfinite(s).all():
        raise ValueError(f"{what} must be finite")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y


def classification_metrics(probs: Tensor, labels: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the rule "positive when ``prob >= threshold``" (sklearn's
    ``precision_recall_curve`` convention). Precision is 0 when nothing is predicted positive, recall 0 when there is
    no positive, F1 = 2 TP / (2 TP + FP + FN) (0 when TP is 0); sklearn's ``zero_division=0``.

    Shape:
        probs: [N] in [0, 1] (any score works with a matching threshold); labels: [N] in {0, 1}; output: floats.
    """
    p, y = _labelled(probs, labels, "probs")
    predicted = p >= threshold
    positive = y == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    n = p.numel()
    return {"accuracy": (n - fp - fn) / n, "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


def best_threshold(probs: Tensor, labels: Tensor) -> float:
    """The threshold that maximises F1 of "positive when ``prob >= threshold``", chosen among the distinct
    probabilities (every threshold between two of them gives the same predictions); on a tie the highest one (the
    fewest predicted positives). Meant for validation rows; the test report then uses it. O(N log N): one sort and
    cumulative counts, F1 = 2 TP / (TP + FP + P) at each distinct value.

    Shape:
        probs: [N]; labels: [N] in {0, 1} with at least one positive; output: float.
    """
    p, y = _labelled(probs, labels, "probs")
    n_pos = float(y.sum())
    if n_pos == 0:
        raise ValueError("labels have no positive: F1 is 0 at every threshold, so none is best")
    order = torch.argsort(p, descending=True, stable=True)
    ps, ys = p[order], y[order]
    tp = torch.cumsum(ys, dim=0)  # predicted positive = the first i + 1 rows
    predicted = torch.arange(1, ps.numel() + 1, dtype=torch.float64)
    group_end = torch.cat([ps[1:] != ps[:-1], torch.tensor([True])])  # a threshold takes whole groups of ties
    f1 = 2 * tp[group_end] / (predicted[group_end] + n_pos)
    return float(ps[group_end][int(torch.argmax(f1))])  # argmax: the first maximum = the highest threshold


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve, exact with ties counted one half (see ``pointwise_metrics``); NaN when the labels
    hold one class only (sklearn raises there instead: AUC is undefined).

    Shape:
        scores: [N] (probabilities or logits: only their order matters); labels: [N] in {0, 1}; output: float.
    """
    s, y = _labelled(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    return _mann_whitney_auc(pos, neg)


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy ``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]``, computed from logits (exact
    for any logit, where a probability would round to 0 or 1).

    Shape:
        logits: [N]; labels: [N] in {0, 1}; output: float.
    """
    z, y = _labelled(logits, labels, "logits")
    return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))


def _regression(pred: Tensor, target: Tensor) -> Tensor:
    p = pred.detach().reshape(-1).double()
    t = target.detach().reshape(-1).double()
    if p.numel() == 0 or p.numel() != t.numel():
        raise ValueError(f"pred and target must be non-empty and of one length, got {p.numel()} and {t.numel()}")
    if not (torch.isfinite(p).all() and torch.isfinite(t).all()):
        raise ValueError("pred and target must be finite")
    return p - t


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error ``sqrt(mean (p - t)^2)``. Shape: pred, target: [N]; output: float."""
    return float(_regression(pred, target).square().mean().sqrt())


def mae(pred: Tensor, target: Tensor) -> float:
    """Mean absolute error ``mean |p - t|``. Shape: pred, target: [N]; output: float."""
    return float(_regression(pred, target).abs().mean())


def pointwise_report(like_logits: Tensor | None = None, like: Tensor | None = None, rating_pred: Tensor | None = None,
                     rating: Tensor | None = None, threshold: float | None = None) -> dict[str, float]:
    """Every pointwise metric of one evaluation split: for the like head (logits and 0/1 labels) accuracy,
    precision, recall and F1 at 0.5 (``"f1@0.5"``) and at ``threshold`` (``"f1@best"``, the validation-best
    threshold, also reported as ``"threshold"``; left out when None), ``auc`` and ``logloss``; for the rating head
    ``rmse`` and ``mae``. A head whose tensors are None is left out.

    Shape:
        like_logits, like, rating_pred, rating: [N] or None; output: {name: float}.
    """
    out: dict[str, float] = {}
    if like_logits is not None and like is not None:
        probs = torch.sigmoid(like_logits.detach().double())
        cuts = {"0.5": 0.5} if threshold is None else {"0.5": 0.5, "best": float(threshold)}
        for name, cut in cuts.items():
            out.update({f"{k}@{name}": v for k, v in classification_metrics(probs, like, cut).items()})
        if threshold is not None:
            out["threshold"] = float(threshold)
        out["auc"] = auc(like_logits, like)
        out["logloss"] = logloss(like_logits, like)
    if rating_pred is not None and rating is not None:
        out["rmse"] = rmse(rating_pred, rating)
        out["mae"] = mae(rating_pred, rating)
    return out
