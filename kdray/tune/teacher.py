"""The teacher arm: a Ray Tune search over the teacher's own training settings, picked on validation.

Issue 11 found kdray's default teacher (MF-256, lr 3e-3, no regularisation) *worse* than the student alone, and one
weight-decay setting turned it into a teacher worth distilling. Two callers share this arm:

* ``kdray run`` (and ``kdray teacher`` / ``kdray tune``, through :func:`kdray.pipeline.train_teachers`): a small
  search (``teacher_search``, on by default) before the teachers train. Its winner is exported as ``RUN/teacher``,
  where the pipeline's stage key finds and reuses it; the ensemble's other teachers train with the winning settings
  and the next seeds. ``RUN/tune/teacher-search.json`` records what was searched and won: a rerun with the same
  settings starts no search, and the report says what tuning each model got.
* ``kdray study`` (:mod:`kdray.tune.study`): the teacher arm of the equal-budget protocol.

The search is :func:`kdray.tune.search.run_arm` with the arm ``teacher``: the same trial function, ASHA scheduler,
searcher and concurrency as the student's arms (``tune.*``), over ``teacher_train.*``. The configured settings are
the first trial when they lie in the space, so the tuned teacher is never worse on validation than the configured
one.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdray.config import Config, fingerprint, replace, to_dict
from kdray.errors import KdrayError
from kdray.layout import RunLayout, atomic_replace_dir, atomic_write_text
from kdray.tune.space import TEACHER_SPACE, section_space, trial_config, validate_space

ARM = "teacher"


@dataclass(frozen=True)
class ArmResult:
    """One finished arm of a search: every trial's leaderboard row and the winner's (None if none completed)."""

    rows: list[dict[str, Any]]
    winner: dict[str, Any] | None
    params: dict[str, Any]  # the winner's sampled settings (dotted config keys), {} without a winner


def search_arm(cfg: Config, arm: str, space: dict[str, dict[str, Any]], data: Any, teachers: list[Any],
               resume: bool, log: Callable[[str], None], name: str | None = None) -> ArmResult:
    """Runs (or restores) one arm with ``cfg.tune``'s budget and scheduler; the winner is the best validation metric
    among completed trials (:func:`kdray.tune.report.choose_winner`, any size: the arm's model size is fixed)."""
    from kdray.tune.report import choose_winner, leaderboard_rows
    from kdray.tune.search import run_arm
    from kdray.tune.space import model_params

    grid = run_arm(cfg, arm, space, data.path, teachers, resume, log, name=name)
    rows = leaderboard_rows(grid, arm, cfg, data, model_params(cfg.teacher, data), {}, [])
    winner = choose_winner(rows, cfg.select_metric, math.inf)
    return ArmResult(rows=rows, winner=winner, params={k: winner[k] for k in space} if winner else {})


def teacher_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """``kdray run``'s teacher search space: ``teacher_search.space`` over :data:`TEACHER_SPACE`, validated."""
    space = section_space(TEACHER_SPACE, cfg.teacher_search.space, ARM, "teacher_search.space")
    validate_space(cfg, space, ("teacher_train.",), "teacher_search.space")
    return space


def _record_key(cfg: Config, space: dict[str, dict[str, Any]]) -> str:
    """What the search's outcome depends on (resources and concurrency may change)."""
    t = cfg.tune
    return fingerprint({"space": space, "num_samples": cfg.teacher_search.num_samples, "searcher": t.searcher,
                        "grace_period": t.grace_period, "reduction_factor": t.reduction_factor,
                        **{s: to_dict(getattr(cfg, s)) for s in ("data", "teacher", "teacher_train", "eval")}})


def tuned_teacher(cfg: Config, data: Any, log: Callable[[str], None] = print) -> Config:
    """``cfg`` with the teacher's training settings that won the teacher search (run now, or recorded by an earlier
    run with the same settings). The winner is exported to ``RUN/teacher`` for the pipeline to reuse."""
    from kdray.tune.search import check_resources

    layout = RunLayout(cfg.run_dir)
    space = teacher_space(cfg)
    key = _record_key(cfg, space)
    record = layout.tune / "teacher-search.json"
    before = json.loads(record.read_text()) if record.is_file() else {}
    if before.get("key") == key:
        log(f"[teacher search] same settings as the recorded search: its winner of {before['trials']} trials "
            f"({settings_text(before['params'])})")
        return trial_config(cfg, before["params"], ARM)
    check_resources(cfg)
    search_cfg = replace(cfg, **{"tune.num_samples": cfg.teacher_search.num_samples})
    log(f"[teacher search] {cfg.teacher_search.num_samples} trials over {', '.join(space)} "
        "(teacher_search.enabled=false skips it)")
    # named after its key: a rerun resumes this very search; changed settings start another one
    result = search_arm(search_cfg, ARM, space, data, [], resume=True, log=log, name=f"{cfg.name}-teacher-{key}")
    if result.winner is None:
        raise KdrayError(f"the teacher search finished no trial; see {layout.tune_trials(ARM)} and the Ray logs, or "
                         "set teacher_search.enabled=false")
    metric = f"valid_{cfg.select_metric}"
    atomic_replace_dir(layout.teacher(0), lambda tmp: shutil.copytree(result.winner["checkpoint"], tmp,
                                                                        dirs_exist_ok=True))
    atomic_write_text(record, json.dumps({"key": key, "params": result.params, "trials": len(result.rows),
                                          "trial": result.winner["trial"], metric: result.winner[metric],
                                          "space": space}, indent=2) + "\n")
    log(f"[teacher search] winner {result.winner['trial']}: {settings_text(result.params)}, {metric} "
        f"{result.winner[metric]:.4f}")
    return trial_config(cfg, result.params, ARM)


def settings_text(params: dict[str, Any]) -> str:
    """A search winner's settings for a console line: ``lr=0.01, weight_decay=1e-05`` (section prefixes dropped)."""
    return ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                     for k, v in sorted(params.items()))


def tuning_labels(cfg: Config, n_teachers: int) -> dict[str, str]:
    """What tuning each model of a ``kdray run`` got, for its table and report: model label -> description."""
    record = RunLayout(cfg.run_dir).tune / "teacher-search.json"
    if cfg.teacher_search.enabled and record.is_file():
        done = json.loads(record.read_text())
        tuned = f"tuned: {done['trials']} trials ({settings_text(done['params'])})"
        teachers = [tuned] + [f"the tuned settings, seed {cfg.teacher_train.seed + i}" for i in range(1, n_teachers)]
    else:
        teachers = ["configured settings, not tuned"] * n_teachers
    names = [RunLayout(cfg.run_dir).teacher(i).name for i in range(n_teachers)]
    return {**dict(zip(names, teachers)), "student (distilled)": "configured settings, not tuned",
            "student (alone)": "configured settings, not tuned"}


def teacher_note(metric: str, teachers: list[float], alone: float) -> str | None:
    """The report's warning when no teacher beats the student alone on validation (distillation cannot help), or
    None."""
    if max(teachers) > alone:
        return None
    return (f"**The teacher is no better than the student alone on validation** (valid {metric}: teacher "
            f"{max(teachers):.4f}, student alone {alone:.4f}): distilling it cannot be expected to help. Tune the "
            "teacher (teacher_search.num_samples, teacher_search.space) or give it more capacity or epochs.")
