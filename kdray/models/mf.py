"""``mf``: matrix factorisation, ``<p_u, q_i> + b_i``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdray.models.base import RecModel, embedding, reject_layers


class MF(RecModel):
    """Matrix factorisation with an item bias: ``s(u, i) = <p_u, q_i> + b_i``.

    The bias absorbs item popularity, which a full-catalog softmax otherwise has to encode in the embeddings.
    """

    name = "mf"
    pca_student = True

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__(n_users, n_items, dim)
        self.user_emb = embedding(n_users, dim)  # [U, D]
        self.item_emb = embedding(n_items, dim)  # [I, D]
        self.item_bias = nn.Parameter(torch.zeros(n_items))  # [I]

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None) -> "MF":
        reject_layers(cls.name, hidden, dropout)
        return cls(n_users, n_items, dim)

    def _score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        p = self.user_emb(users)  # [B, D]
        q = self.item_emb(items)  # [B, C, D]
        return torch.einsum("bd,bcd->bc", p, q) + self.item_bias[items]  # [B, C]

    def _score_items(self, users: Tensor, items: Tensor | None) -> Tensor:
        p = self.user_emb(users)  # [B, D]
        q, bias = self.item_emb.weight, self.item_bias  # [I, D], [I]
        if items is not None:
            q, bias = q[items], bias[items]  # [C, D], [C]
        return p @ q.T + bias  # [B, C]

    def embedding_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return self.user_emb, self.item_emb


# ----------------------------------------------------------------------------------------------------------------
# Neural collaborative filtering
