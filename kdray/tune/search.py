"""Ray Tune search over the student's distillation settings, with an honest control.

The teacher is trained once (or reused) before the search and shared read-only by every trial. Two searches run
with the same budget and the same scheduler:

* ``distilled``: the whole space (temperature, alpha, distillation loss, student size, learning rate, ...);
* ``alone``: the same space minus every ``distill.*`` key, the student trained without a teacher (alpha = 0).

Papers often compare distillation with an *untuned* small model; giving the control the same search budget is what
makes the comparison fair. With grid dimensions the control runs ``num_samples x`` (the distillation grid's size)
samples of its smaller space, so both arms train the same number of students. Each arm's first trial is the
configured settings (:func:`base_point`, when they lie in the space): the pair ``kdray run`` trains is always in the
search, and the rest of the budget looks for better.

Each trial is the same distributed training as ``kdray distill`` (:func:`kdray.train.train_model`, a TorchTrainer
with ``ray.num_workers`` workers) run from a small trial function (Ray 2.60's Train V2 pattern: ``Tuner(TorchTrainer)``
is refused). Its per-epoch validation metric reaches Tune through ``TuneReportCallback``, and ASHA stops lagging
trials early.

Stopping is done cleanly (:class:`GracefulASHA`): Tune would stop a trial by killing its actor, and the Train run it
owns then dies without removing its placement group (Ray frees it only when the whole job ends; Train's own cleaner
needs the dashboard's state API). On a small cluster the leaked CPUs starve every later trial. Instead, ASHA's
decisions go to a small named actor, and the trial's Train controller, which waits for the decision on each epoch
before it reports the next, raises :class:`TrialStopped` at its next report: the worker group shuts down the normal
way, and a stopped trial trains at most one more epoch, which nobody sees.

The winner (rule in :func:`choose_winner`) is evaluated once on the test split and exported to ``RUN/best``; the
leaderboard (CSV and Markdown), a Pareto plot, ``summary.json`` and ``report.md`` go to ``RUN/tune/``::

    RUN/tune/search.json        what the search is (a resume must match it)
    RUN/tune/ray/NAME-ARM/      Tune's experiment state (or tune.storage_path), resumable with Tuner.restore
    RUN/tune/ray/NAME-ARM-trials/TRIAL/   each trial's Ray Train run and checkpoints
    RUN/tune/trials/ARM/TRIAL/  each completed trial's exported student (a trial ASHA stopped leaves TRIAL.stopped)
    RUN/best/                   the winner: a self-describing checkpoint for kdray serve
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from kdray.config import Config, replace, to_dict
from kdray.errors import ConfigError, KdrayError
from kdray.layout import RunLayout, atomic_replace_dir
from kdray.tracking import mlflow_callbacks
from kdray.tune.asha import Decisions, GracefulASHA, StopWhenAsked, TrialStopped, grace_period
from kdray.tune.report import (
    STOPPED,
    choose_winner,
    leaderboard_rows,
    pareto_plot,
    report_markdown,
    trial_status,
    write_leaderboard,
)
from kdray.tune.space import (
    ARMS,
    DISTILL_PREFIX,
    arm_samples,
    arm_space,
    arm_trials,
    base_point,
    check_budget,
    distils,
    resolve_space,
    role_of,
    search_key,
    train_section,
    trial_config,
    validate_space,
)

TRIAL_RESOURCES = {"CPU": 0, "memory": 100 * 2**20}  # the trial function only waits on its trainer: a 1-CPU default would starve it of workers on 2 CPUs


def check_resources(cfg: Config) -> None:
    """A trial whose worker group no node (or the whole cluster) can ever host is an error before the search."""
    if cfg.tune.autoscaling:
        return  # the autoscaler adds nodes for pending trials
    use_gpu = cfg.ray.use_gpu or cfg.device == "cuda"
    worker = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n.get(r, 0) >= v for r, v in worker.items())]
    if not fits:
        largest = max(nodes, key=lambda n: n.get("CPU", 0)) if nodes else {}
        raise ConfigError(
            f"ray.cpus_per_worker={cfg.ray.cpus_per_worker}{' with a GPU per worker' if use_gpu else ''}: no node "
            f"of this cluster can host one training worker (the largest has CPU={largest.get('CPU', 0):g}, "
            f"GPU={largest.get('GPU', 0):g}); lower it, or set tune.autoscaling=true on an autoscaling cluster")
    total = {r: sum(n.get(r, 0) for n in nodes) for r in worker}
    need = {r: v * cfg.ray.num_workers for r, v in worker.items()}
    short = [r for r in need if need[r] > total[r] + 1e-9]
    if short:
        raise ConfigError(
            f"ray.num_workers={cfg.ray.num_workers} x {worker} per worker needs {need} for one trial, but the "
            f"cluster has { {r: total[r] for r in need} }; lower ray.num_workers or ray.cpus_per_worker, or set "
            "tune.autoscaling=true on an autoscaling cluster")


def _searcher(cfg: Config, metric: str, first: dict[str, Any] | None = None) -> Any:
    """The search algorithm: random search (Tune's own), or a model-based searcher (an optional extra). Both are
    seeded with ``student_train.seed`` (the same config samples the same trials) and evaluate ``first`` first
    (it counts towards ``num_samples``)."""
    seed = cfg.student_train.seed
    points = [first] if first else None
    if cfg.tune.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=cfg.tune.max_concurrent_trials,
                                     random_state=seed)
    try:
        if cfg.tune.searcher == "optuna":
            import optuna  # noqa: F401  (Tune's wrapper only asserts on a missing package)
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode="max", seed=seed, points_to_evaluate=points)
        import hyperopt  # noqa: F401
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode="max", random_state_seed=seed, points_to_evaluate=points)
    except ImportError as e:
        raise ConfigError(f"tune.searcher={cfg.tune.searcher!r} needs its package: pip install "
                          f"{'kdray[optuna]' if cfg.tune.searcher == 'optuna' else 'hyperopt'} ({e})") from None


def _trial(params: dict[str, Any], *, base: dict[str, Any], arm: str, data_dir: str, teachers: list[str],
           export_dir: str, storage: str, decisions: str) -> None:
    """One Tune trial: the shared distributed training of kdray.train, reporting every epoch to Tune. All paths are
    absolute (Tune runs a trial in its own working directory)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdray.config import from_dict
    from kdray.data.prepare import load_prepared
    from kdray.pipeline import stage_key_of
    from kdray.train.driver import train_model

    cfg = trial_config(from_dict(base), params, arm)
    trial_id = tune.get_context().get_trial_id()
    role = role_of(arm)
    used = [Path(t) for t in teachers] if distils(arm) else []
    try:  # the stage key lets `kdray run` reuse a finished trial as its stage (the tuned teacher)
        train_model(cfg, role, load_prepared(Path(data_dir)), out_dir=Path(export_dir) / trial_id,
                    name=trial_id, teachers=used, storage_path=storage, stage_key=stage_key_of(cfg, role, used),
                    callbacks=[StopWhenAsked(decisions, trial_id), TuneReportCallback()])
    except TrialStopped as e:  # a clean end: Tune already has every result it will use
        marker = Path(export_dir) / f"{trial_id}{STOPPED}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"trial": trial_id, "stopped": str(e)}) + "\n")


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


# ----------------------------------------------------------------------------------------------------------------
# The search.


@dataclass(frozen=True)
class SearchResult:
    leaderboard: list[dict[str, Any]]
    winner: dict[str, Any]
    best: dict[str, dict[str, Any] | None]  # arm -> its best trial, or None
    teachers: list[dict[str, Any]]  # validation and test metrics of each teacher
    best_dir: Path
    seconds: float


class SearchInterrupted(KdrayError):
    """The search stopped before every trial finished (Ctrl+C); ``kdray tune --resume`` continues it."""


def _abs(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _storage(cfg: Config) -> str:
    """Tune's storage: tune.storage_path (a local or shared directory, or a URI such as s3://) or RUN/tune/ray."""
    path = cfg.tune.storage_path or str(RunLayout(cfg.run_dir).tune_ray)
    return path.rstrip("/") if "://" in path else _abs(path)


def experiment_name(cfg: Config, arm: str) -> str:
    """Deterministic (no timestamp), so that ``--resume`` finds it."""
    return f"{cfg.name}-{arm}"


def run_arm(cfg: Config, arm: str, space: dict[str, dict[str, Any]], data_dir: Path, teachers: list[Path],
            resume: bool, log: Callable[[str], None] = print, name: str | None = None) -> Any:
    """Runs (or resumes) one arm's search and returns its ResultGrid; raises SearchInterrupted if it was stopped
    before every trial finished. The ``teacher`` arm (kdray study, kdray run's teacher search) trains teachers over
    ``teacher_train.*``; ``name`` overrides the experiment's name."""
    metric = cfg.select_metric
    storage = _storage(cfg)
    name = name or experiment_name(cfg, arm)
    path = f"{storage}/{name}"
    decisions_name = f"kdray-asha-decisions-{name}"
    base = replace(cfg, runs_dir=_abs(cfg.runs_dir))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), arm=arm, data_dir=_abs(data_dir),
                             teachers=[_abs(t) for t in teachers],
                             export_dir=str(RunLayout(base.run_dir).tune_trials(arm)),
                             storage=f"{storage}/{name}-trials", decisions=decisions_name),
        TRIAL_RESOURCES)
    decisions = Decisions.options(name=decisions_name, get_if_exists=True).remote()
    try:
        if resume and tune.Tuner.can_restore(path):
            log(f"[tune] {arm}: resuming the search in {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=False, restart_errored=False)
        else:
            samples = arm_samples(cfg, space, arm)
            first = base_point(cfg, space, arm)
            log(f"[tune] {arm}: {arm_trials(cfg, space, arm)} trials, ASHA on validation {metric}, "
                f"{cfg.tune.searcher} search, at most {cfg.tune.max_concurrent_trials} at a time"
                f"{', the first with the configured settings' if first else ''}")
            epochs = getattr(cfg, train_section(arm)).epochs
            scheduler = GracefulASHA(
                decisions_name, time_attr="epoch", max_t=epochs,
                grace_period=grace_period(cfg, epochs),
                reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)
            searcher = _searcher(cfg, metric, first)
            tuner = tune.Tuner(
                trainable,
                param_space=arm_space(space, arm),
                tune_config=tune.TuneConfig(
                    metric=metric, mode="max", scheduler=scheduler, search_alg=searcher, num_samples=samples,
                    max_concurrent_trials=None if cfg.tune.searcher == "random" else cfg.tune.max_concurrent_trials,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=mlflow_callbacks(name)),  # [] without mlflow
            )
        grid = tuner.fit()
    finally:
        ray.kill(decisions)
    # Ctrl+C makes Tune save its state and return early, possibly before it created every trial.
    expected = arm_trials(cfg, space, arm)
    export_root = RunLayout(base.run_dir).tune_trials(arm)
    finished = sum(trial_status(r, export_root) != "unfinished" for r in grid)
    if finished < expected:
        raise SearchInterrupted(f"the {arm} search stopped after {finished} of its {expected} trials; continue it "
                                "with the same command and --resume")
    return grid


def _export_winner(winner: dict[str, Any], best_dir: Path) -> None:
    """Copies the winner's exported checkpoint to ``best_dir`` (via a temporary sibling, then a rename)."""
    atomic_replace_dir(best_dir, lambda tmp: shutil.copytree(winner["checkpoint"], tmp, dirs_exist_ok=True))


def _check_search_state(cfg: Config, space: dict[str, dict[str, Any]], resume: bool) -> Path:
    """A fresh search refuses to write over an existing one; a resumed one must be the same search."""
    record = RunLayout(cfg.run_dir).search_record
    key = search_key(cfg, space)
    existing = [experiment_name(cfg, a) for a in ARMS if tune.Tuner.can_restore(f"{_storage(cfg)}/"
                                                                                 f"{experiment_name(cfg, a)}")]
    if existing and not resume:
        raise ConfigError(f"name={cfg.name!r}: a search already exists in {_storage(cfg)} ({', '.join(existing)}); "
                          "continue it with kdray tune --resume, or choose another name (or delete it)")
    if resume and record.is_file():
        before = json.loads(record.read_text())
        if before.get("key") != key:
            changed = sorted(k for k in set(before.get("space", {})) | set(space)
                             if before.get("space", {}).get(k) != space.get(k))
            raise ConfigError(
                f"--resume: the search in {record.parent} was started with other settings "
                f"({'tune.space keys ' + ', '.join(changed) if changed else 'the model, training, data or tune settings'}"
                " differ); resume it with its own config (RUN/config.yaml), or start a new search under another name")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "space": space, "num_samples": cfg.tune.num_samples,
                                  "searcher": cfg.tune.searcher}, indent=2, default=str) + "\n")
    return record


def run_search(cfg: Config, resume: bool = False, log: Callable[[str], None] = print) -> SearchResult:
    """Trains (or reuses) the teacher, runs both arms, writes the leaderboard, plot and report, exports the winner.

    Every user mistake (space, searcher, resources, size budget, an existing search) is raised before the teacher
    trains or any trial starts."""
    from kdray.checkpoint import load_checkpoint, update_metrics
    from kdray.evaluate import evaluate_checkpoint
    from kdray.pipeline import prepare_data, train_teachers, write_resolved_config

    t0 = time.perf_counter()
    metric = cfg.select_metric
    space = resolve_space(cfg)
    validate_space(cfg, space)
    _searcher(cfg, metric)  # the optional package is there
    check_resources(cfg)
    data = prepare_data(cfg)
    check_budget(cfg, space, data)
    _check_search_state(cfg, space, resume)
    write_resolved_config(cfg)
    teachers = train_teachers(cfg, data, log)
    teacher_rows = []  # one per teacher of the ensemble; sizes are compared with one teacher
    for path in teachers:
        metrics = load_checkpoint(path).metrics
        teacher_rows.append({"model": path.name, "n_params": metrics["n_params"],
                             f"valid_{metric}": metrics[f"valid_{metric}"],
                             **evaluate_checkpoint(path, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size,
                                                   write=False)})  # the teachers stay read-only
    teacher = teacher_rows[0]

    rows: list[dict[str, Any]] = []
    cache: dict = {}
    for arm in ARMS:
        grid = run_arm(cfg, arm, space, data.path, teachers, resume, log)
        rows += leaderboard_rows(grid, arm, cfg, data, teacher["n_params"], cache,
                      [k for k in space if k.startswith(DISTILL_PREFIX)])
    out = RunLayout(cfg.run_dir).tune

    ratio = cfg.tune.max_params_ratio
    best = {arm: choose_winner([r for r in rows if r["arm"] == arm], metric, ratio) for arm in ARMS}
    winner = choose_winner([b for b in best.values() if b is not None], metric, ratio)
    if winner is None:
        write_leaderboard(rows, out, metric)
        raise KdrayError(f"no trial completed within tune.max_params_ratio={ratio} of the teacher's "
                         f"{teacher['n_params']:,} parameters; see {out / 'leaderboard.md'}")
    best_dir = RunLayout(cfg.run_dir).best
    _export_winner(winner, best_dir)
    tests = {}  # the test split, once per arm's best (the winner is one of them)
    for arm, row in best.items():
        if row is not None:
            tests[arm] = evaluate_checkpoint(best_dir if row is winner else row["checkpoint"], data, ks=cfg.eval.ks,
                                             batch_size=cfg.eval.batch_size)
            row[f"test_{metric}"] = tests[arm][f"test_{metric}"]
    update_metrics(best_dir, {"tune_trial": winner["trial"], "tune_arm": winner["arm"],
                              "tune_rule": f"best valid_{metric} among completed trials with at most {ratio} of the "
                                           "teacher's parameters"})

    write_leaderboard(rows, out, metric)
    pareto_plot(rows, teacher_rows, out / "pareto.png", metric, winner)
    seconds = time.perf_counter() - t0
    stopped = {arm: sum(r["status"] == "stopped early" for r in rows if r["arm"] == arm) for arm in ARMS}
    summary = {"name": cfg.name, "metric": metric, "seconds": seconds, "resumed": resume,
               "teachers": teacher_rows, "winner": winner,
               "best": {arm: None if r is None else {**r, "test": tests[arm]} for arm, r in best.items()},
               "trials": {arm: sum(r["arm"] == arm for r in rows) for arm in ARMS}, "stopped_early": stopped,
               "errored": {arm: sum(r["status"] == "error" for r in rows if r["arm"] == arm) for arm in ARMS},
               "space": space, "num_samples": cfg.tune.num_samples, "max_params_ratio": ratio}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(cfg, data, summary, rows))
    log(f"[tune] {len(rows)} trials ({sum(stopped.values())} stopped early by ASHA, "
        f"{sum(summary['errored'].values())} failed) in {seconds:.0f} s")
    for arm, r in best.items():
        if r is not None:
            log(f"[tune] best {arm}: {r['trial']} valid {metric} {r[f'valid_{metric}']:.4f}, test {metric} "
                f"{r[f'test_{metric}']:.4f}, {r['n_params']:,} params{'  <- winner' if r is winner else ''}")
    log(f"[tune] leaderboard {out / 'leaderboard.md'}, report {out / 'report.md'}, plot {out / 'pareto.png'}; "
        f"winner exported to {best_dir}")
    return SearchResult(leaderboard=rows, winner=winner, best=best, teachers=teacher_rows, best_dir=best_dir,
                        seconds=seconds)
