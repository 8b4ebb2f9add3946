"""A few epochs of one teacher recipe in a plain process, scored on the validation split after every epoch.

Choosing a setting by full `kdray teacher` runs costs 30-60 minutes each on Gowalla on 2 cores. This trains the
teacher that a config and its overrides describe with kdray's own epoch function (``kdray.train.run_epoch``, the
objective of ``kdray.train.objective`` and the per-epoch seeds of a one-worker training), without Ray, and prints
the validation metrics after each epoch: enough to compare the first epochs of several settings side by side. Only
the validation split is read; the test split is not touched, so a setting chosen here can still be scored honestly
afterwards.

    python benchmarks/epoch_pilot.py --config configs/gowalla.yaml --epochs 4 --out OUT.json \\
        data.path=DATA/gowalla teacher.name=lightgcn teacher.dim=64 teacher.cosine_temperature=0.1 \\
        teacher_train.batch_size=1024 teacher_train.lr=0.01 teacher_train.embedding_l2=0

One JSON object per epoch on stdout; with ``--out``, the run (command, settings, epochs) as one JSON file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.config import load_config, to_dict  # noqa: E402
from kdray.data.prepare import TRAIN_BY_USER  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402
from kdray.evaluate import evaluate_model  # noqa: E402
from kdray.models import model_from_config  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.train.loop import epoch_seed, run_epoch  # noqa: E402
from kdray.train.objective import Objective, batch_loss, sampling_log_q  # noqa: E402
from kdray.train.shard import LocalShard  # noqa: E402


def pilot(cfg, epochs: int, log=print) -> list[dict]:
    """The teacher of ``cfg`` trained ``epochs`` epochs; the validation metrics at ``eval.ks`` after each."""
    data = prepare_data(cfg)
    train = cfg.teacher_train
    torch.manual_seed(train.seed)
    model = model_from_config(cfg.teacher, data)
    opt = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    shard = LocalShard.from_tables([pq.read_table(data.path / TRAIN_BY_USER)])
    obj = Objective.from_config(cfg, "teacher", data.n_items)
    log_q = sampling_log_q(data.item_popularity()) if obj.sampled else None
    n_steps = -(-len(shard) // train.batch_size)
    records = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        seed = epoch_seed(train.seed, epoch - 1, 0)  # the seeds of a one-worker kdray training's epoch
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        batches = shard.batches(train.batch_size, n_steps, np.random.default_rng(seed))
        run_epoch(model, opt, batches, lambda m, b: batch_loss(m, [], b, obj, log_q, gen))
        trained = time.perf_counter()
        valid = evaluate_model(model, data, "valid", ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        record = {"epoch": epoch, "train_seconds": round(trained - start, 1),
                  "eval_seconds": round(time.perf_counter() - trained, 1),
                  **{f"valid_{k}": round(v, 4) for k, v in valid.items() if not k.startswith("n_")}}
        log(json.dumps(record))
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two pilots can run side by side)")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = tempfile.mkdtemp(prefix="kdray-pilot-")
    try:
        cfg = load_config(a.config, [f"runs_dir={runs}", "name=pilot", *a.overrides])
        records = pilot(cfg, a.epochs)
    except KdrayError as e:  # a bad key, value or data file: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        argv_shown = list(argv if argv is not None else sys.argv[1:])
        result = {"command": shlex.join(["python", "benchmarks/epoch_pilot.py", *argv_shown]),
                  "teacher": to_dict(cfg.teacher), "teacher_train": to_dict(cfg.teacher_train),
                  "threads": a.threads, "epochs": records}
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
