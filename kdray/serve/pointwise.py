"""The pointwise serving predictor: a pointwise checkpoint in; for one raw user id, raw item ids and optional
feature values, the probability that the user likes each item and (with a rating head) the predicted rating out.
No Ray, no HTTP: the ``POST /predict`` route of :mod:`kdray.serve.app` is a thin adapter over this class.

Features come from the checkpoint's feature spec (:class:`kdray.data.pointwise_data.FeatureSpec`): a field that is
constant per user (age, gender, ...) or per item (genres, year, ...) in the training rows takes the user's or item's
own value; a field given in the request overrides it for every item of the request; any other field is unknown
(categorical id 0, or the training mean). Categorical values are looked up as strings (a value never seen in training
is the unknown id, as in training); numeric values are standardised with the training statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from kdray.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from kdray.data.features import to_batch
from kdray.data.pointwise_data import FeatureSpec
from kdray.models import count_parameters
from kdray.serve.predictor import RequestError, checkpoint_version

FeatureValue = str | int | float


@dataclass(frozen=True)
class Prediction:
    item_id: str
    probability: float  # P(like) = sigmoid(like logit)
    rating: float | None  # None without a rating head


class PointwisePredictor:
    """Like probabilities and predicted ratings from one pointwise checkpoint. ``max_items`` caps a request."""

    def __init__(self, checkpoint: Checkpoint, *, version: str, device: str | torch.device = "cpu",
                 max_items: int | None = None) -> None:
        if checkpoint.features is None:
            raise CheckpointError(f"{checkpoint.path} is a ranking checkpoint; /predict needs a pointwise one "
                                  "(task: pointwise)")
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.checkpoint, self.version, self.max_items = checkpoint, version, max_items
        self.name = f"{checkpoint.config.get('name', 'kdray')}/{checkpoint.meta.get('role', 'model')}"
        self.spec = FeatureSpec.from_json(checkpoint.features)
        self.heads = tuple(self.model.heads)
        self._users = {raw: i for i, raw in enumerate(self.spec.user_ids)}
        self._items = {raw: i for i, raw in enumerate(self.spec.item_ids)}
        self._cat_index = [{v: j + 1 for j, v in enumerate(vocab)} for vocab in self.spec.cat_vocab]
        self.feature_names = (*self.spec.cat_names, *self.spec.num_names)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        max_items: int | None = None) -> "PointwisePredictor":
        checkpoint = load_checkpoint(directory, map_location=device)
        return cls(checkpoint, version=checkpoint_version(directory), device=device, max_items=max_items)

    # ------------------------------------------------------------------------------------------------------------

    def _user(self, user_id: int | str) -> int:
        dense = self._users.get(str(user_id))
        if dense is None:
            raise RequestError("user_id", f"unknown user {user_id!r}: not in the training data")
        return dense

    def _items_of(self, item_ids: Sequence[int | str]) -> np.ndarray:
        if not item_ids:
            raise RequestError("item_ids", "must name at least one item")
        if self.max_items is not None and len(item_ids) > self.max_items:
            raise RequestError("item_ids", f"{len(item_ids)} items is more than the limit of {self.max_items} per "
                                           "request (serve.max_request_batch)")
        dense = [self._items.get(str(i)) for i in item_ids]
        unknown = [item_ids[k] for k, d in enumerate(dense) if d is None]
        if unknown:
            raise RequestError("item_ids", f"unknown item {unknown[0]!r} ({len(unknown)} unknown): not in the "
                                           "training data")
        return np.asarray(dense, dtype=np.int64)

    def _encode(self, name: str, value: FeatureValue) -> float:
        """A request's feature value -> the model's value (categorical id, or standardised number)."""
        if name in self.spec.cat_names:
            j = self.spec.cat_names.index(name)
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise RequestError(f"features.{name}", f"categorical feature {name!r} takes a string, got {value!r}")
            return float(self._cat_index[j].get(str(value), 0))  # unseen in training: unknown, as in training
        j = self.spec.num_names.index(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"features.{name}", f"numeric feature {name!r} takes a finite number, got {value!r}")
        return (float(value) - self.spec.num_mean[j]) / self.spec.num_std[j]

    def batch(self, user_id: int | str, item_ids: Sequence[int | str],
              features: Mapping[str, FeatureValue] | None = None) -> dict[str, torch.Tensor]:
        """The model batch for one user and ``item_ids``; :class:`RequestError` names a bad field."""
        user = self._user(user_id)
        items = self._items_of(item_ids)
        features = dict(features or {})
        unknown = sorted(set(features) - set(self.feature_names))
        if unknown:
            allowed = ", ".join(self.feature_names) or "none"
            raise RequestError("features", f"unknown feature {unknown[0]!r}; this model's features: {allowed}")
        given = {name: self._encode(name, v) for name, v in features.items()}
        n, names = items.size, self.feature_names
        values = np.zeros((n, len(names)), dtype=np.float64)
        for f, name in enumerate(names):
            if name in given:
                values[:, f] = given[name]
            elif name in self.spec.user_fields:
                values[:, f] = self.spec.user_fields[name][user]
            elif name in self.spec.item_fields:
                values[:, f] = np.asarray(self.spec.item_fields[name])[items]
        n_cat = len(self.spec.cat_names)
        return to_batch({"user": np.full(n, user, np.int64), "item": items,
                         "cat": values[:, :n_cat].astype(np.int64), "num": values[:, n_cat:].astype(np.float32)},
                        self.device)

    def predict(self, user_id: int | str, item_ids: Sequence[int | str],
                features: Mapping[str, FeatureValue] | None = None) -> list[Prediction]:
        """One :class:`Prediction` per item, in the order given."""
        batch = self.batch(user_id, item_ids, features)
        with torch.inference_mode():
            out = self.model(batch)
        probs = torch.sigmoid(out["like"]).cpu().tolist()
        ratings = out["rating"].cpu().tolist() if "rating" in out else [None] * len(probs)
        return [Prediction(str(i), p, r) for i, p, r in zip(item_ids, probs, ratings)]

    def info(self) -> dict[str, object]:
        ckpt = self.checkpoint
        return {"name": self.name, "version": self.version, "task": "pointwise", "heads": list(self.heads),
                "architecture": ckpt.args, "n_params": count_parameters(self.model), "features": {
                    "categorical": self.spec.cat_names, "numeric": self.spec.num_names},
                "metrics": {k: v for k, v in ckpt.metrics.items() if k != "history"},
                "created_at": ckpt.meta.get("created_at"), "lineage": ckpt.meta.get("lineage", {})}
