"""Fold-in: a user vector computed at request time from a history of item ids, with the item table fixed.

A served student knows only the users of its training split, and a known user's vector only their training items.
Fold-in answers both from the item side of the trained model: given the items a user just interacted with, find the
user vector the training objective would have given them.

**What is solved.** The student is trained with a full-catalog softmax (``kdray.distill.losses.softmax_ce``), so
fold-in minimises that same objective over the user vector ``p`` alone, with the item vectors ``Q [I, D]`` and item
biases ``b [I]`` fixed, plus a Gaussian prior centred on a starting vector ``p0``:

    L(p) = sum_{i in H} ( logsumexp_j (Q p + b)_j - (Q p + b)_i ) + (lambda / 2) * ||p - p0||^2

``H`` is the history (distinct dense item ids, n = |H|). ``L`` is strictly convex (a log-sum-exp of affine functions
plus a ridge), so it has one minimum, found by damped Newton steps from ``p0``::

    g = n * Q^T pi - sum_{i in H} q_i + lambda (p - p0),      pi = softmax(Q p + b)
    H = n * (Q^T diag(pi) Q - (Q^T pi)(Q^T pi)^T) + lambda I

Each step costs O(I * D^2) (one [I, D] weighting and a D x D solve); it stops when the gradient's norm is below
``tol * (1 + n)`` (about three steps from zero on ml-100k). The catalog-sized products run in the item table's dtype
(float32 for a served model: half the time of float64 on a 41k-item catalog), the D x D Hessian, the gradient and
the solve in float64. Nothing is random and the order of operations is fixed, so the same inputs give bit-identical
vectors: the predictor and an offline call of :func:`fold_in` agree exactly.

**Why the softmax objective and not implicit-ALS least squares.** ALS's closed form (Hu, Koren & Volinsky, ICDM 2008:
``p = (Q^T Q + alpha Q_H^T Q_H + lambda I)^{-1} (1 + alpha) Q_H^T 1``) is one D x D solve, but it fits the user
vector to a squared loss the student was never trained with: it ignores the item biases, which carry popularity in a
softmax-trained MF, and its vector's scale is that of a 0/1 regression, not of the logits the biases are calibrated
against. Measured on ml-100k (``benchmarks/foldin_latency.py``: an MF-16 student trained with the full softmax, every
test user folded in from their training items alone), test NDCG@10 was 0.278 for the softmax fold-in (lambda = 3),
0.261 for the trained user vectors themselves, and 0.253 for ALS fold-in at the best (alpha, lambda) of a 3 x 3 grid
(BENCHMARKS.md). Newton converges in about three steps from zero.

**Known users.** A known user's stored vector is the prior's centre ``p0``: with an empty history the answer is the
stored vector, and each recent item pulls it towards that item the way one more training positive would (the data
term grows with n, the prior does not). A new user starts from ``p0 = 0``, so ``lambda`` is plain L2.

**Which models.** Those whose score is a dot product of a user and an item vector: MF (embeddings plus item bias),
and any model with ``user_vectors`` / ``item_vectors`` (two-tower, LightGCN), whose fold-in happens in the output
space of the user side. NeuMF's MLP score is not a dot product: :func:`item_side` returns None for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DEFAULT_L2 = 3.0  # lambda: the best of 0.3, 1, 3, 10 on ml-100k (benchmarks/foldin_latency.py, BENCHMARKS.md)
MAX_STEPS = 25
TOL = 1e-5  # Newton stops when the gradient's norm is below TOL * (1 + n)
MAX_HALVINGS = 10  # step halvings before a step is given up as below float precision


@dataclass(frozen=True)
class ItemSide:
    """What fold-in and fold-in scoring need of a model: its item vectors and biases (one dtype, the model's)."""

    vectors: Tensor  # [I, D]
    bias: Tensor  # [I] (zeros for a model without item biases)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def scores(self, users: Tensor) -> Tensor:
        """Logits [W, I] (float32, like a model's ``score_all``) of user vectors [W, D]."""
        return (users.to(self.vectors.dtype) @ self.vectors.T + self.bias).float()


def _has_vectors(model: nn.Module) -> bool:
    return callable(getattr(model, "user_vectors", None)) and callable(getattr(model, "item_vectors", None))


def item_side(model: nn.Module) -> ItemSide | None:
    """The fixed item side of a model whose score is ``<p_u, q_i> + b_i``, or None when it is not (NeuMF)."""
    with torch.inference_mode():
        if _has_vectors(model):
            q = model.item_vectors(torch.arange(model.n_items, device=_device(model)))
            return ItemSide(q.detach().clone(), torch.zeros(q.shape[0], dtype=q.dtype, device=q.device))
        if getattr(model, "name", None) == "mf":
            return ItemSide(model.item_emb.weight.detach().clone(), model.item_bias.detach().clone())
    return None


def stored_user_vectors(model: nn.Module, users: Tensor) -> Tensor:
    """The trained vectors [W, D] (float64) of known dense user ids [W], in the space of :func:`item_side`."""
    with torch.inference_mode():
        p = model.user_vectors(users) if _has_vectors(model) else model.user_emb(users)
    return p.detach().double().clone()


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def fold_in_loss(side: ItemSide, history: Tensor, p: Tensor, prior: Tensor, l2: float) -> Tensor:
    """``L(p)`` of the module docstring for one user: history [n] distinct dense item ids, p and prior [D]; the
    logits in the item table's dtype, the sum in p's."""
    s = side.vectors @ p.to(side.vectors.dtype) + side.bias  # [I]
    data = history.numel() * torch.logsumexp(s, 0).to(p.dtype) - s[history].to(p.dtype).sum()
    return data + 0.5 * l2 * (p - prior).pow(2).sum()


def fold_in(side: ItemSide, history: Tensor, prior: Tensor | None = None, *, l2: float = DEFAULT_L2,
            max_steps: int = MAX_STEPS, tol: float = TOL) -> Tensor:
    """The user vector [D] (float64) that minimises :func:`fold_in_loss`.

    ``history``: [n] dense item ids (duplicates count once; an empty history returns the prior). ``prior``: the
    known user's stored vector [D], or None for a new user (zeros). Damped Newton: each step is halved until the loss
    does not increase (at most MAX_HALVINGS times), so every step is a descent step even far from the minimum.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (it makes the problem strictly convex), got {l2}")
    q, b = side.vectors, side.bias
    f64 = dict(dtype=torch.float64, device=q.device)
    p0 = torch.zeros(side.dim, **f64) if prior is None else prior.to(**f64).clone()
    items = torch.unique(history.to(device=q.device, dtype=torch.int64))  # sorted: the order of H never matters
    n = items.numel()
    if n == 0:
        return p0
    q_h = q[items].sum(0).double()  # [D]
    eye = torch.eye(side.dim, **f64)
    p = p0.clone()
    loss = fold_in_loss(side, items, p, p0, l2)
    for _ in range(max_steps):
        pi = torch.softmax(q @ p.to(q.dtype) + b, 0)  # [I]
        mu = (q.T @ pi).double()  # [D]
        grad = n * mu - q_h + l2 * (p - p0)
        if float(grad.norm()) < tol * (1 + n):
            break
        second = ((q * pi[:, None]).T @ q).double()  # [D, D]
        hess = n * (second - torch.outer(mu, mu)) + l2 * eye  # positive definite
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        for _ in range(MAX_HALVINGS):
            candidate = p - t * step
            new_loss = fold_in_loss(side, items, candidate, p0, l2)
            if new_loss <= loss:
                break
            t *= 0.5
        else:
            break  # no descent along the Newton direction at float precision: p is the minimum
        p, loss = candidate, new_loss
    return p
