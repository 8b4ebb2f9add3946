"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", SIGIR 2020).

Id embeddings ``E0 = [E_users ; E_items]`` are smoothed over the user–item bipartite graph of the training
interactions, with no feature transform and no non-linearity:

    A = [[0, R], [R^T, 0]]                  [(U + I), (U + I)], R the [U, I] 0/1 interaction matrix
    Â = D^-1/2 A D^-1/2                      Â_{u,i} = Â_{i,u} = 1 / sqrt(|N_u| |N_i|) for every training pair (u, i)
    E_{k+1} = Â E_k,   k = 0 .. K - 1
    E = (E_0 + E_1 + ... + E_K) / (K + 1)    (the paper's alpha_k = 1 / (K + 1))
    s(u, i) = <e_u, e_i>                     cosine_temperature = 0 (the paper)
    s(u, i) = cos(e_u, e_i) / t              cosine_temperature = t > 0

The cosine form keeps every logit within [-1/t, 1/t], so the softmax's sharpness is the temperature's, not the
vectors' norms'; the final tables are normalised (the user table also divided by t), so scoring, a teacher's logits
and the PCA start of a student all see the same scores.

The graph travels in the state dict. Its edges are an int64 buffer ``graph_edges [2, E]`` (row 0 users, row 1
items), so a checkpoint (``model.pt`` loaded with ``weights_only=True``, ``model.json`` with ``n_layers`` and
``n_edges``) rebuilds the model with no access to the training split, the serving path needs nothing new, and the
driver's initial state sent to Ray Train workers carries the graph once to every worker. The normalised sparse
matrix ``Â`` is derived from the edges on first use on each device and kept as a plain attribute (a sparse tensor in
the state dict would need sparse support in every consumer of state dicts), in CSR layout.

Propagation is most of a LightGCN step's cost. With torch's COO layout and its autograd backward, the six sparse
products of a 3-layer step (forward and backward) took more than half of a training step on Gowalla on 2 CPU cores.
In CSR the product is several times faster, and since ``Â`` is symmetric the backward pass is one more ``Â @ grad``
(:class:`SymmetricSpmm`) instead of autograd's transpose of a sparse matrix: a whole step became 2.0x faster with the
same loss and gradients (BENCHMARKS.md, ``benchmarks/lightgcn_step.py``). DDP is told to ignore the edge buffer:
every worker holds the same graph, so it is neither broadcast at wrap time nor before every forward pass; the
gradients of the id embeddings are the only thing DDP synchronises.

Training (``model.train()``, or gradients wanted) propagates once per forward pass, as the paper does. Inference
(``eval()`` and no gradient wanted) propagates once and caches the final tables until a parameter changes (an
optimiser step or ``load_state_dict`` bumps the tensors' version counters), the edges change, or ``train()`` is
called: full-ranking evaluation and a frozen teacher score every user batch against the cached tables.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdray.errors import ConfigError, DataError
from kdray.models.base import RecModel, embedding
from kdray.sparse import Csr

DEFAULT_LAYERS = 3  # the paper's setting for its Gowalla / Yelp2018 / Amazon-Book results

__all__ = ["DEFAULT_LAYERS", "check_cosine_temperature", "LightGCN", "SymmetricSpmm", "graph_edges",
           "normalized_adjacency"]


def graph_edges(graph: Csr | tuple[np.ndarray, np.ndarray], n_users: int, n_items: int) -> Tensor:
    """The deduplicated training pairs as a ``[2, E]`` int64 tensor (row 0 users, row 1 items), sorted by user.

    ``graph`` is the training split as a users x items ``Csr`` or as parallel ``(users, items)`` id arrays.
    """
    if isinstance(graph, Csr):
        if (graph.n_rows, graph.n_cols) != (n_users, n_items):
            raise DataError(f"lightgcn graph is {graph.n_rows} users x {graph.n_cols} items, but the model has "
                            f"{n_users} x {n_items}")
        csr = graph
    else:
        users, items = graph
        try:
            csr = Csr.from_pairs(np.asarray(users), np.asarray(items), n_users, n_items)
        except ValueError as e:
            raise DataError(f"lightgcn graph: {e}") from None
    if csr.nnz == 0:
        raise DataError("lightgcn graph has no interactions: it needs the training split's (user, item) pairs")
    return torch.from_numpy(np.stack([csr.rows_of(), csr.indices]).astype(np.int64))


def check_cosine_temperature(value: Any) -> float:
    """``cosine_temperature`` as a float: 0 (dot product) or a positive, finite temperature."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0:
        raise ConfigError(f"lightgcn cosine_temperature must be 0 (dot product) or a positive number, got {value!r}")
    return float(value)


def normalized_adjacency(edges: Tensor, n_users: int, n_items: int) -> Tensor:
    """``Â = D^-1/2 A D^-1/2`` of the bipartite graph as a coalesced sparse COO tensor ``[U + I, U + I]``; users are
    nodes ``0..U-1``, items ``U..U+I-1``. ``edges [2, E]`` must hold each pair once. A node without edges has an
    empty row (its embedding does not propagate), never a division by zero. Ids are range-checked here (edges may
    come from a state dict), so torch's own per-call sparse invariant checks stay off."""
    if edges.ndim != 2 or edges.shape[0] != 2 or edges.dtype != torch.int64:
        raise DataError(f"lightgcn graph_edges must be a [2, E] int64 tensor, got {tuple(edges.shape)} {edges.dtype}")
    if edges.numel() and (edges.min() < 0 or edges[0].max() >= n_users or edges[1].max() >= n_items):
        raise DataError(f"lightgcn graph_edges hold ids outside {n_users} users x {n_items} items")
    users, items = edges[0], edges[1] + n_users
    n = n_users + n_items
    degree = torch.bincount(torch.cat([users, items]), minlength=n).to(torch.float32)  # [U + I]
    weight = (degree[users] * degree[items]).rsqrt()  # [E]: 1 / sqrt(|N_u| |N_i|), both degrees >= 1 on an edge
    index = torch.cat([torch.stack([users, items]), torch.stack([items, users])], dim=1)  # [2, 2E]
    return torch.sparse_coo_tensor(index, torch.cat([weight, weight]), (n, n), check_invariants=False).coalesce()


class SymmetricSpmm(torch.autograd.Function):
    """``adj @ x`` for a *symmetric* sparse ``adj`` (CSR) that takes no gradient: the gradient of ``x`` is
    ``adj^T @ grad = adj @ grad``, one more sparse product, where torch's own backward would transpose ``adj``."""

    @staticmethod
    def forward(ctx: Any, adj: Tensor, x: Tensor) -> Tensor:
        ctx.adj = adj  # a constant of the graph, not a saved activation: no version check needed
        return adj @ x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, ctx.adj @ grad


def _to_csr(adj: Tensor) -> Tensor:
    with warnings.catch_warnings():  # torch calls its CSR layout beta; kdray uses only CSR @ dense
        warnings.simplefilter("ignore", UserWarning)
        return adj.to_sparse_csr()


class LightGCN(RecModel):
    """LightGCN over a fixed training graph; ``n_layers`` propagation steps (0 = plain dot product of ids)."""

    name = "lightgcn"

    def __init__(self, n_users: int, n_items: int, dim: int, edges: Tensor, n_layers: int = DEFAULT_LAYERS,
                 cosine_temperature: float = 0.0):
        super().__init__(n_users, n_items, dim)
        self.n_layers = n_layers
        self.cosine_temperature = check_cosine_temperature(cosine_temperature)
        self.user_emb = embedding(n_users, dim)  # [U, D]: E0, users
        self.item_emb = embedding(n_items, dim)  # [I, D]: E0, items
        self.register_buffer("graph_edges", edges)  # [2, E] int64
        self._ddp_params_and_buffers_to_ignore = ["graph_edges"]  # same graph on every worker: never broadcast it
        self._adjacency: tuple[tuple[Any, ...], Tensor] | None = None  # (key of the edges it was built from, Â)
        self._cache: tuple[tuple[Any, ...], Tensor, Tensor] | None = None  # (key, user table, item table)

    @classmethod
    def build(cls, *, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float,
              user_features: Tensor | None, item_features: Tensor | None,
              graph: Csr | tuple[np.ndarray, np.ndarray] | None = None, n_layers: int = DEFAULT_LAYERS,
              n_edges: int = 0, cosine_temperature: float = 0.0) -> "LightGCN":
        """From the training ``graph``; without one (a model rebuilt from ``model_args``), ``n_edges`` zero edges are
        allocated for ``load_state_dict`` to fill."""
        if hidden:
            raise ConfigError(f"model 'lightgcn' has no hidden layers, but hidden={list(hidden)}; use hidden: []")
        if dropout:
            raise ConfigError(f"model 'lightgcn' has no dropout, but dropout={dropout}; use 0")
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 0:
            raise ConfigError(f"lightgcn n_layers must be an integer >= 0, got {n_layers!r}")
        if graph is not None:
            edges = graph_edges(graph, n_users, n_items)
        elif isinstance(n_edges, (int, np.integer)) and not isinstance(n_edges, bool) and n_edges > 0:
            edges = torch.zeros(2, int(n_edges), dtype=torch.int64)
        else:
            raise ConfigError("model 'lightgcn' needs the training graph: build_model(..., graph=<the training "
                              "split as a Csr or (users, items) arrays>), or n_edges > 0 to load a state dict")
        return cls(n_users, n_items, dim, edges, int(n_layers), cosine_temperature)

    def extra_args(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_edges": int(self.graph_edges.shape[1]),
                "cosine_temperature": self.cosine_temperature}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_layers={self.n_layers}, n_edges={self.graph_edges.shape[1]}, "
                f"cosine_temperature={self.cosine_temperature}")

    # ------------------------------------------------------------------------------------------------------------
    # Propagation

    @staticmethod
    def _key(*tensors: Tensor) -> tuple[Any, ...]:
        """Changes whenever one of the tensors is replaced (``to``, a new Parameter) or modified in place."""
        return tuple((t.device, t.data_ptr(), t._version) for t in tensors)

    def adjacency(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Â`` in CSR layout on the edges' device, built once per device, dtype and set of edges. Built outside
        inference mode even when first needed under it (evaluation), since training later uses it in the backward
        pass."""
        key = (dtype, *self._key(self.graph_edges))
        if self._adjacency is None or self._adjacency[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                adj = _to_csr(normalized_adjacency(self.graph_edges, self.n_users, self.n_items).to(dtype))
            self._adjacency = (key, adj)
        return self._adjacency[1]

    def propagate(self) -> tuple[Tensor, Tensor]:
        """The final user ``[U, D]`` and item ``[I, D]`` tables: the mean of the layer embeddings ``E_0..E_K``; with
        a cosine temperature ``t``, each row normalised to unit length and the user rows divided by ``t``."""
        e = torch.cat([self.user_emb.weight, self.item_emb.weight])  # [U + I, D]
        total = e
        if self.n_layers:
            adj = self.adjacency(e.dtype)
            for _ in range(self.n_layers):
                e = SymmetricSpmm.apply(adj, e)
                total = total + e
        final = total / (self.n_layers + 1)
        users, items = final[: self.n_users], final[self.n_users :]
        if self.cosine_temperature:
            users = nn.functional.normalize(users, dim=-1) / self.cosine_temperature
            items = nn.functional.normalize(items, dim=-1)
        return users, items

    def tables(self) -> tuple[Tensor, Tensor]:
        """The propagated tables: recomputed in training, cached in inference (see the module docstring)."""
        params = [self.user_emb.weight, self.item_emb.weight]
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self.propagate()
        key = self._key(*params, self.graph_edges)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self.propagate())
        return self._cache[1], self._cache[2]

    def with_history(self, known: Csr) -> "LightGCN":
        """These weights over the graph of ``known`` (every pair the evaluation masks as seen): itself when that is
        its own graph, else a new LightGCN sharing its embedding Parameters, in the same train/eval mode. On test
        that graph is train + valid: the published LightGCN propagates over every training pair it knows, and a
        model whose validation pairs are left out of the graph ranks users from less of their history than the
        mask already treats as seen. Validation still ranks over the training graph alone, so nothing it picks has
        seen a validation pair."""
        edges = graph_edges(known, self.n_users, self.n_items).to(self.graph_edges.device)
        if torch.equal(edges, self.graph_edges):
            return self
        model = LightGCN(self.n_users, self.n_items, self.dim, edges, self.n_layers, self.cosine_temperature)
        model.user_emb.weight, model.item_emb.weight = self.user_emb.weight, self.item_emb.weight
        return model.train(self.training)

    def train(self, mode: bool = True) -> "LightGCN":
        self._cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` leave out ``Â`` and the cached tables: both are rebuilt on first use, and a
        CSR tensor cannot be deep-copied."""
        return {**super().__getstate__(), "_adjacency": None, "_cache": None}

    # ------------------------------------------------------------------------------------------------------------
    # Scoring

    def user_vectors(self, users: Tensor) -> Tensor:
        """Propagated user vectors ``[B, D]`` (what the PCA teacher-to-student start projects)."""
        return self.tables()[0][users]

    def item_vectors(self, items: Tensor) -> Tensor:
        """Propagated item vectors ``[..., D]``."""
        return self.tables()[1][items]

    def _score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        u, i = self.tables()
        return torch.einsum("bd,bcd->bc", u[users], i[items])  # [B, C]

    def _score_items(self, users: Tensor, items: Tensor | None) -> Tensor:
        u, i = self.tables()
        return u[users] @ (i if items is None else i[items]).T  # [B, C]

    def embedding_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return self.user_emb, self.item_emb
