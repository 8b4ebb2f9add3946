"""kdray's training epochs in a plain process, without Ray: the reference that benchmarks/ray_overhead.py times Ray
Train against, and the loop of benchmarks/epoch_pilot.py.

The same pieces as a Ray Train worker: the model of the config, Adam with the config's settings, the training rows
re-batched by users (``LocalShard``), the shared objective and ``kdray.train.run_epoch``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kdray

from kdray.data.prepare import TRAIN_BY_USER  # noqa: E402
from kdray.models import RecModel, model_from_config  # noqa: E402
from kdray.train.loop import run_epoch  # noqa: E402
from kdray.train.objective import Objective, batch_loss, sampling_log_q  # noqa: E402
from kdray.train.shard import LocalShard  # noqa: E402


def plain_setup(cfg: Any, data: Any, role: str) -> tuple[RecModel, torch.optim.Optimizer, LocalShard, Objective]:
    """What a Ray Train worker builds before its first epoch: the ``role`` model of ``cfg`` (seeded), Adam with the
    config's settings, the training rows re-batched by users, and the objective."""
    tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
    torch.manual_seed(tcfg.seed)
    model = model_from_config(cfg.teacher if role == "teacher" else cfg.student, data)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    shard = LocalShard.from_tables([pq.read_table(data.path / TRAIN_BY_USER)])
    return model, opt, shard, Objective.from_config(cfg, role, data.n_items)


def plain_training(cfg: Any, data: Any, role: str, teachers: Sequence[RecModel] = (),
                   seed_of: Callable[[int], int] = lambda epoch: epoch) -> Iterator[tuple[RecModel, float]]:
    """Trains the ``role`` model of ``cfg`` epoch after epoch, yielding the model and the epoch's seconds after each
    (for as long as the caller asks). ``seed_of(epoch)`` (0-based) seeds the epoch's shuffle, negative sampling and
    torch's global generator."""
    tcfg = cfg.teacher_train if role == "teacher" else cfg.student_train
    model, opt, shard, obj = plain_setup(cfg, data, role)
    log_q = sampling_log_q(data.item_popularity()) if obj.sampled else None
    n_steps = -(-len(shard) // tcfg.batch_size)
    epoch = 0
    while True:
        seed = seed_of(epoch)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        batches = shard.batches(tcfg.batch_size, n_steps, np.random.default_rng(seed))
        start = time.perf_counter()
        run_epoch(model, opt, batches, lambda m, b: batch_loss(m, list(teachers), b, obj, log_q, gen))
        yield model, time.perf_counter() - start
        epoch += 1
