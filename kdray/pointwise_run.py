"""``kdray run`` for ``task: pointwise``: prepare the rating rows with features, train the teacher(s), distil the
student, train the same student alone, optionally the same pair with a like-only student (multi-task vs single-task),
evaluate every model on the test split and write the run's report.

The stages are those of :mod:`kdray.pipeline` (same run directory, same reuse of finished stages, Ray Train resumes an
interrupted one); what differs is the data (:mod:`kdray.data.pointwise_data`) and the evaluation below:

* accuracy, precision, recall and F1 of "like" at 0.5 and at the threshold with the best F1 on validation;
* AUC and logloss of the like head; RMSE and MAE of the rating head (models with one);
* parameters, size on disk (``model.pt``), training time, and latency per 1,000 predictions (one batch of 1,000
  test rows, best of 5, on one thread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdray.checkpoint import WEIGHTS, load_checkpoint, update_metrics
from kdray.config import Config, replace
from kdray.data.features import to_batch
from kdray.data.pointwise_data import PointwiseData, prepare_pointwise
from kdray.distill import without_distillation
from kdray.errors import CheckpointError
from kdray.layout import RunLayout, atomic_write_text
from kdray.metrics import best_threshold, pointwise_report
from kdray.models import count_parameters
from kdray.train.pointwise import predict

COLUMNS = (  # (report key, header, format)
    ("accuracy@0.5", "acc@0.5", ".4f"), ("precision@0.5", "P@0.5", ".4f"), ("recall@0.5", "R@0.5", ".4f"),
    ("f1@0.5", "F1@0.5", ".4f"), ("threshold", "best thr", ".3f"), ("accuracy@best", "acc@best", ".4f"),
    ("precision@best", "P@best", ".4f"), ("recall@best", "R@best", ".4f"), ("f1@best", "F1@best", ".4f"),
    ("auc", "AUC", ".4f"), ("logloss", "logloss", ".4f"), ("rmse", "RMSE", ".4f"), ("mae", "MAE", ".4f"),
)


def prediction_latency_ms(model: torch.nn.Module, columns: dict[str, np.ndarray], n: int = 1000,
                          repeats: int = 5) -> float:
    """Milliseconds for one forward pass over ``n`` rows (best of ``repeats``; rows repeat when there are fewer)."""
    idx = np.resize(np.arange(len(columns["user"])), n)
    batch = to_batch({k: v[idx] for k, v in columns.items()})
    model.eval()
    best = float("inf")
    with torch.inference_mode():
        model(batch)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(batch)
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0 * 1000.0 / n


def evaluate_pointwise(path: str | Path, data: PointwiseData, write: bool = True) -> dict[str, Any]:
    """Test metrics (threshold chosen on validation), size and latency of a pointwise checkpoint; merged into its
    metrics.json when ``write``."""
    ckpt = load_checkpoint(path)
    if ckpt.features != data.spec.to_json():
        raise CheckpointError(f"checkpoint {path} is not a pointwise model trained on the data in {data.path}")
    valid, test = data.columns("valid"), data.columns("test")
    v, t = predict(ckpt.model, valid), predict(ckpt.model, test)
    threshold = best_threshold(torch.sigmoid(v["like"]), torch.as_tensor(valid["like"]))
    report = pointwise_report(t["like"], torch.as_tensor(test["like"]), t.get("rating"),
                              torch.as_tensor(test["rating"]), threshold)
    out = {f"test_{k}": val for k, val in report.items()}
    out.update(n_params=count_parameters(ckpt.model), size_bytes=(Path(path) / WEIGHTS).stat().st_size,
               latency_ms_per_1000_predictions=prediction_latency_ms(ckpt.model, test),
               heads=list(ckpt.model.heads))
    if write:
        update_metrics(path, out)
    return out


def _students(cfg: Config, layout: RunLayout) -> list[tuple[str, Config, Path]]:
    """(label, config, directory) of every student stage: distilled and alone, and, with ``compare_single_task``
    and two heads, the like-only student distilled and alone."""
    heads = list(cfg.pointwise.heads)
    multi = len(heads) > 1
    tag = "multi-task " if multi else ""
    out = [(f"{tag}student (distilled)", cfg, layout.student),
           (f"{tag}student (alone)", without_distillation(cfg), layout.student_alone)]
    if multi and cfg.pointwise.compare_single_task:
        single = replace(cfg, **{"pointwise.heads": ["like"]})
        out += [("single-task student (distilled)", single, layout.root / "student_single_task"),
                ("single-task student (alone)", without_distillation(single), layout.root / "student_single_task_alone")]
    return out


def run_pointwise(cfg: Config, log: Callable[[str], None] = print) -> Any:
    """The whole pointwise run; returns a :class:`kdray.pipeline.RunReport`."""
    from kdray.pipeline import RunReport, train_stage, train_teachers, write_resolved_config

    t0 = time.perf_counter()
    layout = RunLayout(cfg.run_dir)
    write_resolved_config(cfg)
    data = prepare_pointwise(cfg, layout.data)
    log(f"[data] {data.n_users} users, {data.n_items} items, rows {data.counts}, categorical "
        f"{data.spec.cat_names}, {len(data.spec.num_names)} numeric features in {data.path}")
    teachers = train_teachers(cfg, data, log)
    stages = [(p.name, p) for p in teachers]
    for label, sub, path in _students(cfg, layout):
        stages.append((label, train_stage(sub, "student", data, path, teachers if sub.distill.loss != "none" else [],
                                          log)))
    rows = []
    for label, path in stages:
        log(f"[eval] {label}: test split")
        metrics = evaluate_pointwise(path, data)
        trained = load_checkpoint(path).metrics
        rows.append({"model": label, "path": str(path), **metrics, "train_seconds": trained.get("train_seconds"),
                     "best_epoch": trained.get("best_epoch")})
    seconds = time.perf_counter() - t0
    summary = {"name": cfg.name, "task": "pointwise", "rows": rows, "seconds": seconds, "data": data.counts}
    atomic_write_text(layout.metrics, json.dumps(summary, indent=2) + "\n")
    table = format_pointwise_table(rows)
    atomic_write_text(layout.report, _report(cfg, data, table, seconds))
    log("\n" + table)
    log(f"\nrun directory: {cfg.run_dir}  ({seconds:.0f} s)")
    return RunReport(rows=rows, path=cfg.run_dir, seconds=seconds)


def format_pointwise_table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "heads", "params", "size KB", *(h for _, h, _ in COLUMNS), "train s", "ms / 1k preds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], "+".join(r["heads"]), f"{r['n_params']:,}", f"{r['size_bytes'] / 1024:.1f}",
                 *(format(r["test_" + k], f) if "test_" + k in r else "-" for k, _, f in COLUMNS),
                 f"{r.get('train_seconds') or 0:.1f}", f"{r['latency_ms_per_1000_predictions']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(cfg: Config, data: PointwiseData, table: str, seconds: float) -> str:
    d, p = cfg.distill, cfg.pointwise
    return (
        f"# kdray run `{cfg.name}` (pointwise)\n\n"
        f"Data: `{cfg.data.source}` ({data.n_users:,} users, {data.n_items:,} items; rows per split {data.counts}; "
        f"like = rating >= {p.like_threshold}; categorical {data.spec.cat_names}, "
        f"{len(data.spec.num_names)} numeric features).\n\n"
        f"Teacher: `{cfg.teacher.name}` dim {cfg.teacher.dim} {dict(p.teacher_options)}"
        f"{f' x {d.n_teachers} (ensemble)' if d.n_teachers > 1 else ''}; heads {list(p.heads)}, task weights "
        f"{dict(p.task_weights)}. Student: `{cfg.student.name}` dim {cfg.student.dim} {dict(p.student_options)}. "
        f"Distillation: `{d.loss}` (Hinton soft labels for like, MSE to the teacher's rating), alpha {d.alpha}, "
        f"T {d.temperature}.\n\n"
        "Test split; models selected by validation AUC; the 'best' threshold is the validation-best F1 threshold.\n\n"
        f"{table}\n\nTotal wall time {seconds:.0f} s.\n"
    )
