"""The one Ray Train per-worker loop, shared by teacher, student and Tune trials.

Three layers, as in Ray's own examples:

* :func:`train_worker` runs on every Train worker. It reads its shard of ``train_by_user.parquet`` from Ray Data
  (``get_dataset_shard``), builds the model (DDP through ``prepare_model``), and per epoch: trains on its shard with
  :func:`kdray.train.objective.batch_loss`, evaluates full-ranking validation metrics on its slice of users (sums are
  all-reduced so every worker sees the same numbers and stops at the same epoch), and reports them with a checkpoint
  written by rank 0. Whether it trains a teacher or a student is a parameter: a student receives the frozen teachers
  through the object store (put once by the driver, fetched once per worker) or their cached top-K in its shard.
* :func:`kdray.train.driver.train_model` is the driver: it builds the Ray Dataset, the ``TorchTrainer`` and its configs, runs ``fit``,
  and exports the best checkpoint (by the validation metric) as a self-describing kdray checkpoint.
* kdray.tune calls the same driver for every trial.

Resuming: a worker that dies makes Ray Train restart the worker group (``ray.max_failures`` times), and a new driver
running the same command restores the run whose ``RunConfig(name, storage_path)`` already exists; either way the loop
resumes from ``ray.train.get_checkpoint()``, the latest epoch's checkpoint (model, optimiser, epoch, early-stopping
state, history). No random-number state needs saving: every epoch reseeds the shuffle, dropout and negative sampling
from (seed, epoch, rank), and a shard's rows are put in user order whatever order Ray Data delivers its blocks in, so
a resumed run repeats exactly the epochs it had not finished (bit for bit with one worker and one thread per worker on
CPU). Only the unfinished epoch is lost; ``resumed_after`` in the exported metrics lists the epochs resumed after.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from kdray.checkpoint import read_epoch_state, write_epoch_state
from kdray.config import Config, from_dict
from kdray.data.prepare import PreparedData
from kdray.distill.teacher import frozen, rebuild
from kdray.errors import KdrayError
from kdray.metrics import full_ranking_evaluate
from kdray.models import RecModel
from kdray.sparse import Csr
from kdray.train.objective import Batch, Objective, batch_loss, sampling_log_q
from kdray.train.progress import send
from kdray.train.shard import LocalShard, table_batch

FAILURE_KEY = "failure"  # a reported metric that carries why training stopped (a non-finite loss)
FAILURE_FILE = "failure.json"  # the weightless checkpoint that records it (so a resumed run stops the same way)
FAILED_SCORE = -1.0  # the failure's selection metric: below every real ranking metric, never the best checkpoint


class NonFiniteLossError(KdrayError, FloatingPointError):
    """The training loss became NaN or infinite (usually a learning rate that is too high)."""


# ----------------------------------------------------------------------------------------------------------------
# What every worker needs besides its shard: put into the object store once by the driver.


@dataclass(frozen=True)
class WorkerPayload:
    n_users: int
    n_items: int
    train: Csr  # masks training items during validation
    valid: Csr
    item_counts: np.ndarray  # [n_items] training popularity: the sampled-softmax proposal
    user_features: np.ndarray | None
    item_features: np.ndarray | None


def payload_for(data: PreparedData) -> WorkerPayload:
    return WorkerPayload(n_users=data.n_users, n_items=data.n_items, train=data.train, valid=data.valid,
                         item_counts=data.item_popularity(), user_features=data.user_features,
                         item_features=data.item_features)


# ----------------------------------------------------------------------------------------------------------------
# Validation: every worker ranks the full catalog for its slice of users; sums are all-reduced.


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max over the workers (the values themselves outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _rows_subset(csr: Csr, keep: np.ndarray) -> Csr:
    """The same matrix with every row not in ``keep`` emptied."""
    lengths = np.zeros(csr.n_rows, dtype=np.int64)
    lengths[keep] = csr.row_lengths()[keep]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([csr.row(int(u)) for u in keep]) if keep.size else np.zeros(0, np.int64)
    return Csr(indptr=indptr, indices=indices.astype(np.int64), n_rows=csr.n_rows, n_cols=csr.n_cols)


def distributed_evaluate(model: RecModel, truth: Csr, exclude: list[Csr], ks: Sequence[int], batch_size: int,
                         device: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Full-ranking metrics over all users with truth items, each worker taking users ``rank::world``."""
    model.eval()
    mine = np.arange(rank, truth.n_rows, world)
    local_truth = truth if world == 1 else _rows_subset(truth, mine)
    with torch.inference_mode():
        res = full_ranking_evaluate(model.score_all, local_truth, exclude, ks, batch_size=batch_size, device=device)
    n = res["n_users_evaluated"]
    names = sorted(k for k in res if "@" in k)
    sums = _all_reduce([res[k] * n if n else 0.0 for k in names] + [float(n)])  # a worker may have no users
    total = sums[-1]
    out = {k: (s / total if total else float("nan")) for k, s in zip(names, sums)}
    out["n_users_evaluated"] = int(total)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The per-worker loop.


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Any],
              loss_fn: LossFn) -> tuple[dict[str, float], int, str | None]:
    """One pass over ``batches`` with ``loss_fn(model, batch) -> (loss, parts)`` (a task's batch objective): the
    training steps shared by every worker and task (and by the plain-PyTorch reference in benchmarks/). Returns summed
    loss parts, the step count, and why it stopped early (a non-finite loss) or None."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for step, batch in enumerate(batches):
        loss, parts = loss_fn(model, batch)
        # All workers agree before anyone stops, or the others would hang in the gradient all-reduce.
        if _all_reduce([0.0 if torch.isfinite(loss) else 1.0], "max")[0] > 0:
            return sums, steps, f"the loss became non-finite ({float(loss)}) at step {step + 1}"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return sums, steps, None


def _report_failure(failure: str, metric: str, rank: int) -> None:
    """Reports why training stopped with a weightless checkpoint: V2's ``Result.metrics`` comes from the latest report
    that carried a checkpoint, and a raise would make Ray Train restart the workers into the same NaN."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / FAILURE_FILE).write_text(json.dumps({"failure": failure}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({metric: FAILED_SCORE, FAILURE_KEY: failure}, checkpoint=checkpoint)


class RankingTask:
    """The ranking task's batches (the shard of ``train_by_user.parquet``), batch objective
    (:func:`kdray.train.objective.batch_loss`) and validation (full ranking, :func:`distributed_evaluate`); the
    pointwise task's counterpart is :class:`kdray.train.pointwise.PointwiseTask`."""

    def __init__(self, cfg: Config, role: str, payload: WorkerPayload, teachers: Sequence[RecModel], shard: Any,
                 device: torch.device, rank: int, world: int):
        self.tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
        self.cfg, self.payload, self.teachers, self.shard = cfg, payload, list(teachers), shard
        self.device, self.rank, self.world = device, rank, world
        self.objective = Objective.from_config(cfg, role, payload.n_items)
        self.log_q = sampling_log_q(payload.item_counts) if self.objective.sampled else None
        self.gen = torch.Generator()
        self.local = None
        if cfg.ray.shard_mode == "memory":
            self.local = LocalShard.from_tables(list(shard.iter_batches(batch_size=4096, batch_format="pyarrow")))
            # every DDP worker must take the same number of steps, or the gradient all-reduce hangs
            self.n_steps = max(1, int(_all_reduce([float(math.ceil(len(self.local) / self.tcfg.batch_size))],
                                                  "max")[0]))

    def batches(self, seed: int) -> Iterable[Batch]:
        self.gen = torch.Generator().manual_seed(seed)  # negative sampling
        if self.local is not None:
            return self.local.batches(self.tcfg.batch_size, self.n_steps, np.random.default_rng(seed))
        return (table_batch(t) for t in self.shard.iter_batches(
            batch_size=self.tcfg.batch_size, batch_format="pyarrow",
            local_shuffle_buffer_size=4 * self.tcfg.batch_size, local_shuffle_seed=seed))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return batch_loss(model, self.teachers, batch.to(self.device), self.objective, self.log_q, self.gen)

    def validate(self, core: RecModel) -> dict[str, float]:
        return distributed_evaluate(core, self.payload.valid, [self.payload.train], self.cfg.eval.ks,
                                    self.cfg.eval.batch_size, self.device, self.rank, self.world)


def threads(cfg: Config) -> int:
    return cfg.ray.threads_per_worker or max(1, int(round(cfg.ray.cpus_per_worker)))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's epoch (0-based): its shuffle, negative sampling and dropout."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_config`` is built by :func:`kdray.train.driver.train_model`."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: Config = from_dict(loop_config["config"])
    role: str = loop_config["role"]
    tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(threads(cfg))
    device = ray.train.torch.get_device()
    payload = ray.get(loop_config["payload"])
    metric = cfg.select_metric
    feed = loop_config.get("progress")  # the driver's EpochFeed queue, or None

    def say(text: str, **fields: Any) -> None:
        """Rank 0's line for the worker log (``[role] text``) and the same news, as data, for the driver."""
        if rank == 0:
            print(f"[{role}] {text}", flush=True)
            send(feed, {"text": text, **fields})

    model = rebuild(ray.get(loop_config["init_state"]), device)  # built (and seeded) once by the driver
    teachers = [frozen(rebuild(ray.get(ref), device)) for ref in loop_config.get("teachers", [])]
    model = ray.train.torch.prepare_model(model)
    core: RecModel = getattr(model, "module", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    start_epoch, best, bad_epochs, history, resumed_after = 0, -math.inf, 0, [], []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            if (Path(d) / FAILURE_FILE).exists():  # the run already failed deterministically: say so again
                _report_failure(json.loads((Path(d) / FAILURE_FILE).read_text())["failure"], metric, rank)
                return
            _, weights, state = read_epoch_state(Path(d), map_location=device)
            core.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
        history = json.loads(state["history"])
        resumed_after = [*state.get("resumed_after", []), start_epoch]  # a worker-group restart or a new driver
        say(f"resuming after epoch {start_epoch} (best {metric} {best:.4f})")
        if tcfg.patience > 0 and bad_epochs >= tcfg.patience:
            # It had stopped early and only its export was lost (a driver killed after fit): train no further epoch,
            # or the rerun would train one more than the uninterrupted run and might pick another best model.
            start_epoch = tcfg.epochs

    # What differs between the tasks (batches from the shard, the batch objective, validation) is chosen here, once.
    shard = ray.train.get_dataset_shard("train")
    if cfg.task == "pointwise":
        from kdray.train.pointwise import PointwiseTask

        task: Any = PointwiseTask(cfg, role, payload, teachers, shard, device,
                                  lambda v: _all_reduce([v], "max")[0])
    else:
        task = RankingTask(cfg, role, payload, teachers, shard, device, rank, world)
    for epoch in range(start_epoch, tcfg.epochs):
        t0 = time.perf_counter()
        seed = epoch_seed(tcfg.seed, epoch, rank)
        torch.manual_seed(seed)  # dropout
        sums, steps, failure = run_epoch(model, optimizer, task.batches(seed), task.loss)
        if failure is None and not all(bool(torch.isfinite(p).all()) for p in core.parameters()):
            failure = "the model's weights became non-finite"  # identical on every DDP worker: no vote needed
        if failure is not None:
            failure = (f"{role} training: {failure} at epoch {epoch + 1}; lower {role}_train.lr (now {tcfg.lr}) "
                       "or check the data")
            # Reported, not raised (see _report_failure); no weights are checkpointed, so a NaN model never becomes
            # the best checkpoint.
            if rank == 0:
                print(f"[{role}] {failure}", flush=True)
            _report_failure(failure, metric, rank)
            return
        train_seconds = time.perf_counter() - t0
        if cfg.has_validation:
            val = task.validate(core)
            score = val[metric]
            improved = score > best
            best, bad_epochs = (score, 0) if improved else (best, bad_epochs + 1)
            val_text = f"val {metric} {score:.4f}{' *' if improved else ''}"
        else:  # no validation split: the driver keeps the last epoch (the config made patience 0)
            val, val_text = {}, "(no validation split)"
        stop = tcfg.patience > 0 and bad_epochs >= tcfg.patience
        record = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}, **val,
                  **({"best": best} if val else {}), "train_seconds": train_seconds,
                  "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        report = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        parts_text = " ".join(f"{k} {v / max(steps, 1):.4f}" for k, v in sums.items())
        say(f"epoch {epoch + 1}/{tcfg.epochs} {parts_text} {val_text} ({record['epoch_seconds']:.1f}s)",
            epoch=epoch + 1, epochs=tcfg.epochs, metrics=report)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                write_epoch_state(Path(tmp), core, {
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best, "bad_epochs": bad_epochs,
                    "history": json.dumps(history), "resumed_after": resumed_after})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**report, "should_checkpoint": True}, checkpoint=checkpoint)
        if stop:
            say(f"early stop: no {metric} improvement for {tcfg.patience} epochs", final=True)
            break
