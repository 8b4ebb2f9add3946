"""Ranking distillation: the student learns the teacher's ranking of each user's unobserved items (its top-K), the
family the recommender-KD literature found to work where matching the whole distribution does not. Conventions as
in :mod:`kdray.distill.losses`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.distill.common import (check_k, check_pair, check_top, masked_value, row_mean, teacher_top_k,
                                  top_k_valid)


def ranking_distill(student_logits: Tensor, teacher_logits: Tensor, k: int, mask: Tensor | None = None,
                    lam: float = 1.0) -> Tensor:
    """Ranking distillation (Tang & Wang, KDD 2018), with a negative term for shift-invariant hard losses.

    Per row b, the teacher's top-``k`` unmasked candidates ``pi_1..pi_k`` are pseudo-positives with position weights
    ``w_r = exp(-r / lam) / sum_{r'} exp(-r' / lam)`` (r = 1..k; ``lam = 1`` is the paper's code default), and every
    other unmasked candidate ``j`` is a pseudo-negative:

        ``L_b = sum_r w_r * -log sigmoid(s_{b, pi_r})  +  mean_j -log(1 - sigmoid(s_bj))``
        ``L = mean_b L_b``

    Why the negative term: the paper pairs the positive term with a pointwise log loss that anchors the logits'
    level. kdray's default hard loss is a softmax, which is invariant to adding a constant to a user's logits (an MF
    student can do that through its item biases), so the positive term alone is lowered by inflating every logit
    without changing any ranking. The negative term (total weight 1, like the positives) removes that free direction
    and deterministically (no sampling) pushes the items the teacher does not rank highly below them.

    Rows with fewer than ``k`` unmasked candidates use those they have (weights renormalised over them). Ties in the
    teacher's logits are broken by ``torch.topk``'s order.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    check_k(k)
    check_pair(student_logits, teacher_logits, mask)
    top, _ = teacher_top_k(teacher_logits, k, mask)  # masked entries only where a row has fewer than k others
    return ranking_distill_top_k(student_logits, top, mask, lam)


def ranking_distill_top_k(student_logits: Tensor, top: Tensor, mask: Tensor | None = None, lam: float = 1.0
                          ) -> Tensor:
    """``ranking_distill`` given the teacher's top-K columns in its order (``top [B, k]``) instead of its logits:
    what a cached top-K holds. Equal to ``ranking_distill(s, t, k, mask, lam)`` for any ``t`` whose top-``k`` after
    the mask is ``top`` in that order; a column of ``top`` that is masked counts for nothing (a row with fewer than
    ``k`` unmasked candidates). It skips the dense ``[B, C]`` teacher block and its top-k.

    Shape:
        student_logits: [B, C]; top: [B, k] int64, distinct columns per row; mask: [B, C] bool or None; output: scalar.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    check_top(student_logits, top, mask)
    b, k = top.shape
    valid = top_k_valid(top, mask)  # [B, k]
    ranks = torch.arange(1, k + 1, device=student_logits.device, dtype=student_logits.dtype)
    w = torch.exp(-ranks / lam).expand(b, k) * valid  # [B, k]
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    positive = (w * F.softplus(-student_logits.gather(1, top))).sum(dim=-1)  # [B]; softplus(-s) = -log sigmoid(s)

    negative_mask = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, top, False)  # [B, C]
    if mask is not None:
        negative_mask &= ~mask
    neg = torch.where(negative_mask, F.softplus(student_logits), torch.zeros_like(student_logits))  # -log(1 - sig)
    negative = neg.sum(dim=-1) / negative_mask.sum(dim=-1).clamp_min(1)  # [B]
    return row_mean(positive + negative, valid.any(dim=-1))


def relaxed_ranking_distill(student_logits: Tensor, teacher_logits: Tensor, k: int, mask: Tensor | None = None,
                            n_uninteresting: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Relaxed ranking distillation, the RRD half of DE-RRD (Kang et al., "DE-RRD: A Knowledge Distillation
    Framework for Recommender System", CIKM 2020, Eq. 8-9).

    Per row b, the teacher's top-``k`` unmasked candidates in the teacher's order ``pi_1..pi_k`` are the
    "interesting" items, and ``U_b`` the "uninteresting" ones: every other unmasked candidate, or, with
    ``n_uninteresting``, that many of them drawn uniformly without replacement from ``generator``. The loss is the
    negative log-likelihood of a Plackett-Luce permutation that keeps the interesting items' order and puts them all
    above ``U_b``, with no order among ``U_b`` (the relaxation):

        ``L_b = -sum_{r=1..k} [ s_{b,pi_r} - log( sum_{r'=r..k} exp(s_{b,pi_r'}) + sum_{j in U_b} exp(s_bj) ) ]``
        ``L = mean_b L_b`` over the rows with at least one interesting item

    As in the reference implementation the uninteresting items enter every denominator; the mean over rows (the
    paper sums) keeps the scale independent of the batch size. Differences from the paper: the interesting items
    are the teacher's top-``k`` itself rather than ``k`` items sampled from its top-N with rank-decaying
    probabilities, and by default the uninteresting set is every remaining candidate (exact, no sampling). Rows
    with fewer than ``k`` unmasked candidates use those they have; teacher logits enter only through their order.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    check_k(k)
    check_pair(student_logits, teacher_logits, mask)
    top, _ = teacher_top_k(teacher_logits, k, mask)
    return relaxed_ranking_distill_top_k(student_logits, top, mask, n_uninteresting, generator)


def relaxed_ranking_distill_top_k(student_logits: Tensor, top: Tensor, mask: Tensor | None = None,
                                  n_uninteresting: int | None = None, generator: torch.Generator | None = None
                                  ) -> Tensor:
    """``relaxed_ranking_distill`` given the teacher's top-K columns in its order (``top [B, k]``) instead of its
    logits, as ``ranking_distill_top_k`` is for ``ranking_distill``: what a cached top-K holds, with no dense
    ``[B, C]`` teacher block and no top-k over it. A masked column of ``top`` counts for nothing.

    Shape:
        student_logits: [B, C]; top: [B, k] int64, distinct columns per row; mask: [B, C] bool or None; output: scalar.
    """
    if n_uninteresting is not None and (isinstance(n_uninteresting, bool) or not isinstance(n_uninteresting, int)
                                        or n_uninteresting <= 0):
        raise ValueError(f"n_uninteresting must be a positive integer or None, got {n_uninteresting!r}")
    check_top(student_logits, top, mask)
    valid = top_k_valid(top, mask)  # [B, k]
    fill = masked_value(student_logits.dtype)

    others = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, top, False)  # [B, C]
    if mask is not None:
        others &= ~mask
    if n_uninteresting is not None and n_uninteresting < student_logits.shape[1]:
        keys = torch.rand(student_logits.shape, generator=generator,
                          device=generator.device if generator is not None else student_logits.device)
        keys = keys.to(student_logits.device).masked_fill(~others, -1.0)  # eligible entries win the draw first
        drawn = keys.topk(n_uninteresting, dim=-1).indices  # [B, n]
        others &= torch.zeros_like(others).scatter_(1, drawn, True)
    below = torch.logsumexp(student_logits.masked_fill(~others, fill), dim=-1, keepdim=True)  # [B, 1]

    s_top = student_logits.gather(1, top).masked_fill(~valid, fill)  # [B, k]
    from_here = s_top.flip(-1).logcumsumexp(dim=-1).flip(-1)  # [B, k]: log sum_{r' >= r} exp(s_pi_r')
    terms = torch.logaddexp(from_here, below) - s_top  # [B, k]
    per_row = torch.where(valid, terms, torch.zeros_like(terms)).sum(dim=-1)  # [B]
    return row_mean(per_row, valid.any(dim=-1))
