"""The model zoo: every recommender behind one interface (:class:`kdray.models.base.RecModel`), and the registry
that builds them by name. A new family is one file beside these and one line in ``MODELS``.

Models (``MODELS``):

- ``mf``: matrix factorisation (:mod:`kdray.models.mf`);
- ``neumf``: GMF + MLP (:mod:`kdray.models.neumf`);
- ``two_tower``: an MLP tower per side over ids and side features (:mod:`kdray.models.two_tower`);
- ``lightgcn``: id embeddings propagated over the training graph (He et al., SIGIR 2020; :mod:`kdray.models.lightgcn`).

``model_args(model)`` returns the JSON-able keyword arguments of ``build_model`` that rebuild the architecture; the
weights (and side features) then come back through ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdray.errors import ConfigError, DataError
from kdray.models.base import RecModel
from kdray.models.lightgcn import DEFAULT_LAYERS, LightGCN
from kdray.models.mf import MF
from kdray.models.neumf import NeuMF
from kdray.models.two_tower import TwoTower
from kdray.sparse import Csr

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
    "model_from_config",
    "model_args",
]


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
                n_layers: int = DEFAULT_LAYERS, n_edges: int = 0, cosine_temperature: float = 0.0) -> RecModel:
    """Builds a registered model, initialised from the current torch seed.

    ``user_features [n_users, Fu]`` / ``item_features [n_items, Fi]`` are used by ``two_tower`` only (ignored, and not
    stored, by the others). When the arrays are absent but ``*_feature_dim`` is set (a model rebuilt from
    ``model_args``), zero buffers of that width are allocated for ``load_state_dict`` to fill.

    ``graph`` (the training split as a Csr or ``(users, items)`` arrays), ``n_layers`` and ``n_edges`` are used by
    ``lightgcn`` only, the same way: its edges are a buffer, ``n_edges`` zero edges when no graph is given.
    ``cosine_temperature`` > 0 makes a ``lightgcn`` score by cosine / temperature; the other models refuse it.
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
    if cosine_temperature and name != "lightgcn":
        raise ConfigError(f"cosine_temperature={cosine_temperature} is a lightgcn option; model {name!r} scores by "
                          "its own function: leave it at 0")
    graph_args = dict(graph=graph, n_layers=n_layers, n_edges=n_edges,
                      cosine_temperature=cosine_temperature) if name == "lightgcn" else {}
    return MODELS[name].build(
        n_users=n_users, n_items=n_items, dim=dim, hidden=hidden, dropout=float(dropout),
        user_features=_side_features(user_features, user_feature_dim, n_users, "user") if uses_features else None,
        item_features=_side_features(item_features, item_feature_dim, n_items, "item") if uses_features else None,
        **graph_args,
    )


def model_from_config(m: Any, data: Any) -> RecModel:
    """The model a ``ModelConfig`` (``cfg.teacher`` / ``cfg.student``) describes, sized to ``data`` (a
    ``PreparedData``: its user and item counts, side features and training split, which is a LightGCN's graph).
    The one place a config becomes a model."""
    return build_model(m.name, n_users=data.n_users, n_items=data.n_items, dim=m.dim, hidden=tuple(m.hidden),
                       dropout=m.dropout, user_features=data.user_features, item_features=data.item_features,
                       graph=data.train, cosine_temperature=m.cosine_temperature)


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
