"""How popular, in the training split, are the items that trained models put in their top K?

    python benchmarks/recommended_popularity.py --config configs/gowalla.yaml --checkpoint CKPT [--checkpoint ...] \\
        [--k 20] [--out OUT.json] data.path=DATA/gowalla

Two models can tie on validation and part on test when the test pairs lean to other items than the validation
pairs (Gowalla's test.txt leans to popular ones: benchmarks/split_popularity.py). This ranks the whole catalog for
every test user as ``kdray eval`` does (training and validation items masked) and reports, for each checkpoint, the
training popularity of the top-K items it recommends: mean, median and the share among the 1% and 10% most popular
items, beside the same figures for the validation and test pairs themselves. The data set is prepared as the config
prepares it, into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.split_popularity import popularity_stats  # noqa: E402
from kdray.checkpoint import check_matches_data, load_checkpoint  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402
from kdray.metrics import mask_excluded  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.sparse import Csr  # noqa: E402


def popularity_summary(items: np.ndarray, popularity: np.ndarray) -> dict[str, float]:
    """Training popularity of ``items`` (item ids, one per recommendation or pair), with their count."""
    return {"n": int(items.size), **popularity_stats(items, popularity)}


def recommended_items(model: torch.nn.Module, data: Any, k: int, batch_size: int = 1024) -> np.ndarray:
    """The top-``k`` item ids ``[U_test, k]`` of every user with test pairs, training and validation items masked."""
    users = np.flatnonzero(data.test.row_lengths() > 0)
    out = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, users.size, batch_size):
            batch = users[start : start + batch_size]
            scores = model.score_all(torch.as_tensor(batch, dtype=torch.int64)).float()  # [B, I]
            out.append(mask_excluded(scores, batch, [data.train, data.valid]).topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def checkpoint_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments of a script that scores trained checkpoints on a config's data set: ``--config``,
    ``--checkpoint`` (repeated), ``--k``, ``--out`` and ``key=value`` overrides (benchmarks/history_graph.py too)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None)
    p.add_argument("--checkpoint", action="append", required=True, help="a model's RUN/teacher (or RUN/student)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.path=...)")
    a = p.parse_args(argv)
    if a.k <= 0:
        p.error(f"--k must be positive, got {a.k}")
    return a


def prepared_checkpoints(a: argparse.Namespace, runs: str, name: str) -> tuple[Any, Any, list[Any]]:
    """The config, its data set prepared under ``runs``, and each ``--checkpoint`` loaded and checked against that
    catalog. A bad key, a missing file or a checkpoint of another catalog raises KdrayError saying which."""
    cfg = load_config(a.config, [f"runs_dir={runs}", f"name={name}", *a.overrides])
    data = prepare_data(cfg)
    checkpoints = [load_checkpoint(path) for path in a.checkpoint]
    for ckpt in checkpoints:
        check_matches_data(ckpt, data)
    return cfg, data, checkpoints


def main(argv: Sequence[str] | None = None) -> int:
    a = checkpoint_args(__doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory() as runs:
        try:
            _, data, checkpoints = prepared_checkpoints(a, runs, "popularity")
        except KdrayError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        popularity = data.item_popularity()
        result: dict[str, Any] = {
            "command": shlex.join(["python", "benchmarks/recommended_popularity.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "k": a.k, "valid_pairs": popularity_summary(data.valid.indices, popularity),
            "test_pairs": popularity_summary(data.test.indices, popularity), "models": {}}
        print(f"{'':<44} {'n':>9} {'mean pop':>9} {'median':>7} {'top 1%':>7} {'top 10%':>8}")
        rows = [("validation pairs", result["valid_pairs"]), ("test pairs", result["test_pairs"])]
        known = Csr.union(data.train, data.valid)  # a graph model ranks over it, as kdray eval does (with_history)
        for path, ckpt in zip(a.checkpoint, checkpoints):
            model = ckpt.model.with_history(known)
            summary = popularity_summary(recommended_items(model, data, a.k).ravel(), popularity)
            result["models"][path] = {"model": ckpt.args, **summary}
            rows.append((f"top {a.k} of {Path(path).parent.name}/{Path(path).name}", summary))
        for name, s in rows:
            print(f"{name[:44]:<44} {s['n']:>9,} {s['mean']:>9.1f} {s['median']:>7.0f} {s['share_top1pct']:>7.1%} "
                  f"{s['share_top10pct']:>8.1%}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
