"""``neumf``: GMF + MLP fused by one output layer (He et al., "Neural Collaborative Filtering", WWW 2017).
``score_all`` evaluates the MLP over item chunks so memory stays bounded for large catalogs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from kdray.models.base import RecModel, embedding, linear


class NeuMF(RecModel):
    """NeuMF (He et al., WWW 2017): a GMF branch and an MLP branch with separate embeddings, fused by one linear
    output layer ``s(u, i) = h^T [p_u ⊙ q_i ; MLP([p'_u ; q'_i])] + b``.

    ``hidden`` are the MLP widths (ReLU and dropout after each); ``()`` means the paper's halving tower
    ``(dim, dim // 2)`` over the ``2 * dim`` concatenated MLP embeddings, and ``model_args`` records the widths used.

    The first MLP layer is linear in the concatenation, ``W [p' ; q'] = W_u p' + W_i q'``, so the user and item halves
    are projected separately and summed by broadcasting: ``score_all`` never builds the ``[B, I, 2D]`` input, and the
    ``[B, chunk, H]`` activations are bounded by ``max_block_elements`` per item chunk.
    """

    name = "neumf"
    max_block_elements: int = 1 << 24  # activations per item chunk in score_all (64 MB of float32)

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: Sequence[int], dropout: float):
        super().__init__(n_users, n_items, dim, hidden, dropout)
        self.gmf_user = embedding(n_users, dim)  # [U, D]
        self.gmf_item = embedding(n_items, dim)  # [I, D]
        self.mlp_user = embedding(n_users, dim)  # [U, D]
        self.mlp_item = embedding(n_items, dim)  # [I, D]
        widths = (2 * dim, *self.hidden)
        self.mlp = nn.ModuleList(linear(a, b) for a, b in zip(widths[:-1], widths[1:]))  # 2D -> H1 -> ... -> Hn
        self.drop = nn.Dropout(dropout)
        self.out = linear(dim + self.hidden[-1], 1)  # h = [h_gmf (D) ; h_mlp (Hn)]

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None) -> "NeuMF":
        return cls(n_users, n_items, dim, hidden or (dim, max(1, dim // 2)), dropout)

    def _mlp_tail(self, h: Tensor) -> Tensor:
        """The MLP after its first layer's pre-activation ``h [..., H1]``, reduced by the output weights: [...]."""
        h = self.drop(torch.relu(h))
        for layer in self.mlp[1:]:
            h = self.drop(torch.relu(layer(h)))
        return h @ self.out.weight[0, self.dim :]  # [...]

    def _first_layer_halves(self) -> tuple[Tensor, Tensor]:
        w = self.mlp[0].weight  # [H1, 2D]
        return w[:, : self.dim], w[:, self.dim :]  # user half [H1, D], item half [H1, D]

    def _score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        h_gmf = self.out.weight[0, : self.dim]  # [D]
        gmf = torch.einsum("bd,bcd->bc", self.gmf_user(users) * h_gmf, self.gmf_item(items))  # [B, C]
        w_u, w_i = self._first_layer_halves()
        hu = self.mlp_user(users) @ w_u.T + self.mlp[0].bias  # [B, H1]
        hi = self.mlp_item(items) @ w_i.T  # [B, C, H1]
        mlp = self._mlp_tail(hu.unsqueeze(1) + hi)  # [B, C]
        return gmf + mlp + self.out.bias

    def _score_items(self, users: Tensor, items: Tensor | None) -> Tensor:
        q_gmf, q_mlp = self.gmf_item.weight, self.mlp_item.weight  # [I, D] each
        if items is not None:
            q_gmf, q_mlp = q_gmf[items], q_mlp[items]  # [C, D] each
        h_gmf = self.out.weight[0, : self.dim]  # [D]
        gmf = (self.gmf_user(users) * h_gmf) @ q_gmf.T  # [B, C]
        w_u, w_i = self._first_layer_halves()
        hu = (self.mlp_user(users) @ w_u.T + self.mlp[0].bias).unsqueeze(1)  # [B, 1, H1]
        chunk = max(1, self.max_block_elements // max(1, users.shape[0] * max(self.hidden)))
        parts = []
        for start in range(0, q_mlp.shape[0], chunk):
            hi = q_mlp[start : start + chunk] @ w_i.T  # [c, H1]
            parts.append(self._mlp_tail(hu + hi.unsqueeze(0)))  # [B, c]
        mlp = torch.cat(parts, dim=1) if parts else gmf.new_zeros(gmf.shape)
        return gmf + mlp + self.out.bias  # [B, C]

    def embedding_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return self.gmf_user, self.gmf_item


# ----------------------------------------------------------------------------------------------------------------
# Two towers over ids and side features
