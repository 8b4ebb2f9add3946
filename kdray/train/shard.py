"""A Train worker's shard of ``train_by_user.parquet`` as kdray batches: held in memory and re-batched every epoch
(``ray.shard_mode = "memory"``), or streamed from Ray Data one Arrow table at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.train.objective import Batch, batch_from_lists


def training_rows(path: Path) -> Any:
    """The training table as a Ray Dataset, read by the driver and handed to Ray Data in memory.

    ``ray.data.read_parquet`` would schedule list and read tasks for a file the driver has just written: 3-6 s per
    training on a small cluster, paid by every stage and every Tune trial. The table is the prepared training split,
    which the driver already held in memory to write it.
    """
    import ray.data

    return ray.data.from_arrow(pq.read_table(path))


@dataclass
class LocalShard:
    users: np.ndarray  # [U] dense user ids of this shard's rows
    offsets: np.ndarray  # [U + 1] Arrow-style offsets into items
    items: np.ndarray  # [nnz]
    teacher_items: np.ndarray | None = None  # [U, K] (cached top-K mode)

    @classmethod
    def from_tables(cls, tables: list[pa.Table]) -> "LocalShard":
        if not tables:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
        # user order: the row permutation of each epoch must not depend on the order Ray Data delivered blocks in
        table = pa.concat_tables(tables).sort_by("user").combine_chunks()
        lists = table.column("items").chunk(0) if table.num_rows else pa.array([], pa.list_(pa.int64()))
        offsets = lists.offsets.to_numpy().astype(np.int64)
        t_items = None
        if "t_items" in table.column_names:
            t_items = np.stack(table.column("t_items").to_numpy(zero_copy_only=False)).astype(np.int64)
        return cls(users=table.column("user").to_numpy().astype(np.int64), offsets=offsets - offsets[0],
                   items=lists.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64),
                   teacher_items=t_items)

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
            None if self.teacher_items is None else self.teacher_items[idx])


def table_batch(table: pa.Table) -> Batch:
    lists = table.column("items").combine_chunks()
    t_items = None
    if "t_items" in table.column_names:
        t_items = np.stack(table.column("t_items").to_numpy(zero_copy_only=False))
    return batch_from_lists(table.column("user").to_numpy(), lists.offsets.to_numpy(), lists.values.to_numpy(),
                            t_items)


