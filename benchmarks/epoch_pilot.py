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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.plain_training import plain_training  # noqa: E402
from kdray.config import load_config, to_dict  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402
from kdray.evaluate import evaluate_model  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.train.loop import epoch_seed  # noqa: E402


def pilot(cfg, epochs: int, log=print) -> list[dict]:
    """The teacher of ``cfg`` trained ``epochs`` epochs; the validation metrics at ``eval.ks`` after each."""
    data = prepare_data(cfg)
    # the seeds of a one-worker kdray training's epochs (rank 0)
    training = plain_training(cfg, data, "teacher", seed_of=lambda e: epoch_seed(cfg.teacher_train.seed, e, 0))
    records = []
    for epoch, (model, seconds) in zip(range(1, epochs + 1), training):
        start = time.perf_counter()
        valid = evaluate_model(model, data, "valid", ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        record = {"epoch": epoch, "train_seconds": round(seconds, 1),
                  "eval_seconds": round(time.perf_counter() - start, 1),
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
