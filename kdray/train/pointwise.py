"""What the pointwise task changes in the one training loop (:func:`kdray.train.loop.train_worker`) and its driver.

Worker side, :class:`PointwiseTask` (chosen once by ``cfg.task``), the three things that differ from ranking:

* **batches**: the worker's shard of ``pointwise_train.parquet`` (Ray Data ``get_dataset_shard``) held in memory
  and re-permuted every epoch (``ray.shard_mode: memory``), or streamed through Ray Data (``stream``);
* **the batch objective**: the student's (or teacher's) heads against the labels, blended with the frozen teachers'
  outputs on the same batch (:func:`kdray.distill.pointwise_losses.pointwise_objective`); the teachers run under
  ``inference_mode`` on every batch of every worker (an ensemble averages its heads);
* **validation**: AUC of the like head (the selection metric), logloss, and RMSE when there is a rating head, over
  all validation rows (small: every worker computes the same numbers, so all stop at the same epoch).

Driver side, :func:`pointwise_setup`: the Ray Dataset, the initial model, the worker payload and the export of a
self-describing pointwise checkpoint (with its feature spec) for :func:`kdray.train.driver.train_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from kdray.config import Config, pointwise_options, to_dict
from kdray.data.features import to_batch
from kdray.data.pointwise_data import PointwiseData, table_columns
from kdray.distill.pointwise_losses import pointwise_objective
from kdray.errors import KdrayError
from kdray.metrics import auc, logloss, rmse
from kdray.models.pointwise import PointwiseModel, build_pointwise_model
from kdray.train.shard import training_rows

Batch = dict[str, Tensor]


def distilling(cfg: Config, role: str) -> bool:
    return role == "student" and cfg.distill.loss != "none" and cfg.distill.alpha > 0


def build_for(cfg: Config, role: str, data: PointwiseData) -> PointwiseModel:
    """The teacher or student ``cfg`` describes (heads ``pointwise.heads``), sized to ``data`` (seeded by the
    caller)."""
    m = cfg.teacher if role == "teacher" else cfg.student
    return build_pointwise_model(m.name, **data.spec.model_shape(), **pointwise_options(cfg, role, cfg.pointwise.heads),
                                 rating_init=data.spec.rating_mean)


@torch.inference_mode()
def predict(model: PointwiseModel, columns: dict[str, np.ndarray], batch_size: int = 8192,
            device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every head's output ``[N]`` (like: logits) for the rows in ``columns``, in batches, on the CPU."""
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    n = len(columns["user"])
    for lo in range(0, n, batch_size):
        out = model(to_batch({k: v[lo : lo + batch_size] for k, v in columns.items()}, device))
        for head, value in out.items():
            parts.setdefault(head, []).append(value.float().cpu())
    return {h: torch.cat(v) if v else torch.zeros(0) for h, v in parts.items()}


def validation_metrics(model: PointwiseModel, columns: dict[str, np.ndarray], device: str | torch.device
                       ) -> dict[str, float]:
    """``auc`` and ``logloss`` of the like head, ``rmse`` of the rating head (when the model has one)."""
    out = predict(model, columns, device=device)
    like = torch.as_tensor(columns["like"])
    metrics = {"auc": auc(out["like"], like), "logloss": logloss(out["like"], like)}
    if "rating" in out:
        metrics["rmse"] = rmse(out["rating"], torch.as_tensor(columns["rating"]))
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class PointwisePayload:
    """What every worker needs besides its shard: the validation rows (put into the object store once)."""

    valid: dict[str, np.ndarray]


class PointwiseTask:
    """The pointwise task's batches, batch objective and validation inside :func:`kdray.train.loop.train_worker`."""

    def __init__(self, cfg: Config, role: str, payload: PointwisePayload, teachers: Sequence[PointwiseModel],
                 shard: Any, device: torch.device, all_reduce_max: Callable[[float], float]):
        self.tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
        self.cfg, self.payload, self.device, self.shard = cfg, payload, device, shard
        self.teachers = list(teachers) if distilling(cfg, role) else []
        self.local: dict[str, np.ndarray] | None = None
        if cfg.ray.shard_mode == "memory":
            tables = list(shard.iter_batches(batch_size=8192, batch_format="pyarrow"))
            table = pa.concat_tables(tables).sort_by([("user", "ascending"), ("item", "ascending")]) if tables \
                else None  # row order independent of the order Ray Data delivered the blocks in
            self.local = table_columns(table) if table is not None else None
            n = 0 if self.local is None else len(self.local["user"])
            # every DDP worker must take the same number of steps, or the gradient all-reduce hangs
            self.n_steps = max(1, int(all_reduce_max(float(math.ceil(n / self.tcfg.batch_size)))))

    def batches(self, seed: int) -> Iterable[Batch]:
        """This epoch's batches: a fresh permutation of the in-memory shard (rows drawn again when this shard has
        fewer batches than another worker's), or the streamed shard with a seeded local shuffle."""
        bs = self.tcfg.batch_size
        if self.local is None and self.cfg.ray.shard_mode == "memory":
            return []
        if self.local is None:
            return (to_batch(table_columns(t)) for t in self.shard.iter_batches(
                batch_size=bs, batch_format="pyarrow", local_shuffle_buffer_size=4 * bs, local_shuffle_seed=seed))
        rng = np.random.default_rng(seed)
        n = len(self.local["user"])
        order = rng.permutation(n)
        groups = [order[i : i + bs] for i in range(0, n, bs)][: self.n_steps]
        while len(groups) < self.n_steps:
            groups.append(rng.choice(n, min(bs, n), replace=False))
        return (to_batch({k: v[idx] for k, v in self.local.items()}) for idx in groups)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        teacher = None
        if self.teachers:
            with torch.inference_mode():
                outs = [t(batch) for t in self.teachers]
            # cloned outside inference mode: the loss may keep them for its backward pass
            teacher = {h: torch.stack([o[h] for o in outs]).mean(0).clone() for h in outs[0]}
        loss, parts = pointwise_objective(model(batch), batch, teacher, alpha=self.cfg.distill.alpha if teacher
                                          else 0.0, temperature=self.cfg.distill.temperature,
                                          task_weights=dict(self.cfg.pointwise.task_weights))
        return loss, {k: float(v) for k, v in parts.items()}

    def validate(self, core: PointwiseModel) -> dict[str, float]:
        return validation_metrics(core, self.payload.valid, self.device)


# ----------------------------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class PointwiseSetup:
    dataset: Any  # the materialised Ray Dataset of the training rows
    payload: PointwisePayload
    initial: PointwiseModel
    teacher_refs: list[Any]  # object-store refs of each frozen teacher's model_state (empty when not distilling)
    uses_teacher: bool
    save: Callable[..., Path]  # save(out_dir, model, **checkpoint kwargs) writes the self-describing checkpoint


def pointwise_setup(cfg: Config, role: str, data: PointwiseData, teachers: Sequence[Path]) -> PointwiseSetup:
    """Hands the training rows to Ray Data, builds the (seeded) initial model and loads the frozen teachers."""
    import ray

    from kdray.checkpoint import CheckpointError, Vocab, empty_seen, load_checkpoint, save_checkpoint
    from kdray.distill.teacher import model_state

    uses_teacher = distilling(cfg, role)
    if uses_teacher and not teachers:
        raise KdrayError(f"distill.loss={cfg.distill.loss!r} with alpha={cfg.distill.alpha} needs a teacher checkpoint")
    refs = []
    for path in teachers if uses_teacher else []:
        ckpt = load_checkpoint(path)
        if ckpt.features != data.spec.to_json():  # ids, vocabularies and statistics: the same encoded rows
            raise CheckpointError(f"teacher {path} is not a pointwise model trained on the data in {data.path}")
        refs.append(ray.put(model_state(ckpt.model)))
    dataset = training_rows(data.train_path).materialize()
    torch.manual_seed((cfg.teacher_train if role == "teacher" else cfg.student_train).seed)
    initial = build_for(cfg, role, data)
    spec = data.spec

    def save(out_dir: Path, model: PointwiseModel, **kwargs: Any) -> Path:
        vocab = Vocab(user_ids=np.asarray(spec.user_ids, str), item_ids=np.asarray(spec.item_ids, str),
                      seen=empty_seen(data.n_users, data.n_items))
        return save_checkpoint(out_dir, model, vocab=vocab, features=spec.to_json(), **kwargs)

    return PointwiseSetup(dataset=dataset, payload=PointwisePayload(valid=data.columns("valid")), initial=initial,
                          teacher_refs=refs, uses_teacher=uses_teacher, save=save)


def lineage_distill(cfg: Config) -> dict[str, Any]:
    return {**to_dict(cfg.distill), "task_weights": dict(cfg.pointwise.task_weights)}
