"""Self-describing model checkpoints: one directory, fixed file names, everything needed to rebuild and serve.

Layout (``FILES``)::

    model.pt          the state dict (tensors only; loaded with ``torch.load(weights_only=True)``)
    model.json        model arguments for ``kdray.models.build_model`` and the parameter count
    meta.json         format version, role (teacher/student), kdray version, creation time, teacher lineage
    config.json       the resolved kdray config of the run that trained it
    metrics.json      validation (and, once evaluated, test) metrics
    vocab.npz         raw user and item ids (index = dense id) and each user's training items (CSR) for masking
    features.json     pointwise models only: the feature vocabularies and normalisation statistics that turn raw
                      (user, item, features) into a batch (``kdray.data.pointwise_data.FeatureSpec``)

``model.json`` says which registry rebuilds the model: ``{"kind": "pointwise", "args": ...}`` for a pointwise model
(``kdray.models.pointwise.build_pointwise_model``), ``{"args": ...}`` for a ranking one (``build_model``).

An epoch checkpoint of Ray Train (what a resumed training restarts from) holds only ``model.pt``, ``model.json`` and
``train_state.pt`` (optimiser, epoch, early-stopping state, history; no random-number state: the training loop
reseeds every epoch from the seed and the epoch): :func:`write_epoch_state` and :func:`read_epoch_state`.

This module is the only reader and writer of these files.

Writes are atomic: files go to a temporary sibling directory that is renamed into place, so a crash mid-write never
leaves a half checkpoint that later loads.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdray import __version__
from kdray.errors import CheckpointError, ConfigError
from kdray.layout import atomic_replace_dir, atomic_write_text
from kdray.models import RecModel, build_model, count_parameters, model_args
from kdray.models.pointwise import PointwiseModel, build_pointwise_model, pointwise_model_args
from kdray.sparse import Csr

if TYPE_CHECKING:  # a type only: data depends on nothing here, and importing it would load pandas for every reader
    from kdray.data.prepare import PreparedData

FORMAT_VERSION = 1
WEIGHTS, MODEL, META, CONFIG, METRICS, VOCAB, TRAIN_STATE = (
    "model.pt", "model.json", "meta.json", "config.json", "metrics.json", "vocab.npz", "train_state.pt",
)
FEATURES = "features.json"
POINTWISE = "pointwise"  # model.json's "kind" of a pointwise model
REQUIRED = (WEIGHTS, MODEL, META, CONFIG, VOCAB)


@dataclass(frozen=True)
class Vocab:
    """Raw ids for dense ids, and each user's training items (masked at serving and evaluation time)."""

    user_ids: np.ndarray  # [n_users] str
    item_ids: np.ndarray  # [n_items] str
    seen: Csr  # users x items

    def user_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.user_ids.tolist())}

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.seen.indices, minlength=self.seen.n_cols)


@dataclass
class Checkpoint:
    model: RecModel | PointwiseModel
    args: dict[str, Any]
    meta: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    vocab: Vocab  # a pointwise model's has no training items (``seen`` is empty)
    path: Path
    features: dict[str, Any] | None = None  # pointwise models: FeatureSpec as JSON

    @property
    def pointwise(self) -> bool:
        return isinstance(self.model, PointwiseModel)


def model_info(model: Any) -> dict[str, Any]:
    """What model.json holds: the registry (``kind``) and the arguments that rebuild ``model``'s architecture."""
    model = getattr(model, "module", model)  # unwrap DDP
    if isinstance(model, PointwiseModel):
        return {"kind": POINTWISE, "args": pointwise_model_args(model)}
    return {"args": model_args(model)}


def build_from_info(info: dict[str, Any]) -> RecModel | PointwiseModel:
    """The model :func:`model_info` describes, freshly initialised (weights come from ``load_state_dict``)."""
    if info.get("kind") == POINTWISE:
        args = dict(info["args"])
        return build_pointwise_model(args.pop("name"), **args)
    return build_model(**info["args"])


def _sizes(model: Any) -> tuple[int, int]:
    if isinstance(model, PointwiseModel):
        return int(model.init_args["n_users"]), int(model.init_args["n_items"])
    return int(model.n_users), int(model.n_items)


def empty_seen(n_users: int, n_items: int) -> Csr:
    """No training items to mask: the ``seen`` of a pointwise checkpoint's vocabulary."""
    return Csr(indptr=np.zeros(n_users + 1, np.int64), indices=np.zeros(0, np.int64), n_rows=n_users, n_cols=n_items)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_checkpoint_files(
    directory: Path,
    model: RecModel,
    *,
    role: str,
    config: dict[str, Any],
    vocab: Vocab,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
) -> None:
    """Writes the checkpoint files into an existing (empty) directory. Prefer :func:`save_checkpoint`.
    ``features`` (a FeatureSpec as JSON) is required for, and only written with, a pointwise model."""
    model = getattr(model, "module", model)  # unwrap DDP
    info = model_info(model)
    if (info.get("kind") == POINTWISE) != (features is not None):
        raise CheckpointError("a pointwise model's checkpoint needs its feature spec, and only it has one")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save a model with non-finite weights in {', '.join(bad[:3])}")
    torch.save(state, directory / WEIGHTS)
    _write_json(directory / MODEL, {**info, "n_params": count_parameters(model)})
    if features is not None:
        _write_json(directory / FEATURES, features)
    _write_json(directory / META, {
        "format_version": FORMAT_VERSION,
        "kdray_version": __version__,
        "role": role,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lineage": lineage or {},
    })
    _write_json(directory / CONFIG, config)
    _write_json(directory / METRICS, metrics or {})
    np.savez(
        directory / VOCAB,
        user_ids=np.asarray(vocab.user_ids, dtype=str),
        item_ids=np.asarray(vocab.item_ids, dtype=str),
        seen_indptr=vocab.seen.indptr,
        seen_indices=vocab.seen.indices,
    )


def save_checkpoint(directory: str | Path, model: RecModel, **kwargs: Any) -> Path:
    """Atomically writes a checkpoint to ``directory`` (replacing an existing one). Keyword arguments as
    :func:`write_checkpoint_files`."""
    return atomic_replace_dir(Path(directory), lambda tmp: write_checkpoint_files(tmp, model, **kwargs))


def update_metrics(directory: str | Path, metrics: dict[str, Any]) -> None:
    """Merges ``metrics`` into the checkpoint's metrics.json (written via a temporary file and a rename)."""
    directory = Path(directory)
    current = json.loads((directory / METRICS).read_text()) if (directory / METRICS).exists() else {}
    current.update(metrics)
    atomic_write_text(directory / METRICS, json.dumps(current, indent=2, sort_keys=True, default=_json_default) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable or corrupt: {e}") from None


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Loads and rebuilds a checkpoint. Never unpickles arbitrary objects (``weights_only=True``); a missing,
    truncated or corrupt file raises :class:`CheckpointError` naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a complete kdray checkpoint: missing {', '.join(missing)} (expected {', '.join(REQUIRED)})"
        )
    meta = _read_json(directory / META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / META}: checkpoint format {meta.get('format_version')!r}, this kdray reads {FORMAT_VERSION}"
        )
    info = _read_json(directory / MODEL)
    config = _read_json(directory / CONFIG)
    metrics = _read_json(directory / METRICS) if (directory / METRICS).is_file() else {}
    try:
        state = torch.load(directory / WEIGHTS, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint weights {directory / WEIGHTS} cannot be loaded: {e}") from None
    try:
        with np.load(directory / VOCAB, allow_pickle=False) as z:
            user_ids, item_ids = z["user_ids"], z["item_ids"]
            indptr, indices = z["seen_indptr"], z["seen_indices"]
    except Exception as e:
        raise CheckpointError(f"checkpoint vocabulary {directory / VOCAB} cannot be loaded: {e}") from None
    args = info.get("args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{directory / MODEL}: no model arguments")
    features = None
    if info.get("kind") == POINTWISE:
        if not (directory / FEATURES).is_file():
            raise CheckpointError(f"{directory} is a pointwise checkpoint without {FEATURES} (its feature spec)")
        features = _read_json(directory / FEATURES)
    try:
        model = build_from_info(info)
        model.load_state_dict(state)
    except (TypeError, ValueError, KeyError, RuntimeError, ConfigError) as e:
        raise CheckpointError(f"{directory}: weights do not match the model arguments in {MODEL}: {e}") from None
    model.to(map_location).eval()
    n_users, n_items = _sizes(model)
    if len(user_ids) != n_users or len(item_ids) != n_items or len(indptr) != n_users + 1:
        raise CheckpointError(
            f"{directory / VOCAB}: {len(user_ids)} users / {len(item_ids)} items do not match the model's "
            f"{n_users} / {n_items}"
        )
    vocab = Vocab(user_ids=user_ids, item_ids=item_ids,
                  seen=Csr(indptr=indptr, indices=indices, n_rows=n_users, n_cols=n_items))
    return Checkpoint(model=model, args=args, meta=meta, config=config, metrics=metrics, vocab=vocab,
                      path=directory, features=features)


def check_matches_data(ckpt: Checkpoint, data: PreparedData) -> None:
    """A checkpoint (a teacher, or a model to evaluate) must come from the same catalog: sizes and raw ids."""
    teacher_dir = ckpt.path
    if ckpt.model.n_items != data.n_items or ckpt.model.n_users != data.n_users:
        raise CheckpointError(
            f"checkpoint {teacher_dir} was trained on {ckpt.model.n_users} users x {ckpt.model.n_items} items, "
            f"but the data has {data.n_users} x {data.n_items}: train it on this data first")
    if not (np.array_equal(ckpt.vocab.item_ids, data.item_ids) and np.array_equal(ckpt.vocab.user_ids, data.user_ids)):
        raise CheckpointError(f"checkpoint {teacher_dir} uses different user/item ids than the data in {data.path}")


def check_same_training_split(ckpt: Checkpoint, data: PreparedData) -> None:
    """A checkpoint of the same catalog must also have trained on ``data``'s own training split: one trained on
    another split of it may have seen ``data``'s validation or test items."""
    seen, train = ckpt.vocab.seen, data.train
    if not (np.array_equal(seen.indptr, train.indptr) and np.array_equal(seen.indices, train.indices)):
        raise CheckpointError(f"{ckpt.path} was trained on another training split than the data's "
                              f"({seen.indices.size:,} training interactions against {train.indices.size:,}); train "
                              "it with the same data settings (data.*)")


def check_trained_within(ckpt: Checkpoint, data: PreparedData) -> None:
    """A teacher of the same catalog must not have trained on any pair outside ``data``'s training split: such a
    pair may be one of ``data``'s validation or test items, and a student distilled from that teacher would be
    picked and scored on what its teacher was shown. A teacher trained on fewer pairs (an earlier version of a run
    that ``kdray update`` has since grown) is fine."""
    seen, train = ckpt.vocab.seen, data.train
    outside = ~np.isin(_pair_codes(seen), _pair_codes(train))
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        user = int(np.searchsorted(seen.indptr, first, side="right") - 1)
        raise CheckpointError(
            f"{ckpt.path} was trained on {int(outside.sum()):,} (user, item) pairs that are not in the data's training "
            f"split (the first: user '{data.user_ids[user]}', item '{data.item_ids[seen.indices[first]]}'); they may "
            "be validation or test pairs here. Train the teacher with the same data settings (data.*)")


def _pair_codes(m: Csr) -> np.ndarray:
    rows = np.repeat(np.arange(m.n_rows, dtype=np.int64), np.diff(m.indptr))
    return rows * m.n_cols + m.indices.astype(np.int64)


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds every required file of an exported checkpoint (no file is read)."""
    return all((Path(directory) / name).is_file() for name in REQUIRED)


def stage_key(directory: str | Path) -> str | None:
    """The ``stage_key`` lineage entry of an exported checkpoint (what the run stage that wrote it depended on), or
    None when there is no readable checkpoint there."""
    try:
        return json.loads((Path(directory) / META).read_text())["lineage"].get("stage_key")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def write_epoch_state(directory: Path, model: RecModel, train_state: dict[str, Any]) -> None:
    """Writes a training epoch's checkpoint into ``directory``: the weights, the model arguments and the training
    state (tensors, numbers and strings only, so it loads with ``weights_only=True``)."""
    model = getattr(model, "module", model)  # unwrap DDP
    torch.save(model.state_dict(), directory / WEIGHTS)
    _write_json(directory / MODEL, model_info(model))
    torch.save(train_state, directory / TRAIN_STATE)


def read_epoch_state(directory: Path, map_location: str | torch.device = "cpu"
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The model description (:func:`model_info`), weights and training state of an epoch checkpoint written by
    :func:`write_epoch_state`."""
    args = _read_json(directory / MODEL)
    weights = torch.load(directory / WEIGHTS, map_location=map_location, weights_only=True)
    state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    return args, weights, state


def read_epoch_model(directory: Path) -> RecModel:
    """The model of an epoch checkpoint, rebuilt on the CPU."""
    info, weights, _ = read_epoch_state(directory)
    model = build_from_info(info)
    model.load_state_dict(weights)
    return model


def checkpoint_version(directory: str | Path) -> str:
    """A short content hash of a checkpoint (its meta.json, which holds the creation time and role, and its weights):
    two checkpoints with the same version serve the same answers."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in (META, WEIGHTS):
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
