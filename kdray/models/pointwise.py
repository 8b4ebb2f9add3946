"""Pointwise recommenders: (user, item, categorical fields, numeric features) in, one output per task out.

    forward(batch) -> {"like": logits [B], "rating": predictions [B]}   (the heads the model was built with)

    batch = {"user": [B] int64, "item": [B] int64, "cat": [B, n_cat] int64 per-field ids (0 = unknown),
             "num": [B, n_num] float32 (normalised upstream), ...}        (other keys, e.g. labels, are ignored)

Models (``POINTWISE_MODELS``), each ``input -> bottom vector -> heads``:

- ``dcnv2``, the deep teacher: DCN-v2 (Wang et al., WWW 2021), a cross network and a deep network over
  ``x_0 = [field embeddings ; numeric features]``, in parallel (outputs concatenated) or stacked, then shared-bottom
  towers or MMoE (Ma et al., KDD 2018) for the heads.
- ``mlp``, a narrow MLP over the same ``x_0`` with the same choice of heads.
- ``fm``, a factorization machine (Rendle, ICDM 2010) over the same fields and numeric features.
- ``mf``, id-only matrix factorisation with user, item and global biases (Koren et al., IEEE Computer 2009).

``fm`` and ``mf`` score each head by a linear map of ``[pairwise factor vector ; first-order sum]`` whose weights
start at 1, so at initialisation every head is exactly the textbook model; heads then share the factors with their
own weight on each factor.

``build_pointwise_model(name, **args)`` builds one, and ``pointwise_model_args(model)`` returns the JSON-able
arguments (defaults filled in) that rebuild its architecture, so a checkpoint restores it with ``weights_only`` loads.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kdray.errors import ConfigError
from kdray.models.pointwise_layers import (
    EMBEDDING_STD,
    HEADS,
    CrossNetwork,
    FieldEmbedding,
    MMoEHeads,
    SharedBottomHeads,
    mlp,
)

MULTITASK = ("shared_bottom", "mmoe")
STRUCTURES = ("parallel", "stacked")

__all__ = [
    "FM",
    "MULTITASK",
    "POINTWISE_MODELS",
    "STRUCTURES",
    "BiasedMF",
    "DCNv2",
    "NarrowMLP",
    "PointwiseModel",
    "build_pointwise_model",
    "pointwise_model_args",
]


class PointwiseModel(nn.Module):
    """Base class: a batch dict in, ``{head: [B]}`` out. ``init_args`` holds the (complete) constructor arguments."""

    name: ClassVar[str]
    heads: tuple[str, ...]
    init_args: dict[str, Any]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


def _choice(value: str, allowed: Sequence[str], key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value


def _multitask_heads(kind: str, n_in: int, heads: Sequence[str], tower: Sequence[int], n_experts: int,
                     expert_hidden: Sequence[int], dropout: float, rating_init: float) -> nn.Module:
    if _choice(kind, MULTITASK, "multitask") == "mmoe":
        if n_experts < 1:
            raise ConfigError(f"n_experts must be >= 1 for multitask='mmoe', got {n_experts}")
        return MMoEHeads(n_in, heads, n_experts, expert_hidden, tower, dropout, rating_init)
    return SharedBottomHeads(n_in, heads, tower, dropout, rating_init)


def _x0(fields: FieldEmbedding, batch: dict[str, Tensor]) -> Tensor:
    """``[flattened field embeddings ; numeric features]``: [B, F * D + n_num]."""
    return torch.cat([fields(batch).flatten(1), batch["num"].to(fields.table.weight.dtype)], dim=1)


class DCNv2(PointwiseModel):
    """DCN-v2 (Wang et al., WWW 2021): ``z = [cross(x_0) ; deep(x_0)]`` (parallel) or ``z = deep(cross(x_0))``
    (stacked), with ``cross`` the full-rank cross network of ``cross_layers`` layers and ``deep`` an MLP through
    ``hidden``; then the heads (``multitask``: shared-bottom towers through ``tower``, or MMoE with ``n_experts``
    experts through ``expert_hidden``)."""

    name = "dcnv2"

    def __init__(self, n_users: int, n_items: int, cardinalities: Sequence[int] = (), n_num: int = 0,
                 heads: Sequence[str] = ("like",), dim: int = 16, cross_layers: int = 3,
                 hidden: Sequence[int] = (256, 128), structure: str = "parallel", multitask: str = "shared_bottom",
                 tower: Sequence[int] = (), n_experts: int = 4, expert_hidden: Sequence[int] = (64,),
                 dropout: float = 0.0, rating_init: float = 0.0):
        super().__init__()
        self.heads = tuple(heads)
        self.structure = _choice(structure, STRUCTURES, "structure")
        self.fields = FieldEmbedding((n_users, n_items, *cardinalities), dim)
        d0 = (2 + len(cardinalities)) * dim + n_num
        self.cross = CrossNetwork(d0, cross_layers)
        self.deep = mlp(d0, hidden, dropout)
        deep_out = hidden[-1] if hidden else d0
        n_out = d0 + deep_out if self.structure == "parallel" else deep_out
        self.out = _multitask_heads(multitask, n_out, self.heads, tower, n_experts, expert_hidden, dropout,
                                    rating_init)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = _x0(self.fields, batch)
        if self.structure == "parallel":
            z = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        else:
            z = self.deep(self.cross(x0))
        return self.out(z)


class NarrowMLP(PointwiseModel):
    """A small MLP student over the teacher's input ``x_0`` (smaller ``dim``, narrow ``hidden``), with the same
    choice of multi-task heads."""

    name = "mlp"

    def __init__(self, n_users: int, n_items: int, cardinalities: Sequence[int] = (), n_num: int = 0,
                 heads: Sequence[str] = ("like",), dim: int = 8, hidden: Sequence[int] = (32,),
                 multitask: str = "shared_bottom", tower: Sequence[int] = (), n_experts: int = 2,
                 expert_hidden: Sequence[int] = (16,), dropout: float = 0.0, rating_init: float = 0.0):
        super().__init__()
        self.heads = tuple(heads)
        self.fields = FieldEmbedding((n_users, n_items, *cardinalities), dim)
        d0 = (2 + len(cardinalities)) * dim + n_num
        self.bottom = mlp(d0, hidden, dropout)
        self.out = _multitask_heads(multitask, hidden[-1] if hidden else d0, self.heads, tower, n_experts,
                                    expert_hidden, dropout, rating_init)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.out(self.bottom(_x0(self.fields, batch)))


class _FactorHeads(nn.Module):
    """``y_k = a_k^T v + c_k * s + b_k`` per head for a factor vector ``v [B, D]`` and a first-order sum ``s [B]``,
    with ``a_k = 1``, ``c_k = 1`` and ``b_k = 0`` (``rating_init`` for the rating head) at initialisation."""

    def __init__(self, dim: int, heads: Sequence[str], rating_init: float):
        super().__init__()
        self.heads = tuple(heads)
        self.weight = nn.Parameter(torch.ones(len(self.heads), dim + 1))  # [H, D + 1]
        self.bias = nn.Parameter(torch.tensor([rating_init if h == "rating" else 0.0 for h in self.heads]))  # [H]

    def forward(self, v: Tensor, s: Tensor) -> dict[str, Tensor]:
        y = torch.cat([v, s.unsqueeze(1)], dim=1) @ self.weight.T + self.bias  # [B, H]
        return {head: y[:, k] for k, head in enumerate(self.heads)}


class FM(PointwiseModel):
    """Factorization machine (Rendle, "Factorization Machines", ICDM 2010), degree 2:

    ``y = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j``

    over the one-hot user, item and categorical fields (``x_i = 1``) and the numeric features (``x_i`` as given),
    with the pairwise term in ``O(n D)``: ``sum_{i<j} <v_i, v_j> x_i x_j = 1/2 * sum_f [(sum_i v_if x_i)^2 -
    sum_i v_if^2 x_i^2]`` (the per-factor vector inside the sum is He & Chua's bi-interaction pooling, SIGIR 2017).
    """

    name = "fm"

    def __init__(self, n_users: int, n_items: int, cardinalities: Sequence[int] = (), n_num: int = 0,
                 heads: Sequence[str] = ("like",), dim: int = 8, rating_init: float = 0.0):
        super().__init__()
        self.heads = tuple(heads)
        self.fields = FieldEmbedding((n_users, n_items, *cardinalities), dim)
        self.first_order = nn.Embedding(sum(self.fields.sizes), 1)  # w_i of the one-hot fields
        nn.init.zeros_(self.first_order.weight)
        self.num_factors = nn.Parameter(torch.randn(n_num, dim) * EMBEDDING_STD)  # v_i of the numeric features [n_num, D]
        self.num_weights = nn.Parameter(torch.zeros(n_num))  # [n_num]
        self.out = _FactorHeads(dim, self.heads, rating_init)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        num = batch["num"].to(self.num_weights.dtype)  # [B, n_num]
        terms = torch.cat([self.fields(batch), num.unsqueeze(-1) * self.num_factors], dim=1)  # [B, F + n_num, D]
        pairwise = 0.5 * (terms.sum(dim=1).square() - terms.square().sum(dim=1))  # [B, D]
        first = self.first_order(self.fields.ids(batch)).sum(dim=(1, 2)) + num @ self.num_weights  # [B]
        return self.out(pairwise, first)


class BiasedMF(PointwiseModel):
    """Id-only matrix factorisation with biases (Koren, Bell & Volinsky, IEEE Computer 2009):
    ``y = mu + b_u + b_i + <p_u, q_i>``. Categorical and numeric features are not used; ``cardinalities`` and
    ``n_num`` are only recorded so that every model of a run is built from the same arguments."""

    name = "mf"

    def __init__(self, n_users: int, n_items: int, cardinalities: Sequence[int] = (), n_num: int = 0,
                 heads: Sequence[str] = ("like",), dim: int = 16, rating_init: float = 0.0):
        super().__init__()
        self.heads = tuple(heads)
        self.user_emb = FieldEmbedding((n_users,), dim).table  # [U, D]
        self.item_emb = FieldEmbedding((n_items,), dim).table  # [I, D]
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.out = _FactorHeads(dim, self.heads, rating_init)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        u, i = batch["user"], batch["item"]
        bias = self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1)  # [B]
        return self.out(self.user_emb(u) * self.item_emb(i), bias)


POINTWISE_MODELS: dict[str, type[PointwiseModel]] = {m.name: m for m in (DCNv2, NarrowMLP, FM, BiasedMF)}


# ----------------------------------------------------------------------------------------------------------------
# Building and describing


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _widths(value: Any, key: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{key} must be a list of positive integers, got {value!r}")
    return [_positive_int(v, f"{key} entry") for v in value]


def _validate(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Checks and normalises every argument by its name; lists stay lists so the result is JSON-able."""
    out = dict(args)
    for key in ("n_users", "n_items", "dim", "n_experts"):
        if key in out:
            out[key] = _positive_int(out[key], key)
    for key in ("n_num", "cross_layers"):
        if key in out:
            out[key] = _positive_int(out[key], key, minimum=0)
    for key in ("cardinalities", "hidden", "tower", "expert_hidden"):
        if key in out:
            out[key] = _widths(out[key], key)
    heads = out["heads"]
    if isinstance(heads, str) or not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
        raise ConfigError(f"heads must be a non-empty list of distinct values from {list(HEADS)}, got {heads!r}")
    out["heads"] = [h for h in HEADS if h in heads]  # canonical order
    if "dropout" in out and not 0.0 <= float(out["dropout"]) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {out['dropout']}")
    if name == "mlp" and not out["hidden"]:
        raise ConfigError("model 'mlp' needs at least one hidden width, got hidden=[]")
    for key in ("dropout", "rating_init"):
        if key in out:
            out[key] = float(out[key])
    return out


def build_pointwise_model(name: str, **args: Any) -> PointwiseModel:
    """Builds a registered pointwise model, initialised from the current torch seed. ``args`` are the model's
    constructor arguments (``n_users``, ``n_items`` required; ``cardinalities``, ``n_num``, ``heads`` and the model's
    own options optional); an unknown or invalid argument raises ConfigError naming it and the allowed ones."""
    if name not in POINTWISE_MODELS:
        raise ConfigError(f"pointwise model name {name!r} is not one of {sorted(POINTWISE_MODELS)}")
    cls = POINTWISE_MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self"]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"pointwise model {name!r} has no option {unknown[0]!r}; allowed: {allowed}")
    missing = [p for p in ("n_users", "n_items") if p not in args]
    if missing:
        raise ConfigError(f"pointwise model {name!r} needs {missing[0]!r}")
    full = {p: args.get(p, params[p].default) for p in allowed}
    full = _validate(name, {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()})
    model = cls(**full)
    model.init_args = full
    return model


def pointwise_model_args(model: nn.Module) -> dict[str, Any]:
    """JSON-able keyword arguments such that ``build_pointwise_model(**pointwise_model_args(m))`` rebuilds ``m``'s
    architecture (unwraps DistributedDataParallel's ``.module``)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, PointwiseModel):
        raise TypeError(f"expected a kdray PointwiseModel, got {type(inner).__name__}")
    return {"name": inner.name, **inner.init_args}
