"""Distributed training on Ray Train: one per-worker loop for teacher, student and Tune trials, and its driver.

Three layers, as in Ray's own examples:

* :func:`train_worker` runs on every Train worker. It reads its shard of ``train_by_user.parquet`` from Ray Data
  (``get_dataset_shard``), builds the model (DDP through ``prepare_model``), and per epoch: trains on its shard with
  :func:`kdray.objective.batch_loss`, evaluates full-ranking validation metrics on its slice of users (sums are
  all-reduced so every worker sees the same numbers and stops at the same epoch), and reports them with a checkpoint
  written by rank 0. Whether it trains a teacher or a student is a parameter: a student receives the frozen teachers
  through the object store (put once by the driver, fetched once per worker) or their cached top-K in its shard.
* :func:`train_model` is the driver: it builds the Ray Dataset, the ``TorchTrainer`` and its configs, runs ``fit``,
  and exports the best checkpoint (by the validation metric) as a self-describing kdray checkpoint.
* kdray.tune imports :func:`train_model` for every trial.

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
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

from kdray.distill import losses
from kdray.checkpoint import MODEL, TRAIN_STATE, WEIGHTS, Checkpoint, Vocab, load_checkpoint, save_checkpoint
from kdray.config import Config, from_dict, to_dict
from kdray.data.prepare import PreparedData
from kdray.errors import CheckpointError, KdrayError
from kdray.metrics import full_ranking_evaluate
from kdray.models import RecModel, build_model, count_parameters, embedding_tables, model_args
from kdray.train.objective import Batch, Objective, batch_loss, batch_from_lists, sampling_log_q
from kdray.sparse import Csr

TRAIN_TABLE = "train_by_user.parquet"
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


def _payload(data: PreparedData) -> WorkerPayload:
    return WorkerPayload(n_users=data.n_users, n_items=data.n_items, train=data.train, valid=data.valid,
                         item_counts=data.item_popularity(), user_features=data.user_features,
                         item_features=data.item_features)


def _model_state(model: RecModel) -> dict[str, Any]:
    """A frozen model as plain data for the object store: arguments and CPU tensors."""
    model = getattr(model, "module", model)
    return {"args": model_args(model), "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _rebuild(state: dict[str, Any], device: torch.device | str = "cpu") -> RecModel:
    model = build_model(**state["args"])
    model.load_state_dict(state["state"])
    return model.to(device)


def _frozen(model: RecModel) -> RecModel:
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# A worker's shard, held in memory and re-batched every epoch (ray.shard_mode = "memory").


@dataclass
class LocalShard:
    users: np.ndarray  # [U] dense user ids of this shard's rows
    offsets: np.ndarray  # [U + 1] Arrow-style offsets into items
    items: np.ndarray  # [nnz]
    teacher_items: np.ndarray | None = None  # [U, K] (cached top-K mode)
    teacher_logits: np.ndarray | None = None

    @classmethod
    def from_tables(cls, tables: list[pa.Table]) -> "LocalShard":
        if not tables:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
        # user order: the row permutation of each epoch must not depend on the order Ray Data delivered blocks in
        table = pa.concat_tables(tables).sort_by("user").combine_chunks()
        lists = table.column("items").chunk(0) if table.num_rows else pa.array([], pa.list_(pa.int64()))
        offsets = lists.offsets.to_numpy().astype(np.int64)
        t_items = t_logits = None
        if "t_items" in table.column_names:
            t_items = np.stack(table.column("t_items").to_numpy(zero_copy_only=False)).astype(np.int64)
            t_logits = np.stack(table.column("t_logits").to_numpy(zero_copy_only=False)).astype(np.float32)
        return cls(users=table.column("user").to_numpy().astype(np.int64), offsets=offsets - offsets[0],
                   items=lists.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64),
                   teacher_items=t_items, teacher_logits=t_logits)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def batches(self, batch_size: int, n_steps: int, rng: np.random.Generator) -> list[Batch]:
        """``n_steps`` batches: a fresh permutation of the rows in batches of ``batch_size`` (the last may be
        partial), then, if this shard is shorter than the others', extra batches of rows drawn again: every DDP
        worker must take the same number of steps."""
        order = rng.permutation(len(self))
        groups = [order[i : i + batch_size] for i in range(0, order.size, batch_size)][:n_steps]
        while len(groups) < n_steps and order.size:
            groups.append(rng.choice(order, min(batch_size, order.size), replace=False))
        return [self._batch(np.sort(idx)) for idx in groups]

    def _batch(self, idx: np.ndarray) -> Batch:
        lengths = self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # positions of the chosen rows' items in self.items, without a Python loop over rows
        starts = np.repeat(self.offsets[idx] - offsets[:-1], lengths)
        values = self.items[starts + np.arange(offsets[-1])]
        return batch_from_lists(
            self.users[idx], offsets, values,
            None if self.teacher_items is None else self.teacher_items[idx],
            None if self.teacher_logits is None else self.teacher_logits[idx])


def _table_batch(table: pa.Table) -> Batch:
    lists = table.column("items").combine_chunks()
    t_items = t_logits = None
    if "t_items" in table.column_names:
        t_items = np.stack(table.column("t_items").to_numpy(zero_copy_only=False))
        t_logits = np.stack(table.column("t_logits").to_numpy(zero_copy_only=False))
    return batch_from_lists(table.column("user").to_numpy(), lists.offsets.to_numpy(), lists.values.to_numpy(),
                            t_items, t_logits)


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


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
              teachers: Sequence[RecModel], objective: Objective, device: torch.device | str,
              log_q: torch.Tensor | None, gen: torch.Generator | None) -> tuple[dict[str, float], int, str | None]:
    """One pass over ``batches``: the training steps shared by every worker (and by the plain-PyTorch reference in
    benchmarks/). Returns summed loss parts, the step count, and why it stopped early (a non-finite loss) or None."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for step, batch in enumerate(batches):
        loss, parts = batch_loss(model, teachers, batch.to(device), objective, log_q, gen)
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


def _threads(cfg: Config) -> int:
    return cfg.ray.threads_per_worker or max(1, int(round(cfg.ray.cpus_per_worker)))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_config`` is built by :func:`train_model`."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: Config = from_dict(loop_config["config"])
    role: str = loop_config["role"]
    tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg))
    device = ray.train.torch.get_device()
    payload: WorkerPayload = ray.get(loop_config["payload"])
    metric = cfg.select_metric

    model = _rebuild(ray.get(loop_config["init_state"]), device)  # built (and seeded) once by the driver
    teachers = [_frozen(_rebuild(ray.get(ref), device)) for ref in loop_config.get("teachers", [])]
    objective = Objective.from_config(cfg, role, payload.n_items)
    log_q = sampling_log_q(payload.item_counts) if objective.sampled else None
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
            core.load_state_dict(torch.load(Path(d) / WEIGHTS, map_location=device, weights_only=True))
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
        history = json.loads(state["history"])
        resumed_after = [*state.get("resumed_after", []), start_epoch]  # a worker-group restart or a new driver
        if rank == 0:
            print(f"[{role}] resuming after epoch {start_epoch} (best {metric} {best:.4f})", flush=True)
        if tcfg.patience > 0 and bad_epochs >= tcfg.patience:
            # It had stopped early and only its export was lost (a driver killed after fit): train no further epoch,
            # or the rerun would train one more than the uninterrupted run and might pick another best model.
            start_epoch = tcfg.epochs

    shard = ray.train.get_dataset_shard("train")
    local = None
    if cfg.ray.shard_mode == "memory":
        local = LocalShard.from_tables(list(shard.iter_batches(batch_size=4096, batch_format="pyarrow")))
        # every DDP worker must take the same number of steps, or the gradient all-reduce hangs
        n_steps = max(1, int(_all_reduce([float(math.ceil(len(local) / tcfg.batch_size))], "max")[0]))
    for epoch in range(start_epoch, tcfg.epochs):
        t0 = time.perf_counter()
        seed = _epoch_seed(tcfg.seed, epoch, rank)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)  # negative sampling
        if local is not None:
            batches = local.batches(tcfg.batch_size, n_steps, np.random.default_rng(seed))
        else:
            batches = (_table_batch(t) for t in shard.iter_batches(
                batch_size=tcfg.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=4 * tcfg.batch_size,
                local_shuffle_seed=seed))
        sums, steps, failure = run_epoch(model, optimizer, batches, teachers, objective, device, log_q, gen)
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
        val = distributed_evaluate(core, payload.valid, [payload.train], cfg.eval.ks, cfg.eval.batch_size,
                                   device, rank, world)
        score = val[metric]
        improved = score > best
        best, bad_epochs = (score, 0) if improved else (best, bad_epochs + 1)
        stop = tcfg.patience > 0 and bad_epochs >= tcfg.patience
        record = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}, **val,
                  "best": best, "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        if rank == 0:
            parts_text = " ".join(f"{k} {v / max(steps, 1):.4f}" for k, v in sums.items())
            print(f"[{role}] epoch {epoch + 1}/{tcfg.epochs} {parts_text} val {metric} {score:.4f}"
                  f"{' *' if improved else ''} ({record['epoch_seconds']:.1f}s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(core.state_dict(), Path(tmp) / WEIGHTS)
                (Path(tmp) / MODEL).write_text(json.dumps({"args": model_args(core)}))
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best": best,
                            "bad_epochs": bad_epochs, "history": json.dumps(history), "resumed_after": resumed_after},
                           Path(tmp) / TRAIN_STATE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            report = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            ray.train.report({**report, "should_checkpoint": True}, checkpoint=checkpoint)
        if stop:
            if rank == 0:
                print(f"[{role}] early stop: no {metric} improvement for {tcfg.patience} epochs", flush=True)
            break


# ----------------------------------------------------------------------------------------------------------------
# Cached teacher top-K (distill.cached_topk): Ray Data batch inference, once, before the student trains.


class TeacherTopK:
    """``map_batches`` UDF: adds each user's teacher top-K unobserved items and logits (``t_items``, ``t_logits``)."""

    def __init__(self, teachers: list[Any], weights: list[float] | None, k: int, n_threads: int = 1):
        import ray

        torch.set_num_threads(n_threads)
        states = [ray.get(t) if isinstance(t, ray.ObjectRef) else t for t in teachers]
        self.teachers = [_frozen(_rebuild(s)) for s in states]
        self.weights, self.k = weights, k

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = _table_batch(table)
        with torch.inference_mode():
            logits = [t.score_all(batch.users) for t in self.teachers]
            combined = losses.ensemble_teacher_logits(logits, self.weights, kind="rd") if len(logits) > 1 else logits[0]
            combined = combined.clone()
            combined[batch.pos_rows, batch.pos_items] = -math.inf  # unobserved items only
            values, items = combined.topk(self.k, dim=1)
        k = self.k
        return (table.append_column("t_items", pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1).numpy()), k))
                .append_column("t_logits", pa.FixedSizeListArray.from_arrays(
                    pa.array(values.reshape(-1).numpy().astype(np.float32)), k)))


# ----------------------------------------------------------------------------------------------------------------
# The knowledge-transfer start: student embeddings from the teacher's, projected by PCA.


def teacher_factors(teacher: RecModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's user and item vectors whose dot product is its score: tower outputs for a two-tower model,
    id embeddings otherwise (for NeuMF, its GMF half)."""
    with torch.no_grad():
        if hasattr(teacher, "user_vectors"):
            teacher.eval()
            return (teacher.user_vectors(torch.arange(teacher.n_users)),
                    teacher.item_vectors(torch.arange(teacher.n_items)))
        tu, ti = embedding_tables(teacher)
        return tu.weight.detach(), ti.weight.detach()


def pca_init_state(student: RecModel, teacher: RecModel) -> dict[str, torch.Tensor]:
    """The student's state dict with its id embeddings replaced by the teacher's user and item vectors projected onto
    their top principal directions (one projection shared by users and items, so that dot products keep their best
    low-rank approximation), rescaled to the student's initial scale."""
    su, si = embedding_tables(student)
    d = su.weight.shape[1]
    tu, ti = teacher_factors(teacher)
    with torch.no_grad():
        joint = torch.cat([tu, ti])  # [U + I, D]
        _, _, v = torch.linalg.svd(joint - joint.mean(0, keepdim=True), full_matrices=False)  # v: [D', D]
        proj = v[: min(d, v.shape[0])].T  # [D, d']
        u, i = tu @ proj, ti @ proj
        if u.shape[1] < d:  # a teacher narrower than the student: keep the student's own init in the rest
            u = torch.cat([u, su.weight[:, u.shape[1]:]], 1)
            i = torch.cat([i, si.weight[:, i.shape[1]:]], 1)
        scale = su.weight.std() / torch.cat([u, i]).std().clamp_min(1e-12)
        names = {id(p): n for n, p in student.named_parameters()}
        state = {k: v.clone() for k, v in student.state_dict().items()}
        state[names[id(su.weight)]] = u * scale
        state[names[id(si.weight)]] = i * scale
    return state


# ----------------------------------------------------------------------------------------------------------------
# The driver.


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


def _role_model_args(cfg: Config, role: str, data: PreparedData) -> dict[str, Any]:
    m = cfg.teacher if role == "teacher" else cfg.student
    uf, itf = data.user_features, data.item_features
    return dict(name=m.name, n_users=data.n_users, n_items=data.n_items, dim=m.dim, hidden=tuple(m.hidden),
                dropout=m.dropout, user_features=uf, item_features=itf, graph=data.train)  # graph: lightgcn only


def check_matches_data(ckpt: Checkpoint, data: PreparedData) -> None:
    """A checkpoint (a teacher, or a model to evaluate) must come from the same catalog: sizes and raw ids."""
    teacher_dir = ckpt.path
    if ckpt.model.n_items != data.n_items or ckpt.model.n_users != data.n_users:
        raise CheckpointError(
            f"checkpoint {teacher_dir} was trained on {ckpt.model.n_users} users x {ckpt.model.n_items} items, "
            f"but the data has {data.n_users} x {data.n_items}: train it on this data first")
    if not (np.array_equal(ckpt.vocab.item_ids, data.item_ids) and np.array_equal(ckpt.vocab.user_ids, data.user_ids)):
        raise CheckpointError(f"checkpoint {teacher_dir} uses different user/item ids than the data in {data.path}")


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


def train_model(cfg: Config, role: str, data: PreparedData, *, out_dir: Path, name: str,
                teachers: Sequence[Path] = (), storage_path: str | None = None,
                callbacks: Sequence[Any] = (), stage_key: str | None = None) -> TrainOutcome:
    """Trains a teacher or a student on Ray Train and exports its best epoch to ``out_dir``.

    ``name`` is the Ray Train run name: rerunning with the same name and storage resumes an interrupted run.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")
    objective = Objective.from_config(cfg, role, data.n_items)
    if role == "student" and objective.distilling and not teachers:
        raise KdrayError(f"distill.loss={cfg.distill.loss!r} with alpha={cfg.distill.alpha} needs a teacher checkpoint")
    uses_teacher = objective.distilling or (role == "student" and cfg.distill.init_from_teacher)
    teacher_ckpts = [load_checkpoint(p) for p in teachers] if uses_teacher else []
    for ckpt in teacher_ckpts:
        check_matches_data(ckpt, data)

    dataset = ray.data.read_parquet(str(data.path / TRAIN_TABLE))
    teacher_refs = [ray.put(_model_state(c.model)) for c in teacher_ckpts] if objective.distilling else []
    if cfg.distill.cached_topk and teacher_refs:
        weights = list(cfg.distill.teacher_weights) or None
        dataset = dataset.map_batches(TeacherTopK, fn_constructor_kwargs=dict(
            teachers=teacher_refs, weights=weights, k=cfg.distill.topk, n_threads=_threads(cfg)),
            batch_size=cfg.eval.batch_size, batch_format="pyarrow", concurrency=1,
            num_cpus=min(1.0, cfg.ray.cpus_per_worker))
        teacher_refs = []  # the student reads the cache with its shard and needs no live teacher
    dataset = dataset.materialize()  # frees the CPUs Ray Data would hold while the workers run (RAY_NOTES.md)

    # The initial model is built here, seeded, and sent once through the object store: side-feature buffers, a
    # LightGCN's training graph and a teacher-initialised start travel with it, and every worker starts from
    # identical weights.
    torch.manual_seed((cfg.teacher_train if role == "teacher" else cfg.student_train).seed)
    initial = build_model(**_role_model_args(cfg, role, data))
    if role == "student" and cfg.distill.init_from_teacher and teacher_ckpts:
        initial.load_state_dict(pca_init_state(initial, teacher_ckpts[0].model))

    use_gpu = resolve_use_gpu(cfg)
    storage = storage_path or cfg.ray.storage_path or str((cfg.run_dir / "ray").resolve())
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": to_dict(cfg), "role": role, "payload": ray.put(_payload(data)),
            "init_state": ray.put(_model_state(initial)), "teachers": teacher_refs,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=list(callbacks) or None,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.select_metric, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures)),
        datasets={"train": dataset},
    )
    t0 = time.perf_counter()
    try:
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
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][cfg.select_metric])
    with result.checkpoint.as_directory() as d:
        last = torch.load(Path(d) / TRAIN_STATE, weights_only=True)
    history = json.loads(last["history"])
    with best_ckpt.as_directory() as d:
        model = build_model(**json.loads((Path(d) / MODEL).read_text())["args"])
        model.load_state_dict(torch.load(Path(d) / WEIGHTS, map_location="cpu", weights_only=True))
    val = {f"valid_{k}": v for k, v in best_metrics.items() if "@" in k}
    metrics = {**val, "best_epoch": int(best_metrics["epoch"]), "epochs_run": len(history),
               "resumed_after": list(last.get("resumed_after", [])), "train_seconds": seconds,
               "n_params": count_parameters(model)}
    lineage = {"teachers": [str(Path(p).resolve()) for p in teachers] if uses_teacher else [],
               "distill": to_dict(cfg.distill) if objective.distilling else None, "ray_run": f"{storage}/{name}", "stage_key": stage_key}
    save_checkpoint(out_dir, model, role=role, config=to_dict(cfg),
                    vocab=Vocab(user_ids=data.user_ids, item_ids=data.item_ids, seen=data.train),
                    metrics={**metrics, "history": history}, lineage=lineage)
    return TrainOutcome(checkpoint=Path(out_dir), metrics=metrics, history=history, train_seconds=seconds,
                        n_params=count_parameters(model))
