"""Time-ordered replay on ml-100k: how much do fold-in, periodic refresh and a full retrain gain over a frozen student?

    python benchmarks/replay.py --data DATA/ml-100k            # ~15 min on 2 cores
    python benchmarks/replay.py --smoke-test                             # built-in synthetic data, ~3 min

u.data's ratings (every rating an interaction) are ordered by timestamp; the first 80% train a kdray run (teacher
MF-64 and distilled student MF-16, both on Ray Train, per-user random 0.8/0.1/0.1 split of that 80% for model
selection). The remaining 20% are replayed in time order in ``--chunks`` equal chunks. Before chunk c is revealed,
each strategy recommends 10 items to every user who has interactions in chunk c, and NDCG@10 is measured against
that user's chunk-c items (ideal DCG over min(|truth|, 10); every item the user interacted with before chunk c is
excluded; items the model does not know count as misses):

* popular: the training split's most popular items for everybody (the baseline);
* frozen: the run's student, as trained; a user it does not know gets the popular list;
* fold-in: the same student served with ``history`` = the user's interactions since the training cut (at most
  serve.max_history, the latest), i.e. what a client would send with each request;
* refresh: ``kdray update`` (kdray.train.update) with each chunk once it is complete, ``--update-epochs`` epochs,
  rolled out to a live Serve application (127.0.0.1) with ``--rollout``; chunk c is served by the version that has
  seen chunks < c;
* full retrain: teacher and student trained from scratch on everything before chunk c (the same epochs as the
  first run), on ``--retrain-chunks`` only (slow).

Freshness, seconds from an interaction to its effect on served recommendations: fold-in, the in-process request
time of a fold-in query (the interaction is in the next request's history); refresh, the update's wall time plus
its rollout (a periodic refresh adds the wait for the period to end); full retrain, its training time.
Results to ``--out`` (JSON) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.cli import init_ray  # noqa: E402
from kdray.config import Config, load_config  # noqa: E402
from kdray.layout import RunLayout  # noqa: E402
from kdray.pipeline import prepare_data, train_stage, train_teachers, write_resolved_config  # noqa: E402
from kdray.serve.predictor import Query, Recommender  # noqa: E402
from kdray.train.update import read_interactions, update_run  # noqa: E402

K = 10


def load_events(args: argparse.Namespace, work: Path) -> pd.DataFrame:
    """user, item (str), timestamp of every interaction, in time order (ties in file order)."""
    if args.smoke_test:
        from kdray.config import DataConfig
        from kdray.data.readers import load_raw

        raw = load_raw(DataConfig(n_users=150, n_items=120, n_interactions=4000, n_clusters=4))
        users, items = np.asarray(raw.users).astype(str), np.asarray(raw.items).astype(str)
        frame = pd.DataFrame({"user": users, "item": items, "timestamp": np.arange(users.size, dtype=np.int64)})
    else:
        frame = pd.read_csv(args.data / "u.data", sep="\t", names=["user", "item", "rating", "timestamp"],
                            dtype={"user": str, "item": str})[["user", "item", "timestamp"]]
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def base_config(args: argparse.Namespace, work: Path, name: str, train_file: Path) -> Config:
    epochs = ["teacher_train.epochs=2", "student_train.epochs=2"] if args.smoke_test else \
        [f"teacher_train.epochs={args.teacher_epochs}", f"student_train.epochs={args.student_epochs}"]
    return load_config(REPO / "configs" / "ml-100k.yaml", [
        f"name={name}", f"runs_dir={work}", "data.source=parquet", f"data.path={train_file}", "data.download=false",
        "data.timestamp_col=timestamp", "teacher.dim=64", "ray.cpus_per_worker=0.5", "serve.num_cpus=0.25",
        "serve.min_replicas=1", "serve.max_replicas=1", f"serve.port={args.port}", *epochs])


def train_run(cfg: Config) -> tuple[Path, float]:
    """Teacher and distilled student of ``cfg``; returns the student and the seconds it all took."""
    t0 = time.perf_counter()
    write_resolved_config(cfg)
    data = prepare_data(cfg)
    teachers = train_teachers(cfg, data)
    student = train_stage(cfg, "student", data, RunLayout(cfg.run_dir).student, teachers)
    return student, time.perf_counter() - t0


def ndcg(ranked: list[str], truth: set[str]) -> float:
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(ranked[:K]) if item in truth)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(truth), K)))
    return dcg / ideal


def evaluate(rec: Recommender, chunk: pd.DataFrame, before: dict[str, list[str]], since_cut: dict[str, list[str]],
             fold: bool, new_users: set[str], anonymous: bool = False) -> dict[str, Any]:
    """Mean NDCG@10 of ``rec`` on ``chunk``'s users: all of them, those the base run did not know, and those with
    interactions since the training cut (the ones fold-in can change). ``anonymous`` asks as an unknown user: the
    training popularity list, the baseline every personal strategy has to beat."""
    scores, new_scores, active_scores, seconds = [], [], [], []
    for user, truth in chunk.groupby("user")["item"]:
        prev = set(before.get(user, []))
        history = since_cut.get(user, [])[-rec.max_history:] if fold else None
        k = min(rec.n_items, K + len(prev))
        t0 = time.perf_counter()
        (out,) = rec.recommend_queries([Query("" if anonymous else user, k, exclude_seen=True,
                                              history=history or None)])
        if history:
            seconds.append(time.perf_counter() - t0)
        ranked = [i for i in out.item_ids if i not in prev][:K]
        value = ndcg(ranked, set(truth) - prev)
        scores.append(value)
        if user in new_users:
            new_scores.append(value)
        if since_cut.get(user):
            active_scores.append(value)
    return {"ndcg@10": float(np.mean(scores)), "users": len(scores),
            "ndcg@10_new_users": float(np.mean(new_scores)) if new_scores else None, "new_users": len(new_scores),
            "ndcg@10_with_history": float(np.mean(active_scores)) if active_scores else None,
            "with_history": len(active_scores),
            "request_s_p50": statistics.median(seconds) if seconds else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="the unpacked ml-100k folder (not needed with --smoke-test)")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--update-epochs", type=int, default=2)
    p.add_argument("--retrain-chunks", type=int, nargs="*", default=None,
                   help="chunks to fully retrain before (default: the last one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--work", type=Path, help="working folder (default: a new temporary one); a rerun with the same "
                                               "folder reuses the trained runs")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--out", type=Path, default=Path("replay.json"))
    args = p.parse_args(argv)
    if args.data is None and not args.smoke_test:
        p.error("--data DATA/ml-100k is required (the unpacked ml-100k folder), or use --smoke-test")
    retrain_chunks = args.retrain_chunks if args.retrain_chunks is not None else [args.chunks - 1]
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="kdray-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    events = load_events(args, work)
    cut = int(0.8 * len(events))
    head, tail = events.iloc[:cut], events.iloc[cut:]
    bounds = np.linspace(0, len(tail), args.chunks + 1).astype(int)
    chunks = [tail.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    pq.write_table(pa.Table.from_pandas(head, preserve_index=False), work / "train.parquet")

    init_ray("local", num_cpus=2, object_store_memory=512 << 20, log_to_driver=False)
    from ray import serve

    from kdray.serve.app import serve_checkpoint

    cfg = base_config(args, work, "replay", work / "train.parquet")
    student, base_seconds = train_run(cfg)
    shutil.rmtree(RunLayout(cfg.run_dir).versions, ignore_errors=True)  # refreshes of an earlier replay
    frozen = Recommender.from_checkpoint(student, max_history=cfg.serve.max_history)
    serve_checkpoint(student, cfg.serve, blocking=False)  # the application each refresh rolls out to
    base_users = set(head["user"])
    rows: list[dict[str, Any]] = []
    before = head.groupby("user")["item"].apply(list).to_dict()
    since_cut: dict[str, list[str]] = {}
    refreshed, updates = frozen, []
    try:
        for c, chunk in enumerate(chunks):
            new_users = set(chunk["user"]) - base_users
            row: dict[str, Any] = {"chunk": c + 1, "interactions": len(chunk)}
            row["popular"] = evaluate(frozen, chunk, before, since_cut, False, new_users, anonymous=True)
            row["frozen"] = evaluate(frozen, chunk, before, since_cut, False, new_users)
            row["fold-in"] = evaluate(frozen, chunk, before, since_cut, True, new_users)
            row["refresh"] = evaluate(refreshed, chunk, before, since_cut, False, new_users)
            if c in retrain_chunks:
                seen = events.iloc[: cut + sum(len(x) for x in chunks[:c])]
                path = work / f"retrain-{c + 1}.parquet"
                pq.write_table(pa.Table.from_pandas(seen, preserve_index=False), path)
                retrained, seconds = train_run(base_config(args, work, f"retrain-{c + 1}", path))
                row["full retrain"] = {**evaluate(Recommender.from_checkpoint(retrained), chunk, before, since_cut,
                                                  False, new_users), "train_s": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for user, items in chunk.groupby("user")["item"]:
                before.setdefault(user, []).extend(items)
                since_cut.setdefault(user, []).extend(items)
            if c + 1 < len(chunks):  # the refresh that serves the next chunk
                path = work / f"chunk-{c + 1}.csv"
                chunk.to_csv(path, index=False)
                out = update_run(cfg, cfg.run_dir, read_interactions(path), source=str(path),
                                 epochs=args.update_epochs, rollout=True)
                updates.append(out.record)
                refreshed = Recommender.from_checkpoint(out.checkpoint, max_history=cfg.serve.max_history)
    finally:
        serve.shutdown()

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Ray 2.60, 1 torch "
                   "thread in the driver",
        "data": "synthetic (smoke test)" if args.smoke_test else str(args.data),
        "interactions": len(events), "train_cut": cut, "chunks": args.chunks,
        "epochs": {"teacher": cfg.teacher_train.epochs, "student": cfg.student_train.epochs,
                   "update": args.update_epochs},
        "base_run_s": base_seconds, "rows": rows,
        "updates": [{k: u[k] for k in ("version", "data", "teacher", "update_seconds", "rollout_seconds")}
                    for u in updates],
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    strategies = ["popular", "frozen", "fold-in", "refresh", "full retrain"]
    lines = ["| chunk | users (new, with a history) | " + " | ".join(strategies) +
             " | fold-in vs frozen, users with a history |", "|---|---|" + "---|" * (len(strategies) + 1)]
    for row in result["rows"]:
        cells = [f"{row[s]['ndcg@10']:.4f}" if s in row else "–" for s in strategies]
        f, h = row["frozen"], row["fold-in"]
        versus = f"{h['ndcg@10_with_history']:.4f} vs {f['ndcg@10_with_history']:.4f}" if f["with_history"] else "–"
        lines.append(f"| {row['chunk']} | {f['users']} ({f['new_users']}, {f['with_history']}) | "
                     + " | ".join(cells) + f" | {versus} |")
    means = []
    for s in strategies:
        values = [r[s]["ndcg@10"] for r in result["rows"] if s in r]
        same = [r["refresh"]["ndcg@10"] for r in result["rows"] if s in r]  # refresh on the same chunks
        means.append("–" if not values else f"{np.mean(values):.4f}" if len(values) == len(result["rows"]) else
                     f"{np.mean(values):.4f} ({len(values)} chunks; refresh there {np.mean(same):.4f})")
    lines.append("| mean | | " + " | ".join(means) + " | |")
    fold = [r["fold-in"]["request_s_p50"] for r in result["rows"] if r["fold-in"]["request_s_p50"]]
    upd = [u["update_seconds"] + (u["rollout_seconds"] or 0) for u in result["updates"]]
    retrain = [r["full retrain"]["train_s"] for r in result["rows"] if "full retrain" in r]
    lines += ["", "| strategy | freshness: interaction to served effect |", "|---|---|",
              "| frozen | never (until a retrain) |",
              f"| fold-in | {1000 * statistics.median(fold):.1f} ms (p50 in-process request) |" if fold
              else "| fold-in | – |",
              f"| refresh | {statistics.median(upd):.0f} s (update + rollout, median of {len(upd)}) + the period |"
              if upd else "| refresh | – |",
              f"| full retrain | {statistics.median(retrain):.0f} s (teacher + student) + the period |"
              if retrain else "| full retrain | – |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
