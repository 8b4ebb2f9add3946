"""The Ray Train driver: builds the Ray Dataset and the ``TorchTrainer`` for one teacher or student, runs ``fit``, and
exports the best epoch (by the validation metric) as a self-describing kdray checkpoint. kdray.tune calls it for every
trial."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kdray.checkpoint import (
    Vocab,
    check_matches_data,
    check_trained_within,
    load_checkpoint,
    read_epoch_model,
    read_epoch_state,
    save_checkpoint,
)
from kdray.config import Config, to_dict
from kdray.data.prepare import TRAIN_BY_USER, PreparedData
from kdray.distill.teacher import TeacherTopK, model_state, pca_init_state
from kdray.errors import DataError, KdrayError
from kdray.layout import RunLayout
from kdray.models import RecModel, count_parameters, model_from_config
from kdray.train.loop import (
    FAILURE_KEY,
    NonFiniteLossError,
    payload_for,
    threads,
    train_worker,
)
from kdray.train.objective import Objective
from kdray.train.progress import EpochFeed, Event
from kdray.train.shard import training_rows


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint: Path  # the exported self-describing checkpoint of the best epoch
    metrics: dict[str, Any]  # its validation metrics
    history: list[dict[str, Any]] = field(repr=False)
    train_seconds: float = 0.0
    n_params: int = 0


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.device == "cpu":
        return False
    if cfg.device == "cuda" or cfg.ray.use_gpu:
        return True
    return ray.cluster_resources().get("GPU", 0) >= cfg.ray.num_workers


def _user_error(error: BaseException) -> BaseException:
    """The KdrayError a worker raised, if that is what failed the run; else the error itself (a bug or a crash)."""
    seen, stack = set(), [error, *getattr(error, "worker_failures", {}).values()]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KdrayError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, getattr(e, "controller_failure", None)]
    return error


@dataclass(frozen=True)
class TrainSetup:
    """What one task gives the driver: the training rows, the worker payload, the initial model, the frozen
    teachers (object-store refs), and how to export a checkpoint (``save(out_dir, model, **kwargs)``)."""

    dataset: Any
    payload: Any
    initial: Any
    teacher_refs: list[Any]  # object-store refs of each frozen teacher's model_state (empty: no live teacher)
    uses_teacher: bool
    save: Any
    distill_record: dict[str, Any] | None  # the lineage's distillation settings (None: not distilled)


def _ranking_setup(cfg: Config, role: str, data: PreparedData, teachers: Sequence[Path],
                   initial_model: RecModel | None = None) -> TrainSetup:
    import ray

    objective = Objective.from_config(cfg, role, data.n_items)
    if role == "student" and objective.distilling and not teachers:
        raise KdrayError(f"distill.loss={cfg.distill.loss!r} with alpha={cfg.distill.alpha} needs a teacher checkpoint")
    uses_teacher = objective.distilling or (role == "student" and cfg.distill.init_from_teacher)
    teacher_ckpts = [load_checkpoint(p) for p in teachers] if uses_teacher else []
    for ckpt in teacher_ckpts:
        check_matches_data(ckpt, data)
        check_trained_within(ckpt, data)

    if cfg.has_validation and data.valid.nnz == 0:  # else every epoch's validation metric is NaN
        raise DataError(f"the validation split of {data.path} is empty (data.split_ratios {list(cfg.data.split_ratios)}"
                        " gave no user a validation item): raise its second ratio, or set it to 0 to train without "
                        "validation (patience 0, the last epoch kept)")
    dataset = training_rows(data.path / TRAIN_BY_USER)
    teacher_refs = [ray.put(model_state(c.model)) for c in teacher_ckpts] if objective.distilling else []
    if cfg.distill.cached_topk and teacher_refs:
        weights = list(cfg.distill.teacher_weights) or None
        dataset = dataset.map_batches(TeacherTopK, fn_constructor_kwargs=dict(
            teachers=teacher_refs, weights=weights, k=cfg.distill.topk, n_threads=threads(cfg)),
            batch_size=cfg.eval.batch_size, batch_format="pyarrow", concurrency=1,
            num_cpus=min(1.0, cfg.ray.cpus_per_worker))
        teacher_refs = []  # the student reads the cache with its shard and needs no live teacher
    dataset = dataset.materialize()  # frees the CPUs Ray Data would hold while the workers run (else 2 workers on 2 CPUs can deadlock)

    # The initial model is built here, seeded, and sent once through the object store: side-feature buffers, a
    # LightGCN's training graph and a teacher-initialised start travel with it, and every worker starts from
    # identical weights.
    torch.manual_seed((cfg.teacher_train if role == "teacher" else cfg.student_train).seed)
    if initial_model is not None:  # a warm start (kdray.train.update): its weights, no teacher-initialised start
        initial = initial_model
    else:
        initial = model_from_config(cfg.teacher if role == "teacher" else cfg.student, data)
        if role == "student" and cfg.distill.init_from_teacher and teacher_ckpts:
            initial.load_state_dict(pca_init_state(initial, teacher_ckpts[0].model))

    def save(out_dir: Path, model: Any, **kwargs: Any) -> Path:
        return save_checkpoint(out_dir, model, vocab=Vocab(user_ids=data.user_ids, item_ids=data.item_ids,
                                                           seen=data.train), **kwargs)

    return TrainSetup(dataset=dataset, payload=payload_for(data), initial=initial, teacher_refs=teacher_refs,
                      uses_teacher=uses_teacher, save=save,
                      distill_record=to_dict(cfg.distill) if objective.distilling else None)


def train_model(cfg: Config, role: str, data: Any, *, out_dir: Path, name: str,
                teachers: Sequence[Path] = (), storage_path: str | None = None,
                callbacks: Sequence[Any] = (), stage_key: str | None = None,
                progress: Callable[[Event], None] | None = None,
                initial_model: RecModel | None = None) -> TrainOutcome:
    """Trains a teacher or a student on Ray Train and exports its best epoch to ``out_dir``. ``data`` is the
    task's prepared data (``PreparedData`` for ranking, ``PointwiseData`` for the pointwise task).

    ``name`` is the Ray Train run name: rerunning with the same name and storage resumes an interrupted run.
    ``progress`` receives each epoch's record (kdray.train.progress) in this process while ``fit`` runs.
    ``initial_model`` (sized to ``data``) warm-starts training from its weights instead of a fresh seeded model and
    the teacher-initialised start (kdray.train.update's incremental refresh; ranking task).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
    if cfg.task == "pointwise":
        from kdray.train.pointwise import lineage_distill, pointwise_setup

        p = pointwise_setup(cfg, role, data, teachers)
        setup = TrainSetup(dataset=p.dataset, payload=p.payload, initial=p.initial, teacher_refs=p.teacher_refs,
                           uses_teacher=p.uses_teacher, save=p.save,
                           distill_record=lineage_distill(cfg) if p.uses_teacher else None)
    else:
        setup = _ranking_setup(cfg, role, data, teachers, initial_model)

    use_gpu = resolve_use_gpu(cfg)
    storage = storage_path or cfg.ray.storage_path or str(RunLayout(cfg.run_dir).ray.resolve())
    feed = EpochFeed(progress) if progress is not None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": to_dict(cfg), "role": role, "payload": ray.put(setup.payload),
            "init_state": ray.put(model_state(setup.initial)), "teachers": setup.teacher_refs,
            "progress": feed.queue if feed is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=list(callbacks) or None,
            # the best epoch by the validation metric, or without a validation split the latest
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.select_metric, checkpoint_score_order="max")
            if cfg.has_validation else ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures)),
        datasets={"train": setup.dataset},
    )
    t0 = time.perf_counter()
    try:
        with feed or contextlib.nullcontext():
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _user_error(e) from None
    seconds = time.perf_counter() - t0
    if result.error is not None:
        raise _user_error(result.error) from None
    if FAILURE_KEY in (result.metrics or {}):
        raise NonFiniteLossError(result.metrics[FAILURE_KEY])
    if not result.best_checkpoints:
        raise KdrayError(f"{role} training reported no checkpoint (see the worker logs under {storage}/{name})")
    if cfg.has_validation:
        best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][cfg.select_metric])
    else:
        best_ckpt, best_metrics = result.best_checkpoints[-1]
    with result.checkpoint.as_directory() as d:
        _, _, last = read_epoch_state(Path(d))
    history = json.loads(last["history"])
    with best_ckpt.as_directory() as d:
        model = read_epoch_model(Path(d))
    val = {f"valid_{k}": v for k, v in best_metrics.items() if "@" in k or k in ("auc", "logloss", "rmse")}
    metrics = {**val, "best_epoch": int(best_metrics["epoch"]), "epochs_run": len(history),
               "resumed_after": list(last.get("resumed_after", [])), "train_seconds": seconds,
               "n_params": count_parameters(model)}
    lineage = {"teachers": [str(Path(p).resolve()) for p in teachers] if setup.uses_teacher else [],
               "distill": setup.distill_record, "ray_run": f"{storage}/{name}", "stage_key": stage_key}
    setup.save(out_dir, model, role=role, config=to_dict(cfg), metrics={**metrics, "history": history},
               lineage=lineage)
    return TrainOutcome(checkpoint=Path(out_dir), metrics=metrics, history=history, train_seconds=seconds,
                        n_params=count_parameters(model))
