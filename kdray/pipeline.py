"""The whole pipeline behind ``kdray run``: prepare data, train the teacher(s), distil the student, train the same
student alone as the control, evaluate all of them on the test split, and write the run's report.

Every stage writes under one deterministic run directory (``RUNS_DIR/NAME``)::

    config.yaml            the resolved config
    data/                  prepared Parquet (kdray.data)
    teacher/ (teacher-1/ ...)  exported checkpoints
    student/               the distilled student
    student_alone/         the same student trained without distillation
    ray/                   Ray Train's own run state (resumable)
    metrics.json, report.md
    learning_curves.png    validation metric per epoch of every model (linked from report.md; needs a validation split)
    logs/ray.log           Ray's own output (kdray.console)
    tensorboard/STAGE/     TensorBoard event files (kdray.tracking)

A stage whose exported checkpoint exists with the same settings is reused, and Ray Train resumes a stage that was
interrupted, so running the same command again after a crash continues instead of starting over.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from kdray.checkpoint import load_checkpoint, stage_key
from kdray.config import Config, fingerprint, replace, to_dict
from kdray.data.prepare import PreparedData, popularity_note, prepare
from kdray.distill import without_distillation
from kdray.evaluate import evaluate_checkpoint, evaluate_ensemble
from kdray.layout import RunLayout, atomic_write_text
from kdray.plots import learning_curves
from kdray.tracking import TensorBoardLog
from kdray.train.driver import train_model
from kdray.train.progress import Event
from kdray.tune.teacher import teacher_note, tuning_labels

OnEpoch = Callable[[str, Event], None]  # (stage, event): e.g. kdray.console.Console.epoch

TABLE_METRICS = ("recall@10", "ndcg@10", "hr@10", "mrr@10")


def write_resolved_config(cfg: Config) -> Path:
    path = RunLayout(cfg.run_dir).config
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def prepare_data(cfg: Config) -> Any:
    """The task's prepared data: ``PreparedData`` (ranking) or ``PointwiseData`` (kdray.data.pointwise_data)."""
    if cfg.task == "pointwise":
        from kdray.data.pointwise_data import prepare_pointwise

        return prepare_pointwise(cfg, RunLayout(cfg.run_dir).data)
    return prepare(cfg.data, RunLayout(cfg.run_dir).data)


def stage_key_of(cfg: Config, role: str, teachers: list[Path]) -> str:
    """What a stage's result depends on; an exported checkpoint with the same key is reused."""
    if role == "teacher":
        parts: Any = [to_dict(cfg.data), to_dict(cfg.teacher), to_dict(cfg.teacher_train)]
    else:
        teacher_keys = [stage_key(t) for t in teachers]
        parts = [to_dict(cfg.data), to_dict(cfg.student), to_dict(cfg.student_train), to_dict(cfg.distill),
                 teacher_keys]
    if cfg.task == "pointwise":  # the heads, task weights, features and model options shape the pointwise stages
        parts = [*parts, to_dict(cfg.pointwise)]
    return fingerprint({"role": role, "parts": parts, "eval": to_dict(cfg.eval)})


def train_stage(cfg: Config, role: str, data: Any, out_dir: Path,
                teachers: list[Path] | None = None, log=print, on_epoch: OnEpoch | None = None) -> Path:
    """Trains (or reuses) one model and returns its exported checkpoint directory. Each epoch's record goes to
    TensorBoard (RUN/tensorboard/STAGE) and to ``on_epoch``."""
    teachers = teachers or []
    key = stage_key_of(cfg, role, teachers)
    if stage_key(out_dir) == key:
        log(f"[{out_dir.name}] reusing {out_dir} (same settings)")
        return out_dir
    log(f"[{out_dir.name}] training on Ray Train ({cfg.ray.num_workers} worker(s))")
    with TensorBoardLog(RunLayout(cfg.run_dir).tensorboard(out_dir.name)) as board:
        def progress(event: Event) -> None:
            board.epoch(event)
            if on_epoch is not None:
                on_epoch(out_dir.name, event)

        train_model(cfg, role, data, out_dir=out_dir, name=f"{out_dir.name}-{key}", teachers=teachers,
                    stage_key=key, progress=progress)
    return out_dir


def train_teachers(cfg: Config, data: Any, log=print, on_epoch: OnEpoch | None = None) -> list[Path]:
    """One teacher, or ``distill.n_teachers`` of them with consecutive seeds (an ensemble). With
    ``teacher_search.enabled`` (the default) their training settings are the winner of a small Tune search on
    validation, whose winning trial is the first teacher (kdray.tune.teacher); the ranking task only."""
    if cfg.teacher_search.enabled and cfg.task == "ranking":  # the pointwise task trains its configured teacher
        from kdray.tune.teacher import tuned_teacher

        cfg = tuned_teacher(cfg, data, log)
    n = cfg.distill.n_teachers
    out = []
    for i in range(n):
        sub = cfg if i == 0 else replace(cfg, **{"teacher_train.seed": cfg.teacher_train.seed + i})
        out.append(train_stage(sub, "teacher", data, RunLayout(cfg.run_dir).teacher(i), log=log, on_epoch=on_epoch))
    return out


@dataclass(frozen=True)
class RunReport:
    rows: list[dict[str, Any]]
    path: Path
    seconds: float


def run_pipeline(cfg: Config, log=print, on_epoch: OnEpoch | None = None) -> RunReport:
    if cfg.task == "pointwise":
        from kdray.pointwise_run import run_pointwise

        return run_pointwise(cfg, log)
    t0 = time.perf_counter()
    layout = RunLayout(cfg.run_dir)
    write_resolved_config(cfg)
    data = prepare_data(cfg)
    log(f"[data] {data.n_users} users, {data.n_items} items, {data.train.nnz} train / {data.valid.nnz} valid / "
        f"{data.test.nnz} test interactions in {data.path}")
    shift = data.popularity_shift()
    popularity = popularity_note(shift)
    if popularity:
        log(f"[data] {popularity.replace('**', '')}")
    teachers = train_teachers(cfg, data, log, on_epoch)
    student = train_stage(cfg, "student", data, layout.student, teachers, log, on_epoch)
    control = train_stage(without_distillation(cfg), "student", data, layout.student_alone, [], log, on_epoch)

    tuning = tuning_labels(cfg, len(teachers))
    rows, histories = [], []
    for label, path in [*((p.name, p) for p in teachers), ("student (distilled)", student),
                        ("student (alone)", control)]:
        log(f"[eval] {label}: test split, full ranking")
        metrics = evaluate_checkpoint(path, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        trained = load_checkpoint(path).metrics
        histories.append((label, trained.get("history", [])))
        rows.append({"model": label, "path": str(path), **metrics, "train_seconds": trained.get("train_seconds"),
                     "best_epoch": trained.get("best_epoch"), "tuning": tuning[label],
                     f"valid_{cfg.select_metric}": trained.get(f"valid_{cfg.select_metric}")})
    if len(teachers) > 1:  # what the student is distilled toward: the teachers ranked as one
        log("[eval] teacher ensemble: test split, full ranking")
        metrics = evaluate_ensemble(teachers, data, cfg.distill.teacher_weights, ks=cfg.eval.ks,
                                    batch_size=cfg.eval.batch_size)
        rows.insert(len(teachers), {
            "model": "teacher ensemble", "path": ", ".join(str(p) for p in teachers), **metrics,
            "train_seconds": sum(r["train_seconds"] or 0 for r in rows[:len(teachers)]), "best_epoch": None,
            "tuning": f"the {len(teachers)} teachers above ranked as one, as the student distils them"})
    teacher_params = rows[0]["n_params"]
    for row in rows:
        row["compression"] = row["n_params"] / teacher_params
    seconds = time.perf_counter() - t0
    summary = {"name": cfg.name, "rows": rows, "seconds": seconds,
               "data": {"n_users": data.n_users, "n_items": data.n_items, "train": data.train.nnz,
                        "valid": data.valid.nnz, "test": data.test.nnz, "popularity_shift": shift}}
    atomic_write_text(layout.metrics, json.dumps(summary, indent=2) + "\n")
    if cfg.has_validation:  # without one there is no validation curve to draw
        learning_curves(histories, cfg.select_metric, layout.learning_curves)
    note = (teacher_note(cfg.select_metric, [r[f"valid_{cfg.select_metric}"] for r in rows[:len(teachers)]],
                         rows[-1][f"valid_{cfg.select_metric}"]) if cfg.has_validation else
            "No validation split (data.split_ratios): every model is its last epoch, and the teacher was not "
            "compared with the student alone before distilling.")
    table = format_table(rows) + "".join(f"\n\n{n}" for n in (note, popularity) if n)
    atomic_write_text(layout.report, _report(cfg, data, table, seconds))
    log("\n" + table)
    log(f"\nrun directory: {cfg.run_dir}  ({seconds:.0f} s)")
    return RunReport(rows=rows, path=cfg.run_dir, seconds=seconds)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "params", "size vs teacher", *(f"{m} (test)" for m in TABLE_METRICS), "train s",
            "ms / 1k users", "tuning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['n_params']:,}", f"{100 * r['compression']:.1f}%",
                 *(f"{r.get('test_' + m, float('nan')):.4f}" for m in TABLE_METRICS),
                 f"{r.get('train_seconds') or 0:.1f}", f"{r['latency_ms_per_1000_users']:.1f}", r.get("tuning", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(cfg: Config, data: PreparedData, table: str, seconds: float) -> str:
    d = cfg.distill
    curves = RunLayout(cfg.run_dir).learning_curves.name
    selected = (f"models selected by validation {cfg.select_metric}" if cfg.has_validation
                else "no validation split, so each model is its last epoch")
    figure = (f"![Learning curves: validation {cfg.select_metric} per epoch of every model]({curves})\n\n"
              if cfg.has_validation else "")
    return (
        f"# kdray run `{cfg.name}`\n\n"
        f"Data: `{cfg.data.source}` ({data.n_users:,} users, {data.n_items:,} items; "
        f"{data.train.nnz:,} / {data.valid.nnz:,} / {data.test.nnz:,} train / valid / test interactions, "
        f"split `{cfg.data.split}`).\n\n"
        f"Teacher: `{cfg.teacher.name}` dim {cfg.teacher.dim} hidden {list(cfg.teacher.hidden)}"
        f"{f' x {d.n_teachers} (ensemble)' if d.n_teachers > 1 else ''}. "
        f"Student: `{cfg.student.name}` dim {cfg.student.dim}. Distillation: `{d.loss}`, alpha {d.alpha}, "
        f"T {d.temperature}, top-K {d.topk}, training positives masked: {d.mask_seen}.\n\n"
        "Test split, full-catalog ranking with each user's training and validation items masked; "
        f"{selected}.\n\n{table}\n\n{figure}"
        f"Total wall time {seconds:.0f} s.\n"
    )
