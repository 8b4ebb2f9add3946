"""``two_tower``: an MLP tower per side over ``[id embedding ; side features]``, scored by the dot product of the
tower outputs (Covington et al. RecSys 2016; Yi et al. RecSys 2019). Side features are registered buffers, so they
travel in the state dict and a checkpoint rebuilds the model alone."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from kdray.errors import ConfigError
from kdray.models.base import RecModel, embedding, mlp_tower


class TwoTower(RecModel):
    """Two towers: ``s(u, i) = <f([e_u ; x_u]), g([e_i ; x_i])>`` with ``e`` id embeddings of size ``dim``, ``x`` side
    features (fixed buffers) and ``f``, ``g`` MLPs through ``hidden`` (``()`` means one linear layer to ``dim``).

    The item tower does not depend on the user, so ``score_all`` (and ``score`` on a candidate set shared by the
    batch) runs it once per item per call and scores by one matrix product.
    """

    name = "two_tower"
    pca_student = True

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: Sequence[int], dropout: float,
                 user_features: Tensor | None, item_features: Tensor | None):
        fu = 0 if user_features is None else user_features.shape[1]
        fi = 0 if item_features is None else item_features.shape[1]
        super().__init__(n_users, n_items, dim, hidden, dropout, fu, fi)
        self.user_emb = embedding(n_users, dim)  # [U, D]
        self.item_emb = embedding(n_items, dim)  # [I, D]
        self.register_buffer("user_features", user_features)  # [U, Fu] or None
        self.register_buffer("item_features", item_features)  # [I, Fi] or None
        widths = self.hidden or (dim,)
        self.user_tower = mlp_tower(dim + fu, widths, dropout)  # [B, D + Fu] -> [B, H]
        self.item_tower = mlp_tower(dim + fi, widths, dropout)  # [.., D + Fi] -> [.., H]

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None) -> "TwoTower":
        if dropout and len(hidden) < 2:
            raise ConfigError(f"two_tower applies dropout between hidden layers, but hidden={list(hidden)} has fewer "
                              f"than two; give at least two widths or use dropout 0")
        return cls(n_users, n_items, dim, hidden, dropout, user_features, item_features)

    def user_vectors(self, users: Tensor) -> Tensor:
        x = self.user_emb(users)  # [B, D]
        if self.user_features is not None:
            x = torch.cat([x, self.user_features[users]], dim=-1)  # [B, D + Fu]
        return self.user_tower(x)  # [B, H]

    def item_vectors(self, items: Tensor) -> Tensor:
        x = self.item_emb(items)  # [..., D]
        if self.item_features is not None:
            x = torch.cat([x, self.item_features[items]], dim=-1)  # [..., D + Fi]
        return self.item_tower(x)  # [..., H]

    def _score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        return torch.einsum("bh,bch->bc", self.user_vectors(users), self.item_vectors(items))  # [B, C]

    def _score_items(self, users: Tensor, items: Tensor | None) -> Tensor:
        if items is None:
            items = torch.arange(self.n_items, device=self.item_emb.weight.device)  # [I]
        return self.user_vectors(users) @ self.item_vectors(items).T  # [B, C]

    def embedding_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return self.user_emb, self.item_emb
