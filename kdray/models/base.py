"""The model zoo: every recommender behind one interface.

A model maps a batch of users to logits over items, either over given candidate sets (``score``) or over the whole
catalog (``score_all``); training (full softmax, sampled softmax, BPR, BCE), distillation and full-ranking evaluation
all go through these two methods, so any registered model can be a teacher or a student.

    score(users [B], items [B, C]) -> [B, C]         logits of each user's candidates
    score_all(users [B]) -> [B, n_items]             logits of the whole catalog
    score(users, items) == score_all(users).gather(1, items)   (eval mode, float tolerance)

Models (``MODELS``):

- ``mf``: matrix factorisation, ``<p_u, q_i> + b_i``.
- ``neumf``: GMF + MLP fused by one output layer (He et al., "Neural Collaborative Filtering", WWW 2017).
  ``score_all`` evaluates the MLP over item chunks so memory stays bounded for large catalogs.
- ``two_tower``: an MLP tower per side over ``[id embedding ; side features]``, scored by the dot product of the
  tower outputs (Covington et al. RecSys 2016; Yi et al. RecSys 2019). Side features are registered buffers, so they
  travel in the state dict and a checkpoint rebuilds the model alone.
- ``lightgcn``: id embeddings propagated over the training graph (He et al., SIGIR 2020); kdray/models/lightgcn.py.

``model_args(model)`` returns the JSON-able keyword arguments of ``build_model`` that rebuild the architecture; the
weights (and side features) then come back through ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdray.errors import ConfigError, DataError
from kdray.sparse import Csr

EMBEDDING_STD = 0.1  # N(0, 0.1^2) id embeddings: MF-256 logits start with std ~0.16, small enough for any softmax

__all__ = [
    "MODELS",
    "LightGCN",
    "MF",
    "NeuMF",
    "RecModel",
    "TwoTower",
    "build_model",
    "count_parameters",
    "embedding_tables",
    "model_args",
]


class RecModel(nn.Module):
    """Base class: users in, item logits out.

    Subclasses implement ``_score_pairs`` (per-user candidates), ``_score_items`` (one item list for the whole batch,
    the catalog by default), ``embedding_tables`` and a ``build`` classmethod that validates the options they accept.
    """

    name: ClassVar[str]

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

    def forward(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """``score_all(users)`` without ``items``, else ``score(users, items)``; lets DDP wrap any model."""
        return self.score_all(users) if items is None else self.score(users, items)

    def extra_repr(self) -> str:
        return f"n_users={self.n_users}, n_items={self.n_items}, dim={self.dim}"


def _embedding(n: int, dim: int) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    return table


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _reject(name: str, hidden: tuple[int, ...], dropout: float) -> None:
    if hidden:
        raise ConfigError(f"model {name!r} has no hidden layers, but hidden={list(hidden)}; use hidden: []")
    if dropout:
        raise ConfigError(f"model {name!r} has no hidden layers to apply dropout to, but dropout={dropout}; use 0")


# ----------------------------------------------------------------------------------------------------------------
# Matrix factorisation


class MF(RecModel):
    """Matrix factorisation with an item bias: ``s(u, i) = <p_u, q_i> + b_i``.

    The bias absorbs item popularity, which a full-catalog softmax otherwise has to encode in the embeddings.
    """

    name = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__(n_users, n_items, dim)
        self.user_emb = _embedding(n_users, dim)  # [U, D]
        self.item_emb = _embedding(n_items, dim)  # [I, D]
        self.item_bias = nn.Parameter(torch.zeros(n_items))  # [I]

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None) -> "MF":
        _reject(cls.name, hidden, dropout)
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
        self.gmf_user = _embedding(n_users, dim)  # [U, D]
        self.gmf_item = _embedding(n_items, dim)  # [I, D]
        self.mlp_user = _embedding(n_users, dim)  # [U, D]
        self.mlp_item = _embedding(n_items, dim)  # [I, D]
        widths = (2 * dim, *self.hidden)
        self.mlp = nn.ModuleList(_linear(a, b) for a, b in zip(widths[:-1], widths[1:]))  # 2D -> H1 -> ... -> Hn
        self.drop = nn.Dropout(dropout)
        self.out = _linear(dim + self.hidden[-1], 1)  # h = [h_gmf (D) ; h_mlp (Hn)]

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


def _tower(n_in: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``widths``, ReLU and dropout between them; the last layer stays linear so the dot
    product of two towers can take any sign."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
        layers.append(_linear(n_in, width))
        n_in = width
    return nn.Sequential(*layers)


class TwoTower(RecModel):
    """Two towers: ``s(u, i) = <f([e_u ; x_u]), g([e_i ; x_i])>`` with ``e`` id embeddings of size ``dim``, ``x`` side
    features (fixed buffers) and ``f``, ``g`` MLPs through ``hidden`` (``()`` means one linear layer to ``dim``).

    The item tower does not depend on the user, so ``score_all`` (and ``score`` on a candidate set shared by the
    batch) runs it once per item per call and scores by one matrix product.
    """

    name = "two_tower"

    def __init__(self, n_users: int, n_items: int, dim: int, hidden: Sequence[int], dropout: float,
                 user_features: Tensor | None, item_features: Tensor | None):
        fu = 0 if user_features is None else user_features.shape[1]
        fi = 0 if item_features is None else item_features.shape[1]
        super().__init__(n_users, n_items, dim, hidden, dropout, fu, fi)
        self.user_emb = _embedding(n_users, dim)  # [U, D]
        self.item_emb = _embedding(n_items, dim)  # [I, D]
        self.register_buffer("user_features", user_features)  # [U, Fu] or None
        self.register_buffer("item_features", item_features)  # [I, Fi] or None
        widths = self.hidden or (dim,)
        self.user_tower = _tower(dim + fu, widths, dropout)  # [B, D + Fu] -> [B, H]
        self.item_tower = _tower(dim + fi, widths, dropout)  # [.., D + Fi] -> [.., H]

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


from kdray.models.lightgcn import DEFAULT_LAYERS, LightGCN  # noqa: E402  (subclasses RecModel, defined above)

MODELS: dict[str, type[RecModel]] = {"mf": MF, "neumf": NeuMF, "two_tower": TwoTower, "lightgcn": LightGCN}


# ----------------------------------------------------------------------------------------------------------------
# Building, describing, counting


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _side_features(array: np.ndarray | Tensor | None, declared_dim: int, n_rows: int, side: str) -> Tensor | None:
    """The ``[n_rows, F]`` float32 buffer for one side, zeros of the declared width when no array is given (the
    values then come from ``load_state_dict``), or None when the side has no features."""
    if array is None:
        if declared_dim < 0:
            raise ConfigError(f"{side}_feature_dim must be >= 0, got {declared_dim}")
        return torch.zeros(n_rows, declared_dim) if declared_dim else None
    x = torch.as_tensor(array).detach().to(dtype=torch.float32, device="cpu").clone()
    if x.ndim != 2 or x.shape[0] != n_rows:
        raise DataError(f"{side}_features must be a [{n_rows}, F] matrix (one row per {side}), got {tuple(x.shape)}")
    if declared_dim and x.shape[1] != declared_dim:
        raise DataError(f"{side}_features has {x.shape[1]} columns but {side}_feature_dim={declared_dim}")
    bad = (~torch.isfinite(x)).any(dim=1).nonzero()
    if bad.numel():
        raise DataError(f"{side}_features row {int(bad[0])} contains NaN or infinite values")
    return x if x.shape[1] else None


def build_model(name: str, *, n_users: int, n_items: int, dim: int, hidden: Sequence[int] = (),
                dropout: float = 0.0, user_features: np.ndarray | Tensor | None = None,
                item_features: np.ndarray | Tensor | None = None, user_feature_dim: int = 0,
                item_feature_dim: int = 0, graph: Csr | tuple[np.ndarray, np.ndarray] | None = None,
                n_layers: int = DEFAULT_LAYERS, n_edges: int = 0) -> RecModel:
    """Builds a registered model, initialised from the current torch seed.

    ``user_features [n_users, Fu]`` / ``item_features [n_items, Fi]`` are used by ``two_tower`` only (ignored, and not
    stored, by the others). When the arrays are absent but ``*_feature_dim`` is set (a model rebuilt from
    ``model_args``), zero buffers of that width are allocated for ``load_state_dict`` to fill.

    ``graph`` (the training split as a Csr or ``(users, items)`` arrays), ``n_layers`` and ``n_edges`` are used by
    ``lightgcn`` only, the same way: its edges are a buffer, ``n_edges`` zero edges when no graph is given.
    """
    if name not in MODELS:
        raise ConfigError(f"model name {name!r} is not one of {sorted(MODELS)}")
    n_users = _positive_int(n_users, "n_users")
    n_items = _positive_int(n_items, "n_items")
    dim = _positive_int(dim, "dim")
    hidden = tuple(_positive_int(h, "hidden width") for h in hidden)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    uses_features = name == "two_tower"
    graph_args = dict(graph=graph, n_layers=n_layers, n_edges=n_edges) if name == "lightgcn" else {}
    return MODELS[name].build(
        n_users=n_users, n_items=n_items, dim=dim, hidden=hidden, dropout=float(dropout),
        user_features=_side_features(user_features, user_feature_dim, n_users, "user") if uses_features else None,
        item_features=_side_features(item_features, item_feature_dim, n_items, "item") if uses_features else None,
        **graph_args,
    )


def _unwrap(model: nn.Module) -> RecModel:
    """The model itself, under a DistributedDataParallel (or similar ``.module``) wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, RecModel):
        raise TypeError(f"expected a kdray RecModel, got {type(inner).__name__}")
    return inner


def model_args(model: nn.Module) -> dict[str, Any]:
    """JSON-able keyword arguments such that ``build_model(**model_args(m))`` rebuilds ``m``'s architecture."""
    m = _unwrap(model)
    return {"name": m.name, "n_users": m.n_users, "n_items": m.n_items, "dim": m.dim, "hidden": list(m.hidden),
            "dropout": m.dropout, "user_feature_dim": m.user_feature_dim, "item_feature_dim": m.item_feature_dim,
            **m.extra_args()}


def count_parameters(model: nn.Module) -> int:
    """Number of learned parameters (side-feature buffers excluded). ``requires_grad`` is ignored so that a frozen
    teacher counts the same as when it was trained."""
    return sum(p.numel() for p in model.parameters())


def embedding_tables(model: nn.Module) -> tuple[nn.Embedding, nn.Embedding]:
    """The (user, item) id embeddings of a model, e.g. for the PCA teacher-to-student initialisation."""
    return _unwrap(model).embedding_tables()
