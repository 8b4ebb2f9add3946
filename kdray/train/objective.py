"""The per-batch training objective shared by teacher, student and Tune trials.

Batches are batches of *users*: scoring the catalog once per user batch and applying the loss to all of each
user's training positives is the per-pair objective at a fraction of the cost (an MF-256 epoch over 670k
interactions took 0.86 s batched by users against 51 s batched by pairs, in plain PyTorch on 2 cores). For each batch:

1. candidates: the whole catalog (``[B, n_items]`` logits from ``score_all``), or, for ``sampled_softmax``, the
   batch's positives plus ``n_negatives`` items drawn by popularity, shared by the batch (``[B, C]`` from ``score``);
2. the hard loss on the student's logits against the batch's training positives;
3. for a student, every frozen teacher scores exactly the same candidates under ``torch.inference_mode`` (or the
   batch carries the teacher's cached top-K), and the distillation loss compares the two, with the user's training
   positives masked out of both distributions when ``mask_seen``;
4. ``(1 - alpha) * hard + alpha * distill``.

Nothing here knows about Ray: the functions take tensors and models and are tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from kdray.config import Config
from kdray.distill import losses
from kdray.models import RecModel, embedding_tables

HARD_LOSSES = ("softmax", "sampled_softmax", "bpr", "bce")  # the registry of hard losses: what hard_loss dispatches,
# and what the config's train.hard_loss accepts
BCE_NEGATIVES_PER_POSITIVE = 4  # NeuMF's ratio (He et al. 2017)


@dataclass(frozen=True)
class Objective:
    """Everything the loss of one batch depends on; built once per training from the resolved config."""

    n_items: int
    hard_loss: str
    n_negatives: int
    alpha: float = 0.0  # 0 = no distillation (a teacher, or a student trained alone)
    distill: str = "none"
    temperature: float = 1.0
    topk: int = 10
    mask_seen: bool = True
    teacher_weights: tuple[float, ...] = ()
    embedding_l2: float = 0.0  # see TrainConfig.embedding_l2

    @classmethod
    def from_config(cls, cfg: Config, role: str, n_items: int) -> "Objective":
        train = cfg.teacher_train if role == "teacher" else cfg.student_train
        base = dict(n_items=n_items, hard_loss=train.hard_loss, n_negatives=train.n_negatives,
                    embedding_l2=train.embedding_l2)
        d = cfg.distill
        if role == "teacher" or d.loss == "none" or d.alpha == 0.0:
            return cls(**base)
        return cls(**base, alpha=d.alpha, distill=d.loss, temperature=d.temperature, topk=d.topk,
                   mask_seen=d.mask_seen, teacher_weights=d.teacher_weights)

    @property
    def distilling(self) -> bool:
        return self.distill != "none" and self.alpha > 0.0

    @property
    def sampled(self) -> bool:
        return self.hard_loss == "sampled_softmax"


@dataclass
class Batch:
    """One batch of users and their training positives (a ragged list, flattened)."""

    users: Tensor  # [B] int64
    pos_rows: Tensor  # [P] int64: position in the batch of each positive
    pos_items: Tensor  # [P] int64: item id of each positive
    teacher_items: Tensor | None = None  # [B, K] cached teacher top-K, in the teacher's order (cached mode only)

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.users), move(self.pos_rows), move(self.pos_items), move(self.teacher_items))


def batch_from_lists(users: np.ndarray, offsets: np.ndarray, values: np.ndarray,
                     teacher_items: np.ndarray | None = None) -> Batch:
    """Builds a batch from a list column in Arrow layout: user ``b``'s items are ``values[offsets[b]:offsets[b+1]]``."""
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    items = values[offsets[0] : offsets[-1]]
    as_tensor = lambda a, dt: None if a is None else torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return Batch(as_tensor(users, torch.int64), as_tensor(rows, torch.int64), as_tensor(items, torch.int64),
                 as_tensor(teacher_items, torch.int64))


def sampling_log_q(item_counts: np.ndarray) -> Tensor:
    """log of the popularity distribution negatives are drawn from (counts smoothed by +1 so no item has q = 0)."""
    q = (np.asarray(item_counts, dtype=np.float64) + 1.0)
    return torch.as_tensor(np.log(q / q.sum()), dtype=torch.float32)


def _candidates(batch: Batch, obj: Objective, log_q: Tensor | None, gen: torch.Generator | None
                ) -> tuple[Tensor | None, Tensor]:
    """Returns (candidate item ids [C] or None for the whole catalog, targets [B, C] in {0, 1})."""
    b = batch.users.shape[0]
    device = batch.users.device
    if not obj.sampled:
        targets = torch.zeros(b, obj.n_items, device=device)
        targets[batch.pos_rows, batch.pos_items] = 1.0
        return None, targets
    assert log_q is not None, "sampled_softmax needs the sampling distribution"
    negatives = torch.multinomial(log_q.exp().cpu(), obj.n_negatives, replacement=True, generator=gen).to(device)
    parts = [batch.pos_items, negatives]
    if batch.teacher_items is not None:
        parts.append(batch.teacher_items.reshape(-1))
    cand, inverse = torch.unique(torch.cat(parts), return_inverse=True)  # [C], sorted
    targets = torch.zeros(b, cand.shape[0], device=device)
    targets[batch.pos_rows, inverse[: batch.pos_items.shape[0]]] = 1.0
    return cand, targets


def _score(model: torch.nn.Module, users: Tensor, cand: Tensor | None) -> Tensor:
    """Through ``forward`` (``score_all`` or ``score``), so that a DistributedDataParallel wrapper syncs gradients."""
    if cand is None:
        return model(users)  # [B, N]
    return model(users, cand.unsqueeze(0).expand(users.shape[0], -1))  # [B, C]


def _random_negative_columns(targets: Tensor, rows: Tensor, per_row: int, gen: torch.Generator | None) -> Tensor:
    """For each entry of ``rows``, ``per_row`` random columns that are not positives of that row ([len(rows), per_row]).
    Uniform sampling with up to 3 rounds of rejection; with sparse rows the chance of a leftover collision is tiny."""
    c = targets.shape[1]
    cols = torch.randint(0, c, (rows.shape[0], per_row), generator=gen).to(targets.device)
    for _ in range(3):
        clash = targets[rows.unsqueeze(1).expand_as(cols), cols] > 0
        if not clash.any():
            break
        cols[clash] = torch.randint(0, c, (int(clash.sum()),), generator=gen).to(targets.device)
    return cols


def hard_loss(logits: Tensor, targets: Tensor, obj: Objective, cand: Tensor | None, log_q: Tensor | None,
              gen: torch.Generator | None) -> Tensor:
    """The supervised loss on ``logits [B, C]`` against ``targets [B, C]``."""
    if obj.hard_loss == "softmax":
        return losses.softmax_ce(logits, targets)
    if obj.hard_loss == "sampled_softmax":
        return losses.sampled_softmax_ce(logits, targets, log_q[cand])
    rows, cols = targets.nonzero(as_tuple=True)  # every positive (b, c)
    if obj.hard_loss == "bpr":
        neg = _random_negative_columns(targets, rows, 1, gen)[:, 0]
        return losses.bpr(logits[rows, cols], logits[rows, neg])
    if obj.hard_loss != "bce":
        raise ValueError(f"hard_loss must be one of {HARD_LOSSES}, got {obj.hard_loss!r}")
    neg = _random_negative_columns(targets, rows, BCE_NEGATIVES_PER_POSITIVE, gen)  # [P, 4]
    scores = torch.cat([logits[rows, cols], logits[rows.unsqueeze(1).expand_as(neg), neg].reshape(-1)])
    labels = torch.cat([torch.ones_like(cols, dtype=logits.dtype), torch.zeros(neg.numel(), device=logits.device)])
    return losses.bce(scores, labels)


def teacher_logits(teachers: Sequence[RecModel], batch: Batch, cand: Tensor | None) -> list[Tensor]:
    """Every frozen teacher's logits on exactly the student's candidates ([B, C] each).

    Computed under ``inference_mode`` (no autograd graph, no version counters), then cloned: inference tensors cannot
    be saved for the student's backward pass, and the copy of a [B, C] block is cheap next to the scoring itself.
    """
    with torch.inference_mode():
        outs = [_score(t, batch.users, cand) for t in teachers]
    return [o.clone() for o in outs]


def cached_teacher_columns(batch: Batch, cand: Tensor | None) -> Tensor:
    """The cached top-K's items as columns of the student's logits ([B, K], in the teacher's order)."""
    assert batch.teacher_items is not None
    return batch.teacher_items if cand is None else torch.searchsorted(cand, batch.teacher_items)  # cand is sorted


def embedding_penalty(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Squared L2 norm of the embedding rows the batch uses (its users, and its positive items once per positive),
    divided by the number of users in the batch."""
    users, items = embedding_tables(model)
    rows = users.weight[batch.users].pow(2).sum() + items.weight[batch.pos_items].pow(2).sum()
    return rows / batch.users.shape[0]


def batch_loss(model: RecModel, teachers: Sequence[RecModel], batch: Batch, obj: Objective,
               log_q: Tensor | None = None, gen: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of one batch and its parts (for logging). ``teachers`` is empty for a teacher or a lone student."""
    cand, targets = _candidates(batch, obj, log_q, gen)
    logits = _score(model, batch.users, cand)  # [B, C]
    hard = hard_loss(logits, targets, obj, cand, log_q, gen)
    loss, parts = _distilled(teachers, batch, obj, logits, targets, cand, hard)
    if obj.embedding_l2 > 0:
        penalty = embedding_penalty(model, batch)
        loss = loss + obj.embedding_l2 * penalty
        parts["embedding_l2"] = float(penalty.detach())
    return loss, parts


def _distilled(teachers: Sequence[RecModel], batch: Batch, obj: Objective, logits: Tensor, targets: Tensor,
               cand: Tensor | None, hard: Tensor) -> tuple[Tensor, dict[str, float]]:
    """``(1 - alpha) * hard + alpha * distill`` for a distilled student; the hard loss alone otherwise."""
    if not obj.distilling:
        return hard, {"hard": float(hard.detach())}
    mask = targets > 0 if obj.mask_seen else None
    if batch.teacher_items is not None:
        # a cached top-K already combines the ensemble (kdray.distill.teacher.TeacherTopK) in the teacher's order,
        # which is all that rd and rrd read: no [B, C] teacher block, no top-k over it
        distill = losses.top_k_distill_loss(obj.distill, logits, cached_teacher_columns(batch, cand), mask)
    else:
        weights = list(obj.teacher_weights) if obj.teacher_weights else None
        distill = losses.distill_loss(obj.distill, logits, teacher_logits(teachers, batch, cand), weights,
                                      temperature=obj.temperature, k=obj.topk, mask=mask)
    total = losses.total_loss(hard, distill, obj.alpha)
    return total, {"hard": float(hard.detach()), "distill": float(distill.detach())}
