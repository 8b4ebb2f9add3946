"""The serving predictor: a checkpoint in, top-K recommendations for raw user ids out. No Ray, no HTTP.

:class:`Recommender` loads a self-describing checkpoint (weights, model arguments, id vocabularies, config), scores
the whole catalog for a batch of users with one ``score_all`` call, masks each user's training items, and maps the
top-K dense item ids back to raw ids. A user the checkpoint has never seen gets the most popular training items
instead, flagged ``cold_start``. A query may carry a ``history`` of the user's recent raw item ids: the user vector is
then folded in from it at request time (:mod:`kdray.serve.foldin`), so a new user gets personal results from the first
click and a known user's recent clicks count; unknown item ids are reported in ``unknown_items``. The Serve deployment in :mod:`kdray.serve` is a thin HTTP adapter over this class,
so everything here is unit-tested without Serve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kdray.checkpoint import Checkpoint, checkpoint_version, load_checkpoint
from kdray.errors import KdrayError
from kdray.models import count_parameters
from kdray.serve.foldin import DEFAULT_L2, fold_in, item_side, stored_user_vectors


class RequestError(KdrayError, ValueError):
    """A request the predictor refuses (k out of range); ``field`` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Query:
    """One user's request. ``user_id`` is the raw id as the client sent it; it is looked up as a string."""

    user_id: int | str
    k: int = 10
    exclude_seen: bool = True
    history: Sequence[int | str] | None = None  # recent raw item ids, folded into the user vector; excluded when seen


@dataclass(frozen=True)
class Recommendation:
    """Top items for one user, best first. ``scores`` are model logits, or training-interaction counts (item
    popularity) when ``cold_start`` is true. Fewer than k items only when the user has seen all but fewer than k
    items of the catalog."""

    user_id: int | str
    item_ids: list[str]
    scores: list[float]
    cold_start: bool
    unknown_items: list[str] = field(default_factory=list)  # history ids not in the checkpoint's catalog (ignored)


class Recommender:
    """Top-K recommendations from one checkpoint.

    ``max_k`` caps k below the catalog size (a serving limit); ``None`` allows up to the whole catalog.
    ``max_history`` caps a query's history (``None``: no cap); ``foldin_l2`` is fold-in's prior strength.
    """

    def __init__(self, checkpoint: Checkpoint, *, version: str, device: str | torch.device = "cpu",
                 max_k: int | None = None, max_history: int | None = None,
                 foldin_l2: float = DEFAULT_L2) -> None:
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        # A two-tower model's item side does not depend on the user: run its item tower over the catalog once here
        # instead of inside every score_all call (for a 256-d, (512, 256) tower over Gowalla's 41k items that is
        # ~11 GFLOP, ~0.2 s on one core here, per request batch). Any model with user_vectors / item_vectors gets it.
        self._item_matrix: torch.Tensor | None = None  # [n_items, H]
        if callable(getattr(self.model, "user_vectors", None)) and callable(getattr(self.model, "item_vectors", None)):
            with torch.inference_mode():
                self._item_matrix = self.model.item_vectors(torch.arange(self.model.n_items, device=self.device))
        self.checkpoint = checkpoint
        self.version = version
        self.name = f"{checkpoint.config.get('name', 'kdray')}/{checkpoint.meta.get('role', 'model')}"
        self.max_k = max_k
        vocab = checkpoint.vocab
        self.n_users, self.n_items = int(self.model.n_users), int(self.model.n_items)
        self._item_ids = np.asarray(vocab.item_ids, dtype=str)
        self._user_index = vocab.user_index()  # raw id (str) -> dense id
        self._seen = vocab.seen
        popularity = vocab.item_popularity()
        # Cold-start ranking: most trained-on items first; ties by dense id, i.e. by raw id (the vocab is sorted).
        order = np.argsort(-popularity, kind="stable")
        self._popular_ids = self._item_ids[order].tolist()
        self._popular_scores = popularity[order].astype(float).tolist()
        self.max_history, self.foldin_l2 = max_history, foldin_l2
        self._item_index = {raw: i for i, raw in enumerate(self._item_ids.tolist())}  # history lookups
        self._side = item_side(self.model)  # None: the model has no item vectors to fold a history into

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        max_k: int | None = None, max_history: int | None = None) -> "Recommender":
        """Loads a checkpoint directory (raises :class:`kdray.errors.CheckpointError` naming a missing or corrupt
        file)."""
        checkpoint = load_checkpoint(directory, map_location=device)
        return cls(checkpoint, version=checkpoint_version(directory), device=device, max_k=max_k,
                   max_history=max_history)

    def check_k(self, k: int) -> None:
        """Raises :class:`RequestError` (field ``k``) unless 1 <= k <= min(n_items, max_k)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise RequestError("k", f"must be an integer, got {type(k).__name__}")
        if k < 1:
            raise RequestError("k", f"must be >= 1, got {k}")
        if k > self.n_items:
            raise RequestError("k", f"{k} is larger than the catalog ({self.n_items} items)")
        if self.max_k is not None and k > self.max_k:
            raise RequestError("k", f"{k} is larger than the serving limit max_k={self.max_k}")

    def check_history(self, history: Sequence[int | str] | None) -> None:
        """Raises :class:`RequestError` (field ``history``) for a history longer than ``max_history`` (checked
        before anything reads it) or one this checkpoint's model cannot fold in."""
        if history is None:
            return
        if self.max_history is not None and len(history) > self.max_history:
            raise RequestError("history", f"{len(history)} items is more than the limit of {self.max_history} "
                                          "(serve.max_history)")
        if history and self._side is None:
            raise RequestError("history", f"this checkpoint's model ({self.checkpoint.args.get('name')}) scores "
                                          "with no item vectors to fold a history into; send no history")

    def fold_in_user(self, user_id: int | str, history: Sequence[int | str]
                     ) -> tuple[torch.Tensor | None, np.ndarray, list[str]]:
        """The folded-in user vector [D] (None when no history item is known), the known history as dense item ids,
        and the unknown raw ids (as strings, in the order sent). A known user's stored vector is the prior."""
        self.check_history(history)
        dense = [self._item_index.get(str(raw), -1) for raw in history]
        unknown = [str(raw) for raw, i in zip(history, dense) if i < 0]
        known = np.array([i for i in dense if i >= 0], dtype=np.int64)
        if not known.size:
            return None, known, unknown
        user = self._user_index.get(str(user_id))
        prior = None if user is None else stored_user_vectors(self.model, torch.tensor([user], device=self.device))[0]
        return fold_in(self._side, torch.as_tensor(known, device=self.device), prior, l2=self.foldin_l2), known, unknown

    def recommend(self, user_ids: Sequence[int | str], k: int = 10,
                  exclude_seen: bool = True) -> list[Recommendation]:
        """Top-k items for each user, in the order given."""
        return self.recommend_queries([Query(u, k, exclude_seen) for u in user_ids])

    def recommend_queries(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Answers many (possibly different) queries with one ``score_all`` call over the known users.

        Shapes: W known users -> scores [W, n_items]; seen items of users with ``exclude_seen`` set to -inf;
        one ``topk`` with the largest k of the batch, each row then cut to its own k.
        """
        for q in queries:
            self.check_k(q.k)
            self.check_history(q.history)
        results: list[Recommendation | None] = [None] * len(queries)
        unknown: list[list[str]] = [[] for _ in queries]
        folded = [(i, *self.fold_in_user(q.user_id, q.history)) for i, q in enumerate(queries) if q.history]
        for i, _, _, missing in folded:
            unknown[i] = missing
        folded = [f for f in folded if f[1] is not None]  # no known history item: answered as if it had none
        if folded:
            self._fold_in_topk(queries, folded, results)
        dense = np.array([self._user_index.get(str(q.user_id), -1) if results[i] is None else -2
                          for i, q in enumerate(queries)], dtype=np.int64)  # -2: answered by fold-in
        warm = np.flatnonzero(dense >= 0)
        if warm.size:
            top_scores, top_items = self._score_topk(
                dense[warm],
                exclude=np.array([queries[i].exclude_seen for i in warm], dtype=bool),
                k=max(queries[i].k for i in warm),
            )
            for row, i in enumerate(warm):
                k = queries[i].k
                scores, items = top_scores[row, :k], top_items[row, :k]
                keep = np.isfinite(scores)  # -inf: a seen item, reached only when fewer than k are unseen
                results[i] = Recommendation(queries[i].user_id, self._item_ids[items[keep]].tolist(),
                                            scores[keep].tolist(), cold_start=False, unknown_items=unknown[i])
        for i in np.flatnonzero(dense == -1):
            k = queries[i].k
            results[i] = Recommendation(queries[i].user_id, self._popular_ids[:k], self._popular_scores[:k],
                                        cold_start=True, unknown_items=unknown[i])
        return results  # type: ignore[return-value]

    def _fold_in_topk(self, queries: Sequence[Query], folded: list[tuple[int, torch.Tensor, np.ndarray, list[str]]],
                      results: list[Recommendation | None]) -> None:
        """Answers the queries whose user vector was folded in: one [W, n_items] scoring of the W vectors; with
        ``exclude_seen``, a known user's training items and the history's items are set to -inf."""
        assert self._side is not None
        with torch.inference_mode():
            scores = self._side.scores(torch.stack([p for _, p, _, _ in folded]))  # [W, n_items]
            for row, (i, _, history, _) in enumerate(folded):
                if queries[i].exclude_seen:
                    user = self._user_index.get(str(queries[i].user_id))
                    seen = history if user is None else np.concatenate([history, self._seen.row(user)])
                    scores[row, torch.as_tensor(seen, device=self.device)] = float("-inf")
            top_scores, top_items = torch.topk(scores, max(queries[i].k for i, _, _, _ in folded), dim=1)
        top_scores, top_items = top_scores.cpu().numpy(), top_items.cpu().numpy()
        for row, (i, _, _, missing) in enumerate(folded):
            k = queries[i].k
            keep = np.isfinite(top_scores[row, :k])
            results[i] = Recommendation(queries[i].user_id, self._item_ids[top_items[row, :k][keep]].tolist(),
                                        top_scores[row, :k][keep].tolist(), cold_start=False, unknown_items=missing)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """Logits [W, n_items] for dense user ids [W]; equals ``model.score_all`` (float tolerance)."""
        with torch.inference_mode():
            if self._item_matrix is not None:
                return (self.model.user_vectors(users) @ self._item_matrix.T).float()
            return self.model.score_all(users).float()

    def _score_topk(self, users: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """users [W] dense ids, exclude [W] bool -> (scores [W, k] float32, items [W, k] int64), best first."""
        with torch.inference_mode():
            scores = self.score_all(torch.as_tensor(users, device=self.device))  # [W, n_items]
            if exclude.any():
                rows = np.flatnonzero(exclude)
                pos, cols = self._seen.batch_pairs(users[rows])
                scores[torch.as_tensor(rows[pos], device=self.device),
                       torch.as_tensor(cols, device=self.device)] = float("-inf")
            top_scores, top_items = torch.topk(scores, k, dim=1)
        return top_scores.cpu().numpy(), top_items.cpu().numpy()

    def info(self) -> dict[str, Any]:
        """What the checkpoint is: architecture, size, metrics, creation time and the teacher it was distilled
        from (the ``lineage`` the training stage recorded)."""
        meta, ckpt = self.checkpoint.meta, self.checkpoint
        return {
            "name": self.name,
            "version": self.version,
            "role": meta.get("role"),
            "architecture": ckpt.args,
            "parameters": count_parameters(self.model),
            "n_users": self.n_users,
            "n_items": self.n_items,
            "metrics": ckpt.metrics,
            "created_at": meta.get("created_at"),
            "kdray_version": meta.get("kdray_version"),
            "teacher": meta.get("lineage") or None,
            "checkpoint": str(ckpt.path),
            "device": str(self.device),
        }

