"""Ray Tune search over the student's distillation settings, with an honest control.

The teacher is trained once (or reused) before the search and shared read-only by every trial. Two searches run
with the same budget (``tune.num_samples`` trials each) and the same scheduler:

* ``distilled``: the whole space (temperature, alpha, distillation loss, student size, learning rate, ...);
* ``alone``: the same space minus the distillation settings, the student trained without a teacher (alpha = 0).

Papers often compare distillation with an *untuned* small model; giving the control the same search budget is what
makes the comparison fair (BENCHMARKS.md).

Each trial is the same distributed training as ``kdray distill`` (``kdray.train.train_model``, a TorchTrainer with
``ray.num_workers`` workers) run from a small trial function (Ray 2.60's Train V2 pattern: ``Tuner(TorchTrainer)``
is refused). Its per-epoch validation metric reaches Tune through ``TuneReportCallback``, so ASHA stops lagging
trials early.

The winner (rule in :func:`choose_winner`) is evaluated once on the test split and exported to ``RUN/best``; the
leaderboard (CSV and Markdown) and a Pareto plot go to ``RUN/tune/``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.config import Config, replace, to_dict
from kdray.errors import ConfigError, KdrayError

ARMS = ("distilled", "alone")
DISTILL_KEYS = ("distill.temperature", "distill.alpha", "distill.loss", "distill.topk", "distill.init_from_teacher",
                "distill.mask_seen")
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.temperature": {"loguniform": [0.5, 4.0]},
    "distill.alpha": {"uniform": [0.1, 0.9]},
    "distill.loss": {"choice": ["kl", "mse", "rd", "soft_bce"]},
    "student.dim": {"choice": [8, 16, 32]},
    "student_train.lr": {"loguniform": [1e-3, 3e-2]},
    "student_train.weight_decay": {"choice": [0.0, 1e-6, 1e-5]},
    "student_train.batch_size": {"choice": [128, 256, 512]},
    "distill.init_from_teacher": {"choice": [False, True]},
}
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
TRIAL_RESOURCES = {"CPU": 0, "memory": 100 * 2**20}  # the trial function only waits on its trainer (RAY_NOTES.md)


# ----------------------------------------------------------------------------------------------------------------
# The search space: validated before anything starts.


def resolve_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configured space (``tune.space``) merged over the defaults; a key mapped to null drops a dimension."""
    space = {**DEFAULT_SPACE, **cfg.tune.space}
    return {k: v for k, v in space.items() if v is not None}


def validate_space(cfg: Config, space: dict[str, dict[str, Any]]) -> None:
    """Raises ConfigError, naming the key, for an empty space, an unknown parameter, a malformed domain, or a value
    the config itself would reject."""
    if not space:
        raise ConfigError("tune.space: the search space is empty; give at least one dimension")
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one of {', '.join(KINDS)} mapped to its values, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs a positive lower bound, got {values[0]}")
            samples = [values[0], values[1] - 1 if kind == "randint" else values[1]]
        else:
            samples = values
        for v in samples:
            try:
                replace(cfg, **{key: v, **_consistent(key, v)})
            except ConfigError as e:
                raise ConfigError(f"{where}: value {v!r} is not valid: {e}") from None


def _consistent(key: str, value: Any) -> dict[str, Any]:
    """Settings a sampled value needs to be valid on its own (alpha > 0 needs a distillation loss)."""
    if key == "distill.alpha" and value > 0:
        return {"distill.loss": "rd"}
    if key == "distill.loss" and value == "none":
        return {"distill.alpha": 0.0}
    return {}


def _domain(spec: dict[str, Any]) -> Any:
    from ray import tune

    kind, values = next(iter(spec.items()))
    return {"choice": lambda: tune.choice(values), "grid": lambda: tune.grid_search(values),
            "uniform": lambda: tune.uniform(*values), "loguniform": lambda: tune.loguniform(*values),
            "randint": lambda: tune.randint(*values)}[kind]()


def arm_space(space: dict[str, dict[str, Any]], arm: str) -> dict[str, Any]:
    """Tune's param_space for one arm: dotted config keys -> domains (the control drops the distillation keys)."""
    keys = [k for k in space if arm == "distilled" or k not in DISTILL_KEYS]
    return {k: _domain(space[k]) for k in keys}


def trial_config(base: Config, params: dict[str, Any], arm: str) -> Config:
    overrides = dict(params)
    if arm == "alone":
        overrides.update({"distill.loss": "none", "distill.alpha": 0.0, "distill.init_from_teacher": False,
                          "distill.cached_topk": False})
    return replace(base, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Resources: a trial that can never be placed is an error before the search starts.


def check_resources(cfg: Config) -> None:
    import ray

    if cfg.tune.autoscaling:
        return  # the autoscaler adds nodes for pending trials
    worker = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1.0} if cfg.ray.use_gpu else {})}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n.get(r, 0) >= v for r, v in worker.items())]
    if not fits:
        raise ConfigError(
            f"ray.cpus_per_worker={cfg.ray.cpus_per_worker}{', ray.use_gpu=true' if cfg.ray.use_gpu else ''}: no node "
            f"of this cluster can host one training worker (largest node: "
            f"{max(nodes, key=lambda n: n.get('CPU', 0)) if nodes else 'none'}); lower it, or set tune.autoscaling=true "
            "on an autoscaling cluster")
    total = {r: sum(n.get(r, 0) for n in nodes) for r in worker}
    need = {r: v * cfg.ray.num_workers for r, v in worker.items()}
    short = [r for r in need if need[r] > total[r] + 1e-9]
    if short:
        raise ConfigError(
            f"ray.num_workers={cfg.ray.num_workers} x {worker} per worker needs {need}, but the cluster has "
            f"{ {r: total[r] for r in need} }; lower ray.num_workers or ray.cpus_per_worker, or set "
            "tune.autoscaling=true on an autoscaling cluster")


# ----------------------------------------------------------------------------------------------------------------
# The trial function.


def _trial(params: dict[str, Any], *, base: dict[str, Any], arm: str, data_dir: str, teachers: list[str],
           trials_dir: str, storage: str) -> None:
    """One Tune trial: the shared distributed training of kdray.train, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdray.config import from_dict
    from kdray.data import load_prepared
    from kdray.train import train_model

    cfg = trial_config(from_dict(base), params, arm)
    name = tune.get_context().get_trial_name()
    train_model(cfg, "student", load_prepared(Path(data_dir)), out_dir=Path(trials_dir) / name, name=name,
                teachers=[Path(t) for t in teachers] if arm == "distilled" else [],
                storage_path=storage, callbacks=[TuneReportCallback()])


# ----------------------------------------------------------------------------------------------------------------
# The search.


@dataclass(frozen=True)
class SearchResult:
    leaderboard: list[dict[str, Any]]
    winner: dict[str, Any]
    best_alone: dict[str, Any] | None
    best_dir: Path
    seconds: float


def _storage(cfg: Config) -> str:
    return cfg.tune.storage_path or str((cfg.run_dir / "tune" / "ray").resolve())


def _searcher(cfg: Config, metric: str):
    if cfg.tune.searcher == "random":
        return None
    try:
        if cfg.tune.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode="max")
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode="max")
    except (ImportError, AssertionError) as e:
        raise ConfigError(f"tune.searcher={cfg.tune.searcher!r} needs its package: pip install "
                          f"{'kdray[optuna]' if cfg.tune.searcher == 'optuna' else 'hyperopt'} ({e})") from None


def run_arm(cfg: Config, arm: str, space: dict[str, dict[str, Any]], data_dir: Path, teachers: list[Path],
            resume: bool) -> Any:
    """Runs (or resumes) one arm's search and returns its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    metric = cfg.select_metric
    storage = _storage(cfg)
    name = f"{cfg.name}-{arm}"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(cfg), arm=arm, data_dir=str(data_dir),
                             teachers=[str(t) for t in teachers], trials_dir=str(cfg.run_dir / "tune" / "trials"),
                             storage=f"{storage}/{name}-trials"),
        TRIAL_RESOURCES)
    path = f"{storage}/{name}"
    if resume and tune.Tuner.can_restore(path):
        print(f"[tune] resuming {arm} search from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.student_train.epochs,
                                  grace_period=min(cfg.tune.grace_period, cfg.student_train.epochs),
                                  reduction_factor=cfg.tune.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=arm_space(space, arm),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                        search_alg=_searcher(cfg, metric), num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def _rows(grid: Any, arm: str, cfg: Config, data: Any, teacher_params: int) -> list[dict[str, Any]]:
    from kdray.evaluate import scoring_latency_ms
    from kdray.models import build_model, count_parameters

    metric = cfg.select_metric
    rows = []
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items()}
        trial_cfg = trial_config(cfg, params, arm)
        student = build_model(name=trial_cfg.student.name, n_users=data.n_users, n_items=data.n_items,
                              dim=trial_cfg.student.dim, hidden=trial_cfg.student.hidden,
                              user_features=data.user_features, item_features=data.item_features)
        n_params = count_parameters(student)
        m = result.metrics or {}
        trial_name = Path(result.path).name if result.path else ""
        export = cfg.run_dir / "tune" / "trials" / trial_name
        epochs = int(m.get("epoch", 0))
        status = "error" if result.error else ("stopped early" if epochs < cfg.student_train.epochs and
                                                not (export / "model.pt").exists() else "completed")
        rows.append({
            "arm": arm, "trial": trial_name, "status": status, "epochs": epochs,
            f"valid_{metric}": float(m.get("best", m.get(metric, float("nan")))),
            "n_params": n_params, "params_ratio": n_params / teacher_params,
            "latency_ms_per_1000_users": scoring_latency_ms(student, repeats=1),
            "checkpoint": str(export) if (export / "model.pt").exists() else "",
            "error": str(result.error).splitlines()[0][:200] if result.error else "",
            **{k: params[k] for k in sorted(params)},
        })
    return rows


def choose_winner(rows: list[dict[str, Any]], metric: str, max_params_ratio: float) -> dict[str, Any] | None:
    """The rule: the highest validation metric among trials that completed with an exported checkpoint and have at
    most ``max_params_ratio`` of the teacher's parameters; ties go to the smaller model."""
    eligible = [r for r in rows if r["checkpoint"] and r["params_ratio"] <= max_params_ratio + 1e-12
                and math.isfinite(r[f"valid_{metric}"])]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r[f"valid_{metric}"], -r["n_params"]))


def write_leaderboard(rows: list[dict[str, Any]], out_dir: Path, metric: str) -> None:
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows).sort_values(f"valid_{metric}", ascending=False)
    frame.to_csv(out_dir / "leaderboard.csv", index=False)
    (out_dir / "leaderboard.md").write_text(frame.drop(columns=["checkpoint"]).to_markdown(index=False,
                                                                                           floatfmt=".4g") + "\n")


def pareto_plot(rows: list[dict[str, Any]], teacher: dict[str, Any], path: Path, metric: str) -> None:
    """Validation metric against parameter count: every trial by arm, the teacher, and the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = f"valid_{metric}"
    for arm, marker, color in (("distilled", "o", "tab:blue"), ("alone", "s", "tab:orange")):
        pts = [(r["n_params"], r[key]) for r in rows if r["arm"] == arm and math.isfinite(r[key])]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, alpha=0.7,
                       label="student, distilled" if arm == "distilled" else "student alone (no distillation)")
    front, best = [], -math.inf
    for r in sorted((r for r in rows if math.isfinite(r[key])), key=lambda r: r["n_params"]):
        if r[key] > best:
            best = r[key]
            front.append((r["n_params"], r[key]))
    if front:
        ax.plot(*zip(*front), color="gray", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter([teacher["n_params"]], [teacher[key]], marker="*", s=250, color="tab:red", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title("kdray search: quality vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_search(cfg: Config, resume: bool = False, log=print) -> SearchResult:
    """Trains (or reuses) the teacher, runs both arms, writes the leaderboard and plot, exports the winner."""
    import time

    from kdray.checkpoint import load_checkpoint, update_metrics
    from kdray.evaluate import evaluate_checkpoint
    from kdray.pipeline import prepare_data, train_teachers, write_resolved_config

    t0 = time.perf_counter()
    space = resolve_space(cfg)
    validate_space(cfg, space)
    check_resources(cfg)
    write_resolved_config(cfg)
    data = prepare_data(cfg)
    teachers = train_teachers(cfg, data, log)
    teacher = load_checkpoint(teachers[0])
    metric = cfg.select_metric
    teacher_row = {"n_params": teacher.metrics["n_params"], f"valid_{metric}": teacher.metrics[f"valid_{metric}"]}

    rows: list[dict[str, Any]] = []
    for arm in ARMS:
        log(f"[tune] {arm}: {cfg.tune.num_samples} trials, ASHA on validation {metric}")
        grid = run_arm(cfg, arm, space, data.path, teachers, resume)
        rows += _rows(grid, arm, cfg, data, teacher_row["n_params"])
    out = cfg.run_dir / "tune"
    write_leaderboard(rows, out, metric)
    pareto_plot(rows, teacher_row, out / "pareto.png", metric)

    winner = choose_winner(rows, metric, cfg.tune.max_params_ratio)
    if winner is None:
        raise KdrayError(f"no completed trial within tune.max_params_ratio={cfg.tune.max_params_ratio} of the "
                         f"teacher's {teacher_row['n_params']:,} parameters; see {out / 'leaderboard.md'}")
    best_alone = choose_winner([r for r in rows if r["arm"] == "alone"], metric, cfg.tune.max_params_ratio)
    best_dir = cfg.run_dir / "best"
    tmp = best_dir.with_name(".best.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(winner["checkpoint"], tmp)
    if best_dir.exists():
        shutil.rmtree(best_dir)
    tmp.rename(best_dir)
    winner["test"] = evaluate_checkpoint(best_dir, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
    update_metrics(best_dir, {"tune_trial": winner["trial"], "tune_arm": winner["arm"]})
    if best_alone is not None:
        best_alone["test"] = evaluate_checkpoint(best_alone["checkpoint"], data, ks=cfg.eval.ks,
                                                 batch_size=cfg.eval.batch_size)
    summary = {
        "metric": metric, "teacher": teacher_row, "winner": winner, "best_alone": best_alone,
        "n_trials": len(rows), "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errored": sum(r["status"] == "error" for r in rows), "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"[tune] {len(rows)} trials ({summary['stopped_early']} stopped early by ASHA, {summary['errored']} failed) "
        f"in {summary['seconds']:.0f} s")
    for label, r in (("winner", winner), ("best alone", best_alone)):
        if r is not None:
            log(f"[tune] {label}: {r['arm']} {r['trial']} valid {metric} {r[f'valid_{metric}']:.4f}, test "
                f"{metric} {r['test'].get('test_' + metric, float('nan')):.4f}, {r['n_params']:,} params")
    log(f"[tune] leaderboard {out / 'leaderboard.md'}, plot {out / 'pareto.png'}, winner exported to {best_dir}")
    return SearchResult(leaderboard=rows, winner=winner, best_alone=best_alone, best_dir=best_dir,
                        seconds=summary["seconds"])
