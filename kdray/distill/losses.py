"""Training objectives as pure functions of tensors: hard (supervised) losses and distillation losses.

Nothing here reads a config: callers pass tensors and numbers, so each loss is tested alone against hand-computed
values and an independent reference.

Conventions shared by the distillation losses:

- ``student_logits`` and ``teacher_logits`` are ``[B, C]``: for each of B users, C candidate items scored by both
  models (the whole catalog, or a sampled candidate set): teacher and student always see the same candidates.
- ``mask [B, C]`` bool, True = leave the entry out of BOTH distributions (typically the user's training positives,
  which the hard loss already covers; the recommender-KD literature distils the ranking of unobserved items).
- A row whose entries are all masked contributes nothing: it is left out of the mean over rows, and a batch with no
  usable row gives 0 (with a gradient of 0, never NaN).
- Teacher logits are treated as constants; call the teacher under ``torch.no_grad``/``inference_mode``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DISTILL_LOSSES = ("kl", "mse", "rd", "soft_bce", "rrd", "listwise")

__all__ = [
    "DISTILL_LOSSES",
    "bce",
    "bpr",
    "distill_loss",
    "ensemble_teacher_logits",
    "kl_distill",
    "listwise_distill",
    "mse_distill",
    "ranking_distill",
    "relaxed_ranking_distill",
    "sampled_softmax_ce",
    "soft_bce_distill",
    "softmax_ce",
    "total_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (cheap: Python scalars and shapes only, no device synchronisation)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
                         f"{tuple(student_logits.shape)}")
    if mask is not None:
        if mask.shape != student_logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits shape {tuple(student_logits.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = leave out), got {mask.dtype}")


def _masked_value(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf: exp() of it underflows to exactly 0, yet a row of only such values still has a
    finite (uniform) softmax, and differences of two of them stay finite, so nothing turns into NaN."""
    return torch.finfo(dtype).min / 4


def _row_mean(per_row: Tensor, usable: Tensor) -> Tensor:
    """Mean of ``per_row [B]`` over the usable rows; 0 when there are none."""
    return torch.where(usable, per_row, torch.zeros_like(per_row)).sum() / usable.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# Hard losses


def softmax_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Multi-positive full-softmax cross-entropy.

    ``L = -(1 / P) * sum_{(b, c): y_bc = 1} log softmax(z_b)_c`` with ``P`` the number of positives: exactly the mean
    of one softmax cross-entropy per (user, item) pair over the same candidates, computed with one ``log_softmax`` per
    user (batches are batches of users). Non-binary ``targets`` act as per-entry weights. A batch with no positive
    gives 0.

    Shape:
        logits: [B, C]; targets: [B, C] float in {0, 1}; output: scalar.
    """
    if targets.shape != logits.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} differs from logits shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=-1)  # [B, C]
    targets = targets.to(log_p.dtype)
    return -(targets * log_p).sum() / targets.sum().clamp_min(1.0)


def sampled_softmax_ce(logits: Tensor, targets: Tensor, log_q: Tensor) -> Tensor:
    """Sampled softmax with the logQ correction (Bengio & Senecal 2008; Yi et al., RecSys 2019).

    With candidates drawn from a proposal ``Q``, subtracting ``log Q(c)`` from each logit makes the sampled softmax a
    consistent estimate of the full one: ``L = softmax_ce(z - log Q, y)``.

    Shape:
        logits: [B, C]; targets: [B, C]; log_q: [C] (or broadcastable to [B, C]); output: scalar.
    """
    return softmax_ce(logits - log_q, targets)


def bpr(pos: Tensor, neg: Tensor) -> Tensor:
    """Bayesian personalised ranking (Rendle et al., UAI 2009): ``L = mean_n -log sigmoid(s+_n - s-_n)``.

    Computed as ``softplus(s- - s+)``, which is stable for large score gaps. Empty inputs give 0.

    Shape:
        pos: [N]; neg: [N]; output: scalar.
    """
    if pos.shape != neg.shape:
        raise ValueError(f"pos shape {tuple(pos.shape)} differs from neg shape {tuple(neg.shape)}")
    if pos.numel() == 0:
        return pos.sum() + neg.sum()
    return F.softplus(neg - pos).mean()


def bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Pointwise binary cross-entropy on logits (e.g. NCF's log loss, He et al. 2017):
    ``L = mean -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]``. Empty inputs give 0.

    Shape:
        logits: [...]; labels: same shape, in [0, 1]; output: scalar.
    """
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from logits shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Distillation losses


def kl_distill(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               mask: Tensor | None = None) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

    ``L = T^2 * mean_b KL(p_b || q_b)``, ``p_b = softmax(t_b / T)``, ``q_b = softmax(s_b / T)``, both over the
    unmasked candidates of row b. ``T^2`` keeps the gradient's scale independent of ``T``.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    s, t = student_logits / temperature, teacher_logits.detach() / temperature
    if mask is not None:
        fill = _masked_value(s.dtype)
        s, t = s.masked_fill(mask, fill), t.masked_fill(mask, fill)
    log_q = torch.log_softmax(s, dim=-1)  # [B, C]
    log_p = torch.log_softmax(t, dim=-1)  # [B, C]
    p = log_p.exp()
    # p = 0 (a masked entry, or a teacher logit of -inf) contributes 0: 0 * log 0 is taken as 0, not NaN
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # [B, C]
    if mask is None:
        return temperature**2 * terms.sum(dim=-1).mean()
    per_row = torch.where(mask, torch.zeros_like(terms), terms).sum(dim=-1)  # [B]
    return temperature**2 * _row_mean(per_row, ~mask.all(dim=-1))


def mse_distill(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Logit matching (Ba & Caruana, NeurIPS 2014): ``L = mean_{(b, c) unmasked} (s_bc - t_bc)^2``.

    Unlike KL it also fixes the logits' offset and scale, a stronger constraint on a small student.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    _check_pair(student_logits, teacher_logits, mask)
    sq = (student_logits - teacher_logits.detach()).square()  # [B, C]
    if mask is None:
        return sq.mean()
    keep = ~mask
    return torch.where(keep, sq, torch.zeros_like(sq)).sum() / keep.sum().clamp_min(1)


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
    _check_k(k)
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    _check_pair(student_logits, teacher_logits, mask)
    b, c = student_logits.shape
    k = min(k, c)
    t = teacher_logits.detach()
    if mask is not None:
        t = t.masked_fill(mask, -math.inf)  # masked entries are chosen only when a row has fewer than k others
    top = t.topk(k, dim=-1).indices  # [B, k]
    valid = torch.ones_like(top, dtype=torch.bool) if mask is None else ~mask.gather(1, top)  # [B, k]
    ranks = torch.arange(1, k + 1, device=student_logits.device, dtype=student_logits.dtype)
    w = torch.exp(-ranks / lam).expand(b, k) * valid  # [B, k]
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    positive = (w * F.softplus(-student_logits.gather(1, top))).sum(dim=-1)  # [B]; softplus(-s) = -log sigmoid(s)

    negative_mask = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, top, False)  # [B, C]
    if mask is not None:
        negative_mask &= ~mask
    neg = torch.where(negative_mask, F.softplus(student_logits), torch.zeros_like(student_logits))  # -log(1 - sig)
    negative = neg.sum(dim=-1) / negative_mask.sum(dim=-1).clamp_min(1)  # [B]
    return _row_mean(positive + negative, valid.any(dim=-1))


def _teacher_top_k(teacher_logits: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The teacher's top-``k`` unmasked columns in teacher order ``[B, k]`` and which of them are real (False where a
    row has fewer than ``k`` unmasked candidates and the slot holds a masked one). Ties follow ``torch.topk``."""
    t = teacher_logits.detach()
    if mask is not None:
        t = t.masked_fill(mask, -math.inf)
    top = t.topk(min(k, t.shape[1]), dim=-1).indices  # [B, k]
    valid = torch.ones_like(top, dtype=torch.bool) if mask is None else ~mask.gather(1, top)  # [B, k]
    return top, valid


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
    _check_k(k)
    if n_uninteresting is not None and (isinstance(n_uninteresting, bool) or not isinstance(n_uninteresting, int)
                                        or n_uninteresting <= 0):
        raise ValueError(f"n_uninteresting must be a positive integer or None, got {n_uninteresting!r}")
    _check_pair(student_logits, teacher_logits, mask)
    top, valid = _teacher_top_k(teacher_logits, k, mask)
    fill = _masked_value(student_logits.dtype)

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
    return _row_mean(per_row, valid.any(dim=-1))


def listwise_distill(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float,
                     mask: Tensor | None = None) -> Tensor:
    """Listwise distillation over the teacher's top-``k`` unobserved items, with a temperature.

    Per row b, ``pi_b`` = the teacher's top-``k`` unmasked candidates; the teacher's and the student's softmax at
    temperature ``T`` over exactly those items are compared by KL:

        ``L = T^2 * mean_b KL(p_b || q_b)``, ``p_b = softmax(t_{b,pi_b} / T)``, ``q_b = softmax(s_{b,pi_b} / T)``

    The listwise top-one probability model of ListNet (Cao et al., ICML 2007), whose cross-entropy differs from this
    KL by the teacher's entropy (a constant), restricted to the items the teacher ranks highest, with Hinton et al.'s
    temperature and ``T^2`` scaling (2015). Unlike ``kl`` it spends nothing on the order of the long tail, and unlike
    ``rd`` it distils the teacher's score gaps among its top items, not only their order. Rows with fewer than ``k``
    unmasked candidates use those they have; a row with a single one contributes 0.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    _check_k(k)
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    top, valid = _teacher_top_k(teacher_logits, k, mask)
    return kl_distill(student_logits.gather(1, top), teacher_logits.detach().gather(1, top), temperature, ~valid)


def soft_bce_distill(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                     mask: Tensor | None = None) -> Tensor:
    """Pointwise soft-label distillation: the teacher's per-item probability as a Bernoulli target,

    ``L = mean_{(b, c) unmasked} BCE(sigmoid(s_bc / T), sigmoid(t_bc / T))``
    ``    = mean -[p log sigmoid(s / T) + (1 - p) log(1 - sigmoid(s / T))]``, ``p = sigmoid(t / T)``

    (the pointwise counterpart of Hinton et al. 2015, as used for CTR models, e.g. Zhu et al., AAAI 2020). Not scaled
    by ``T^2``. Its minimum, reached at ``s = t``, is the targets' entropy, not 0.

    Shape:
        student_logits, teacher_logits: [B, C]; mask: [B, C] bool (True = leave out) or None; output: scalar.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    target = torch.sigmoid(teacher_logits.detach() / temperature)
    per_entry = F.binary_cross_entropy_with_logits(student_logits / temperature, target, reduction="none")  # [B, C]
    if mask is None:
        return per_entry.mean()
    keep = ~mask
    return torch.where(keep, per_entry, torch.zeros_like(per_entry)).sum() / keep.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# Several teachers


def _normalised_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} teachers")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def ensemble_teacher_logits(teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None, *,
                            kind: str = "kl", temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """One teacher-logit block whose induced target is the weighted average of the teachers' targets
    (weights normalised to sum 1; None or empty = uniform), for the distillation loss ``kind``:

    - ``"kl"``: the mixture of softmax distributions ``p = sum_m w_m softmax(t_m / T)`` over the unmasked candidates,
      returned as ``T * log p`` (so ``softmax(result / T) = p``): log-probabilities are valid logits. Computed as a
      ``logsumexp`` over teachers, stable for any logit range.
    - ``"rd"``, ``"rrd"``: the same mixture at ``T = 1``; its top-K is the ensemble's ranking.
    - ``"listwise"``: as ``"kl"``; the loss renormalises the mixture over its top-K.
    - ``"soft_bce"``: the mixture of Bernoulli targets ``p = sum_m w_m sigmoid(t_m / T)``, returned as
      ``T * logit(p)`` (so ``sigmoid(result / T) = p``).
    - ``"mse"``: the weighted mean of the logits (the target of logit matching is the logit itself).

    Masked entries (True = left out) are excluded from each teacher's distribution before averaging and hold a large
    finite negative value in the result.

    Shape:
        teacher_logits: M tensors [B, C]; mask: [B, C] bool or None; output: [B, C].
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"kind must be one of {DISTILL_LOSSES}, got {kind!r}")
    _check_temperature(temperature)
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits is empty: need at least one teacher")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"teacher_logits must all be [B, C] of one shape, got shapes {sorted(shapes)}")
    if mask is not None:
        _check_pair(teacher_logits[0], teacher_logits[0], mask)
    w = _normalised_weights(len(teacher_logits), weights)
    stacked = torch.stack([t.detach() for t in teacher_logits])  # [M, B, C]
    log_w = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).log().view(-1, 1, 1)  # [M, 1, 1]
    fill = _masked_value(stacked.dtype)
    if kind == "mse":
        return (stacked * log_w.exp()).sum(dim=0)
    if kind == "soft_bce":
        z = stacked / temperature
        log_p = torch.logsumexp(log_w + F.logsigmoid(z), dim=0)  # log sum_m w_m sigmoid(z_m)
        log_1mp = torch.logsumexp(log_w + F.logsigmoid(-z), dim=0)  # log sum_m w_m (1 - sigmoid(z_m))
        out = temperature * (log_p - log_1mp)
    else:
        t = 1.0 if kind in ("rd", "rrd") else temperature
        z = stacked / t
        if mask is not None:
            z = z.masked_fill(mask, fill)
        out = t * torch.logsumexp(log_w + torch.log_softmax(z, dim=-1), dim=0)  # [B, C]
    return out if mask is None else out.masked_fill(mask, fill)


def distill_loss(kind: str, student_logits: Tensor, teachers: Sequence[Tensor], weights: Sequence[float] | None, *,
                 temperature: float, k: int, mask: Tensor | None, n_uninteresting: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """The distillation loss ``kind`` (one of ``DISTILL_LOSSES``) of the student against one teacher or the weighted
    ensemble of several (see ``ensemble_teacher_logits``). ``temperature`` applies to "kl", "soft_bce" and
    "listwise", ``k`` to "rd", "rrd" and "listwise"; both are validated whatever the kind, so a bad value fails on the
    first batch, not after a switch of kind. ``n_uninteresting`` and ``generator`` go to "rrd" (None: every remaining
    candidate is uninteresting, no sampling).

    Shape:
        student_logits: [B, C]; teachers: M tensors [B, C]; mask: [B, C] bool or None; output: scalar.
    """
    if kind not in DISTILL_LOSSES:
        raise ValueError(f"kind must be one of {DISTILL_LOSSES}, got {kind!r}")
    _check_temperature(temperature)
    _check_k(k)
    if len(teachers) == 0:
        raise ValueError("teachers is empty: distillation needs at least one teacher's logits")
    if len(teachers) == 1:
        _normalised_weights(1, weights)
        teacher = teachers[0]
    else:
        teacher = ensemble_teacher_logits(teachers, weights, kind=kind, temperature=temperature, mask=mask)
    if kind == "kl":
        return kl_distill(student_logits, teacher, temperature, mask)
    if kind == "mse":
        return mse_distill(student_logits, teacher, mask)
    if kind == "rd":
        return ranking_distill(student_logits, teacher, k, mask)
    if kind == "rrd":
        return relaxed_ranking_distill(student_logits, teacher, k, mask, n_uninteresting, generator)
    if kind == "listwise":
        return listwise_distill(student_logits, teacher, k, temperature, mask)
    return soft_bce_distill(student_logits, teacher, temperature, mask)


def total_loss(hard: Tensor, distill: Tensor, alpha: float) -> Tensor:
    """``L = (1 - alpha) * hard + alpha * distill`` (as in torchtune's KD recipe). At ``alpha`` 0 or 1 the unused
    term is dropped rather than multiplied by 0, so a non-finite value in it cannot leak into the loss.

    Shape:
        hard, distill: scalars; output: scalar.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return hard
    if alpha == 1.0:
        return distill
    return (1.0 - alpha) * hard + alpha * distill
