"""What a graph model's test score owes to the graph it ranks over: its training graph, or every pair the test masks.

    python benchmarks/history_graph.py --config configs/gowalla.yaml --checkpoint CKPT [--checkpoint ...] \\
        [--k 20] [--out OUT.json] data.path=DATA/gowalla

The test split masks a user's training and validation items as known history, and ``kdray eval`` ranks a LightGCN
over the graph of both (``RecModel.with_history``). Before 2026-12-02 it ranked over the model's training graph.
This scores each checkpoint, and with several their equal-weight ensemble, both ways on test, side by side, with
the same weights. Models that score from their weights alone (MF) give the same number twice. The data set is
prepared as the config prepares it, into a temporary folder.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.recommended_popularity import checkpoint_args, prepared_checkpoints  # noqa: E402
from kdray.distill.teacher import Ensemble  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402
from kdray.metrics import full_ranking_evaluate  # noqa: E402
from kdray.sparse import Csr  # noqa: E402


def both_graphs(model: Any, data: Any, k: int, batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """Test recall@k and ndcg@k of ``model`` over its own training graph and over train + valid."""
    out = {}
    for graph, ranked in (("training graph", model), ("train + valid", model.with_history(
            Csr.union(data.train, data.valid)))):
        with torch.inference_mode():
            m = full_ranking_evaluate(ranked.eval().score_all, data.test, [data.train, data.valid], (k,),
                                      batch_size=batch_size)
        out[graph] = {f"recall@{k}": m[f"recall@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    a = checkpoint_args(__doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory() as runs:
        try:
            cfg, data, checkpoints = prepared_checkpoints(a, runs, "history-graph")
        except KdrayError as e:  # a bad key, a missing file, a checkpoint of another catalog: say which
            print(f"error: {e}", file=sys.stderr)
            return 2
        models = {path: ckpt.model for path, ckpt in zip(a.checkpoint, checkpoints)}
        if len(models) > 1:
            models["ensemble of all"] = Ensemble(list(models.values()))
        result: dict[str, Any] = {
            "command": shlex.join(["python", "benchmarks/history_graph.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "k": a.k, "pairs": {"train": data.train.nnz, "valid": data.valid.nnz, "test": data.test.nnz},
            "models": {}}
        for name, model in models.items():
            result["models"][name] = both_graphs(model, data, a.k, cfg.eval.batch_size)
            for graph, m in result["models"][name].items():
                print(f"{name}: over {graph}: recall@{a.k} {m[f'recall@{a.k}']:.5f} ndcg@{a.k} "
                      f"{m[f'ndcg@{a.k}']:.5f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
