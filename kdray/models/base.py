"""The interface every recommender implements, and the building blocks the families share.

A model maps a batch of users to logits over items, either over given candidate sets (``score``) or over the whole
catalog (``score_all``); training (full softmax, sampled softmax, BPR, BCE), distillation and full-ranking evaluation
all go through these two methods, so any registered model can be a teacher or a student.

    score(users [B], items [B, C]) -> [B, C]         logits of each user's candidates
    score_all(users [B]) -> [B, n_items]             logits of the whole catalog
    score(users, items) == score_all(users).gather(1, items)   (eval mode, float tolerance)
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from kdray.errors import ConfigError
from kdray.sparse import Csr

EMBEDDING_STD = 0.1  # N(0, 0.1^2) id embeddings: MF-256 logits start with std ~0.16, small enough for any softmax


class RecModel(nn.Module):
    """Base class: users in, item logits out.

    Subclasses implement ``_score_pairs`` (per-user candidates), ``_score_items`` (one item list for the whole batch,
    the catalog by default), ``embedding_tables`` and a ``build`` classmethod that validates the options they accept.
    """

    name: ClassVar[str]
    # distill.init_from_teacher may start a student of this family from a teacher's PCA-projected vectors: true when
    # its id embedding tables carry the whole collaborative signal (NeuMF's GMF tables are only half of its score)
    pca_student: ClassVar[bool] = False

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: Sequence[int] = (), dropout: float = 0.0,
                 user_feature_dim: int = 0, item_feature_dim: int = 0):
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        self.dim = dim
        self.hidden = tuple(hidden)
        self.dropout = dropout
        self.user_feature_dim = user_feature_dim
        self.item_feature_dim = item_feature_dim

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None) -> "RecModel":
        """The model from ``build_model``'s validated arguments; raises ConfigError for options it does not take."""
        raise NotImplementedError

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Logits ``[B, C]`` of ``items [B, C]`` for ``users [B]``."""
        if items.ndim == 2 and items.shape[0] > 1 and items.stride(0) == 0:
            # One candidate set shared by every user, passed as an expanded view (sampled softmax does this): score
            # the C items once, as a slice of the catalog, instead of gathering B copies of their embeddings.
            return self._score_items(users, items[0])
        return self._score_pairs(users, items)

    def score_all(self, users: Tensor) -> Tensor:
        """Logits ``[B, n_items]`` of the whole catalog for ``users [B]``."""
        return self._score_items(users, None)

    def _score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        """Logits ``[B, C]`` of per-user candidates ``items [B, C]``."""
        raise NotImplementedError

    def _score_items(self, users: Tensor, items: Tensor | None) -> Tensor:
        """Logits ``[B, C]`` of the same items ``[C]`` for every user; ``None`` = the whole catalog in id order."""
        raise NotImplementedError

    def embedding_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        """The (user, item) id embeddings whose dot product carries the collaborative signal."""
        raise NotImplementedError

    def extra_args(self) -> dict[str, Any]:
        """``build_model`` keyword arguments of this model beyond the shared ones (``model_args`` adds them)."""
        return {}

    def with_history(self, known: Csr) -> "RecModel":
        """The model that ranks for users whose known interactions are ``known`` (users x items). A model that
        scores from its weights alone returns itself; a graph model (LightGCN) returns its weights over the graph of
        ``known``. Evaluation passes every pair it masks as seen: the training pairs on validation, the training and
        validation pairs on test (:func:`kdray.evaluate.evaluate_model`)."""
        return self

    def forward(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """``score_all(users)`` without ``items``, else ``score(users, items)``; lets DDP wrap any model."""
        return self.score_all(users) if items is None else self.score(users, items)

    def extra_repr(self) -> str:
        return f"n_users={self.n_users}, n_items={self.n_items}, dim={self.dim}"


def embedding(n: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    return table


def linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def reject_layers(name: str, hidden: tuple[int, ...], dropout: float) -> None:
    if hidden:
        raise ConfigError(f"model {name!r} has no hidden layers, but hidden={list(hidden)}; use hidden: []")
    if dropout:
        raise ConfigError(f"model {name!r} has no hidden layers to apply dropout to, but dropout={dropout}; use 0")


# ----------------------------------------------------------------------------------------------------------------
# Matrix factorisation


def mlp_tower(n_in: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``widths``, ReLU and dropout between them; the last layer stays linear so the dot
    product of two towers can take any sign."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
        layers.append(linear(n_in, width))
        n_in = width
    return nn.Sequential(*layers)
