"""Building blocks of the pointwise (feature) models: field embeddings, the DCN-v2 cross network, MLPs, and the two
multi-task heads (shared-bottom and MMoE).

A pointwise model is ``input -> bottom -> heads``: ``FieldEmbedding`` turns the ids of a batch into one vector per
field, a bottom (cross network, MLP) turns them into one vector per row, and a head module turns that vector into one
output per task (``like``: a logit; ``rating``: a real value). Keeping the three apart lets any bottom be combined with
either multi-task head.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

EMBEDDING_STD = 0.05  # N(0, 0.05^2) field embeddings: the cross network's products stay near 1 at initialisation
HEADS = ("like", "rating")  # the tasks a pointwise model can predict, in canonical order

__all__ = ["EMBEDDING_STD", "HEADS", "CrossNetwork", "FieldEmbedding", "MMoEHeads", "SharedBottomHeads", "mlp"]


def linear(n_in: int, n_out: int) -> nn.Linear:
    """A Xavier-initialised linear layer with a zero bias."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(n_in: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout`` through ``widths`` (every layer activated: the output feeds another layer).
    ``()`` is the identity."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [linear(n_in, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = width
    return nn.Sequential(*layers)


class FieldEmbedding(nn.Module):
    """One embedding per field: the user id, the item id and each categorical field, from one table in which each
    field owns a contiguous block of rows (``offsets``). Ids must lie in ``[0, size)`` of their field; the data
    layer guarantees it (id 0 of a categorical field is its "unknown" value).

    Shape:
        user, item: [B] int64; cat: [B, n_cat] int64; output: [B, 2 + n_cat, dim].
    """

    def __init__(self, sizes: Sequence[int], dim: int):
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        starts = torch.tensor((0, *self.sizes[:-1]), dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", starts, persistent=False)  # [F]
        self.table = nn.Embedding(sum(self.sizes), dim)
        nn.init.normal_(self.table.weight, std=EMBEDDING_STD)

    def ids(self, batch: dict[str, Tensor]) -> Tensor:
        """The global row of every field of every example: [B, F]."""
        fields = torch.cat([batch["user"].unsqueeze(1), batch["item"].unsqueeze(1), batch["cat"]], dim=1)
        return fields + self.offsets

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.table(self.ids(batch))  # [B, F, D]


class CrossNetwork(nn.Module):
    """The DCN-v2 cross network (Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021, eq. 1):

    ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` for ``l = 0..L-1``, with full-rank ``W_l [d, d]``.

    Each layer raises the polynomial degree of the feature crosses by one; the residual keeps the lower degrees.

    Shape:
        x0: [B, d]; output: [B, d].
    """

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


def _towers(n_in: int, heads: Sequence[str], tower: Sequence[int], dropout: float,
            rating_init: float) -> nn.ModuleDict:
    """One ``mlp(tower) -> Linear(., 1)`` per head; the rating head's output bias starts at ``rating_init`` (e.g. the
    training mean) so the first steps learn the preferences, not the offset."""
    towers = nn.ModuleDict()
    for head in heads:
        out = linear(tower[-1] if tower else n_in, 1)
        if head == "rating":
            nn.init.constant_(out.bias, rating_init)
        towers[head] = nn.Sequential(mlp(n_in, tower, dropout), out)
    return towers


class SharedBottomHeads(nn.Module):
    """Shared-bottom multi-task learning (Caruana, "Multitask Learning", 1997): every task reads the same bottom
    vector through its own tower, ``y_k = tower_k(z)``.

    Shape:
        z: [B, n_in]; output: {head: [B]}.
    """

    def __init__(self, n_in: int, heads: Sequence[str], tower: Sequence[int], dropout: float,
                 rating_init: float = 0.0):
        super().__init__()
        self.towers = _towers(n_in, heads, tower, dropout, rating_init)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return {head: tower(z).squeeze(-1) for head, tower in self.towers.items()}


class MMoEHeads(nn.Module):
    """Multi-gate mixture of experts (Ma et al., "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018, eq. 5-6):

    ``f_k(z) = sum_e softmax(G_k z)_e * expert_e(z)``, ``y_k = tower_k(f_k(z))``

    with ``E`` expert MLPs shared by all tasks and one linear gate ``G_k [E, n_in]`` per task, so each task weighs the
    experts by itself and loosely related tasks need not share one representation.

    Shape:
        z: [B, n_in]; output: {head: [B]}.
    """

    def __init__(self, n_in: int, heads: Sequence[str], n_experts: int, expert: Sequence[int],
                 tower: Sequence[int], dropout: float, rating_init: float = 0.0):
        super().__init__()
        self.experts = nn.ModuleList(mlp(n_in, expert, dropout) for _ in range(n_experts))
        self.gates = nn.ModuleDict({head: linear(n_in, n_experts) for head in heads})
        self.towers = _towers(expert[-1] if expert else n_in, heads, tower, dropout, rating_init)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        experts = torch.stack([e(z) for e in self.experts], dim=1)  # [B, E, H]
        out = {}
        for head, tower in self.towers.items():
            g = torch.softmax(self.gates[head](z), dim=-1)  # [B, E]
            out[head] = tower(torch.einsum("be,beh->bh", g, experts)).squeeze(-1)
        return out
