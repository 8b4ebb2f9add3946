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

import asyncio
import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.train import UserCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from kdray.config import Config, fingerprint, replace, to_dict
from kdray.errors import ConfigError, KdrayError

ARMS = ("distilled", "alone")
DISTILL_PREFIX = "distill."  # every key of this section is a distillation setting: the control arm drops them
SEARCHABLE = ("student.", "student_train.", "distill.")  # the teacher, data and evaluation are fixed for a search
FIXED_KEYS = ("distill.n_teachers", "distill.teacher_weights")  # the teachers are trained before the search
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.temperature": {"loguniform": [0.5, 4.0]},
    "distill.alpha": {"uniform": [0.1, 0.9]},
    "distill.loss": {"choice": ["kl", "mse", "rd", "soft_bce"]},
    "distill.init_from_teacher": {"choice": [False, True]},
    "student.dim": {"choice": [4, 8, 16]},  # all within tune.max_params_ratio=0.1 of the default 256-d teacher
    "student_train.lr": {"loguniform": [1e-3, 3e-2]},
    "student_train.weight_decay": {"choice": [0.0, 1e-6, 1e-5]},
    "student_train.batch_size": {"choice": [128, 256, 512]},
}
# A student with towers (two_tower, neumf) also searches their widths.
DEFAULT_TOWERS: dict[str, Any] = {"student.hidden": {"choice": [[32], [64, 32], [128, 64]]}}
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
CONTROL = {"distill.loss": "none", "distill.alpha": 0.0, "distill.init_from_teacher": False}  # the student alone
ARCH_KEYS = ("student.name", "student.dim", "student.hidden")  # what a student's size depends on
TRIAL_RESOURCES = {"CPU": 0, "memory": 100 * 2**20}  # the trial function only waits on its trainer (RAY_NOTES.md)
STOPPED = ".stopped"  # RUN/tune/trials/ARM/TRIAL.stopped: the trial ended because ASHA stopped it


class TrialStopped(KdrayError):
    """Raised in a trial's Train controller when ASHA asked the trial to stop; the trial ends without an export."""


# ----------------------------------------------------------------------------------------------------------------
# The search space: resolved and validated before anything starts.


def resolve_space(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configured space (``tune.space``) merged over the defaults; a key mapped to null drops a dimension."""
    defaults = {**DEFAULT_SPACE, **(DEFAULT_TOWERS if cfg.student.name != "mf" else {})}
    space = {**defaults, **cfg.tune.space}
    return {k: v for k, v in space.items() if v is not None}


def _values(spec: dict[str, Any]) -> list[Any]:
    """The values a dimension can take, for validation: every listed value, or the two ends of a range."""
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(values)
    return [values[0], values[1] - 1 if kind == "randint" else values[1]]


def validate_space(cfg: Config, space: dict[str, dict[str, Any]]) -> None:
    """Raises ConfigError, naming the key, for an empty space, a parameter that is unknown or not searchable, a
    malformed domain, a value the config itself would reject, or a searcher that cannot run this space."""
    if not space:
        raise ConfigError("tune.space: the search space is empty; give at least one dimension "
                          f"(defaults: {', '.join(DEFAULT_SPACE)})")
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not key.startswith(SEARCHABLE) or key in FIXED_KEYS:
            raise ConfigError(f"{where}: not a searchable parameter; the search varies keys under "
                              f"{', '.join(s.rstrip('.') for s in SEARCHABLE)} (except {', '.join(FIXED_KEYS)}): "
                              "the data, teacher and evaluation are fixed before it starts")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one of {', '.join(KINDS)} mapped to its values, for example "
                              f"{{choice: [8, 16]}} or {{loguniform: [0.001, 0.03]}}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                    or values[0] >= values[1]):
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs a positive lower bound, got {values[0]}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: randint needs integer bounds, got {values!r}")
        if key == "distill.loss" and "none" in values:
            raise ConfigError(f"{where}: 'none' is the control arm (the student alone), which the search always "
                              "runs; list only distillation losses here")
        for v in _values(spec):
            try:
                replace(cfg, **{key: v, **_consistent(key, v)})
            except ConfigError as e:
                raise ConfigError(f"{where}: value {v!r} is not valid: {e}") from None
    grids = [k for k, s in space.items() if "grid" in s]
    if grids and cfg.tune.searcher != "random":
        raise ConfigError(f"tune.space.{grids[0]}: grid dimensions need tune.searcher=random "
                          f"({cfg.tune.searcher} samples every dimension itself); use choice instead")


def _consistent(key: str, value: Any) -> dict[str, Any]:
    """Settings a sampled value needs to be valid on its own (alpha > 0 needs a distillation loss)."""
    if key == "distill.alpha" and value > 0:
        return {"distill.loss": "rd"}
    return {}


def _domain(spec: dict[str, Any]) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(values)
    if kind == "grid":
        return tune.grid_search(values)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)


def arm_keys(space: dict[str, dict[str, Any]], arm: str) -> list[str]:
    return [k for k in space if arm == "distilled" or not k.startswith(DISTILL_PREFIX)]


def arm_space(space: dict[str, dict[str, Any]], arm: str) -> dict[str, Any]:
    """Tune's param_space for one arm: dotted config keys -> domains (the control drops the distillation keys)."""
    return {k: _domain(space[k]) for k in arm_keys(space, arm)}


def _grid_size(space: dict[str, dict[str, Any]], keys: list[str]) -> int:
    return math.prod(len(space[k]["grid"]) for k in keys if "grid" in space[k])


def arm_samples(cfg: Config, space: dict[str, dict[str, Any]], arm: str) -> int:
    """Tune's ``num_samples`` for an arm, so that both arms train the same number of students: Tune runs every grid
    point ``num_samples`` times, and the control has no distillation grid. A control with no dimension left would
    train the same student again and again: it runs once."""
    if arm == "distilled":
        return cfg.tune.num_samples
    keys = arm_keys(space, arm)
    if not keys:
        return 1
    distill_grid = _grid_size(space, [k for k in space if k not in keys])
    return cfg.tune.num_samples * distill_grid


def arm_trials(cfg: Config, space: dict[str, dict[str, Any]], arm: str) -> int:
    """How many trials an arm runs (samples times its grid)."""
    return arm_samples(cfg, space, arm) * _grid_size(space, arm_keys(space, arm))


def _get(cfg: Config, key: str) -> Any:
    node: Any = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


def base_point(cfg: Config, space: dict[str, dict[str, Any]], arm: str) -> dict[str, Any] | None:
    """The configured settings as a point of the arm's space: the arm's first trial, so a search never misses what
    ``kdray run`` trains (the control's first trial is the same student alone). None when a setting lies outside
    its dimension, or the arm has a grid (every point would be crossed with it)."""
    point = {}
    for key in arm_keys(space, arm):
        kind, values = next(iter(space[key].items()))
        value = _get(cfg, key)
        if kind == "grid":
            return None
        inside = (value in values if kind == "choice" else
                  isinstance(value, (int, float)) and not isinstance(value, bool)
                  and values[0] <= value <= values[1] and (kind != "randint" or value < values[1]))
        if not inside:
            return None
        point[key] = value
    return point or None


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's randint samples) as Python values, which the typed config accepts."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple)) else value


def trial_config(base: Config, params: dict[str, Any], arm: str) -> Config:
    """The config one trial trains with: the base config, the sampled settings, and for the control no teacher."""
    overrides = {k: _plain(v) for k, v in params.items()}
    if arm == "alone":
        overrides.update({**CONTROL, "distill.cached_topk": False})
    return replace(base, **overrides)


def search_key(cfg: Config, space: dict[str, dict[str, Any]]) -> str:
    """What the trials of a search depend on; ``--resume`` refuses a config whose key differs. Resources,
    concurrency, storage and the winner's budget may change between sessions."""
    t = cfg.tune
    return fingerprint({"space": space, "num_samples": t.num_samples, "searcher": t.searcher,
                        "grace_period": t.grace_period, "reduction_factor": t.reduction_factor,
                        **{s: to_dict(getattr(cfg, s)) for s in ("data", "teacher", "teacher_train", "student",
                                                                   "student_train", "distill", "eval")}})


# ----------------------------------------------------------------------------------------------------------------
# Up-front checks: resources, searcher, size budget.


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


def model_params(m: Any, data: Any) -> int:
    """Trainable parameters of the model a ``ModelConfig`` describes, on this data (side features included)."""
    from kdray.models import build_model, count_parameters

    return count_parameters(build_model(m.name, n_users=data.n_users, n_items=data.n_items, dim=m.dim,
                                        hidden=m.hidden, user_features=data.user_features,
                                        item_features=data.item_features))


def check_budget(cfg: Config, space: dict[str, dict[str, Any]], data: Any) -> None:
    """Refuses a search in which no student can satisfy ``tune.max_params_ratio`` (no winner could be chosen)."""
    keys = [k for k in ARCH_KEYS if k in space]
    options = [_values(space[k]) for k in keys]
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*options)]
    smallest = min(((model_params(replace(cfg, **c).student, data), c) for c in combos), key=lambda x: x[0])
    teacher = model_params(cfg.teacher, data)
    if smallest[0] > cfg.tune.max_params_ratio * teacher:
        setting = ", ".join(f"{k}={v}" for k, v in smallest[1].items()) or "the configured student"
        raise ConfigError(
            f"tune.max_params_ratio={cfg.tune.max_params_ratio}: the smallest student in the search ({setting}: "
            f"{smallest[0]:,} parameters) is {smallest[0] / teacher:.3f} of the teacher's {teacher:,}, so no trial "
            "could win; raise tune.max_params_ratio or search smaller students")


# ----------------------------------------------------------------------------------------------------------------
# Clean early stopping: ASHA decides in the driver, the trial's Train controller acts at its next report.


@ray.remote(num_cpus=0)
class _Decisions:
    """ASHA's decisions for one arm's trials (a small actor named after the experiment): the last epoch decided per
    trial, and which trials must stop."""

    def __init__(self) -> None:
        self._decided: dict[str, int] = {}
        self._stop: set[str] = set()
        self._changed = asyncio.Condition()

    async def record(self, trial_id: str, epoch: int, stop: bool) -> None:
        async with self._changed:
            self._decided[trial_id] = max(epoch, self._decided.get(trial_id, 0))
            if stop:
                self._stop.add(trial_id)
            self._changed.notify_all()

    async def must_stop(self, trial_id: str, decided_epoch: int, timeout_s: float) -> bool:
        """Waits (at most ``timeout_s``) until ASHA has decided on ``decided_epoch``; then whether to stop."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self._decided.get(trial_id, 0) >= decided_epoch or trial_id in self._stop), timeout_s)
            except asyncio.TimeoutError:
                pass  # the driver is slow or gone: keep training rather than hang
            return trial_id in self._stop


class GracefulASHA(ASHAScheduler):
    """ASHA whose STOP decisions end a trial through its own Train controller (see the module docstring): the
    trial is told to continue, the decision goes to the named ``_Decisions`` actor, and the trial's
    :class:`StopWhenAsked` callback ends the run at its next report. The stopped trial reports nothing more."""

    def __init__(self, decisions: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._decisions = decisions  # the actor's name: a handle would not survive Tune's pickling of the scheduler
        self._asked: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.trial_id in self._asked:
            return TrialScheduler.CONTINUE  # already stopping; its late results must not fill ASHA's rungs
        decision = super().on_trial_result(tune_controller, trial, result)
        stop = decision == TrialScheduler.STOP
        if stop:
            self._asked.add(trial.trial_id)
        if "epoch" in result:
            ray.get_actor(self._decisions).record.remote(trial.trial_id, int(result["epoch"]), stop)
        return TrialScheduler.CONTINUE if stop else decision


class StopWhenAsked(UserCallback):
    """Runs in a trial's Train controller, before ``TuneReportCallback``. Before a report goes to Tune it waits
    until ASHA has decided on the previous one (so a stopped trial never reports again, however slow the driver),
    and raises :class:`TrialStopped` if ASHA said stop. The controller then shuts its worker group down normally
    (placement group included), and ``train_model`` re-raises the error for :func:`_trial`."""

    def __init__(self, decisions: str, trial_id: str, timeout_s: float = 60.0) -> None:
        self.decisions, self.trial_id, self.timeout_s = decisions, trial_id, timeout_s
        self._forwarded: int | None = None  # the epoch of this controller's previous report

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            decisions = ray.get_actor(self.decisions)
        except ValueError:
            return  # no search running this arm any more: nobody can decide
        previous, self._forwarded = self._forwarded, metrics[0].get("epoch", self._forwarded)
        if ray.get(decisions.must_stop.remote(self.trial_id, previous or 0, self.timeout_s)):
            for name in _CONTROLLER_LOGGERS:  # this controller would log the stop twice, as an error with traceback
                logging.getLogger(name).addFilter(_not_a_stop)
            raise TrialStopped(f"trial {self.trial_id} stopped early by ASHA")


_CONTROLLER_LOGGERS = ("ray.train.v2._internal.execution.controller.controller",
                       "ray.train.v2._internal.execution.failure_handling.default")


def _not_a_stop(record: logging.LogRecord) -> bool:
    """A log filter: False for records about a TrialStopped (raw, or wrapped in Train's ControllerError)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(getattr(error, "controller_failure", error), TrialStopped)


# ----------------------------------------------------------------------------------------------------------------
# The trial function.


def _trial(params: dict[str, Any], *, base: dict[str, Any], arm: str, data_dir: str, teachers: list[str],
           export_dir: str, storage: str, decisions: str) -> None:
    """One Tune trial: the shared distributed training of kdray.train, reporting every epoch to Tune. All paths are
    absolute (Tune runs a trial in its own working directory)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdray.config import from_dict
    from kdray.data.prepare import load_prepared
    from kdray.train.driver import train_model

    cfg = trial_config(from_dict(base), params, arm)
    trial_id = tune.get_context().get_trial_id()
    try:
        train_model(cfg, "student", load_prepared(Path(data_dir)), out_dir=Path(export_dir) / trial_id,
                    name=trial_id, teachers=[Path(t) for t in teachers] if arm == "distilled" else [],
                    storage_path=storage, callbacks=[StopWhenAsked(decisions, trial_id), TuneReportCallback()])
    except TrialStopped as e:  # a clean end: Tune already has every result it will use
        marker = Path(export_dir) / f"{trial_id}{STOPPED}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"trial": trial_id, "stopped": str(e)}) + "\n")


def trial_status(result: Any, export_root: Path) -> str:
    """How a trial ended, from what it left: ``completed`` (its export), ``stopped early`` (by ASHA: the marker
    :func:`_trial` writes), ``error``, or ``unfinished`` (the search was interrupted; Tune's own status cannot
    tell: it marks trials it stopped on Ctrl+C as terminated)."""
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    if result.error is not None:
        return "error"
    if (export_root / trial_id / "model.pt").is_file():
        return "completed"
    if (export_root / f"{trial_id}{STOPPED}").is_file():
        return "stopped early"
    return "unfinished"


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
    path = cfg.tune.storage_path or str(cfg.run_dir / "tune" / "ray")
    return path.rstrip("/") if "://" in path else _abs(path)


def experiment_name(cfg: Config, arm: str) -> str:
    """Deterministic (no timestamp), so that ``--resume`` finds it."""
    return f"{cfg.name}-{arm}"


def run_arm(cfg: Config, arm: str, space: dict[str, dict[str, Any]], data_dir: Path, teachers: list[Path],
            resume: bool, log: Callable[[str], None] = print) -> Any:
    """Runs (or resumes) one arm's search and returns its ResultGrid; raises SearchInterrupted if it was stopped
    before every trial finished."""
    metric = cfg.select_metric
    storage = _storage(cfg)
    name = experiment_name(cfg, arm)
    path = f"{storage}/{name}"
    decisions_name = f"kdray-asha-decisions-{name}"
    base = replace(cfg, runs_dir=_abs(cfg.runs_dir))
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), arm=arm, data_dir=_abs(data_dir),
                             teachers=[_abs(t) for t in teachers],
                             export_dir=str(base.run_dir / "tune" / "trials" / arm),
                             storage=f"{storage}/{name}-trials", decisions=decisions_name),
        TRIAL_RESOURCES)
    decisions = _Decisions.options(name=decisions_name, get_if_exists=True).remote()
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
            scheduler = GracefulASHA(
                decisions_name, time_attr="epoch", max_t=cfg.student_train.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.student_train.epochs),
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
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
    finally:
        ray.kill(decisions)
    # Ctrl+C makes Tune save its state and return early, possibly before it created every trial.
    expected = arm_trials(cfg, space, arm)
    export_root = base.run_dir / "tune" / "trials" / arm
    finished = sum(trial_status(r, export_root) != "unfinished" for r in grid)
    if finished < expected:
        raise SearchInterrupted(f"the {arm} search stopped after {finished} of its {expected} trials; continue it "
                                "with the same command and --resume")
    return grid


def _architecture_stats(cfg: Config, data: Any, cache: dict) -> tuple[int, float]:
    """Parameters and scoring latency (ms per 1000 users, whole catalog) of a trial's student architecture."""
    from kdray.evaluate import scoring_latency_ms
    from kdray.models import build_model, count_parameters

    m = cfg.student
    key = (m.name, m.dim, tuple(m.hidden))
    if key not in cache:
        student = build_model(m.name, n_users=data.n_users, n_items=data.n_items, dim=m.dim, hidden=m.hidden,
                              user_features=data.user_features, item_features=data.item_features)
        cache[key] = (count_parameters(student), scoring_latency_ms(student))
    return cache[key]


def _rows(grid: Any, arm: str, cfg: Config, data: Any, teacher_n: int, cache: dict,
          distill_keys: list[str]) -> list[dict[str, Any]]:
    """One leaderboard row per trial; status as :func:`trial_status` (``completed`` covers the training loop's own
    early stop on ``patience``)."""
    from kdray.train.loop import FAILURE_KEY

    metric = cfg.select_metric
    export_root = Path(_abs(cfg.run_dir)) / "tune" / "trials" / arm
    rows = []
    for result in grid:
        params = {k: _plain(v) for k, v in (result.config or {}).items()}
        n_params, latency = _architecture_stats(trial_config(cfg, params, arm), data, cache)
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        export = export_root / trial_id
        status = trial_status(result, export_root)
        exported = status == "completed"
        if arm == "alone":  # the control's distillation settings, for the columns the distilled arm fills
            params.update({k: CONTROL.get(k, "-") for k in distill_keys})
        rows.append({
            "arm": arm, "trial": trial_id, "status": status, "epochs": int(m.get("epoch", 0)),
            # a trial whose loss became non-finite last reported FAILED_SCORE, a marker and no validation result
            f"valid_{metric}": float("nan") if FAILURE_KEY in m else float(m.get("best", m.get(metric, float("nan")))),
            f"test_{metric}": float("nan"),
            "n_params": n_params, "params_ratio": n_params / teacher_n, "latency_ms_per_1000_users": latency,
            **{k: params[k] for k in sorted(params)},
            "checkpoint": str(export) if exported else "",
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
        })
    return rows


def choose_winner(rows: list[dict[str, Any]], metric: str, max_params_ratio: float) -> dict[str, Any] | None:
    """The rule: the highest validation ``metric`` (the best epoch's) among trials that completed with an exported
    checkpoint and have at most ``max_params_ratio`` of the teacher's parameters; ties go to the smaller model.
    Trials ASHA stopped are not candidates (they lagged at a rung); the test split plays no part."""
    eligible = [r for r in rows if r["checkpoint"] and r["params_ratio"] <= max_params_ratio + 1e-12
                and math.isfinite(r[f"valid_{metric}"])]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r[f"valid_{metric}"], -r["n_params"]))


def write_leaderboard(rows: list[dict[str, Any]], out_dir: Path, metric: str) -> None:
    """``leaderboard.csv`` (every column) and ``leaderboard.md`` (without paths), best validation first."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows).sort_values(f"valid_{metric}", ascending=False, na_position="last")
    frame.to_csv(out_dir / "leaderboard.csv", index=False)
    shown = frame.drop(columns=["checkpoint"]).rename(columns={"latency_ms_per_1000_users": "ms/1k users"})
    (out_dir / "leaderboard.md").write_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n")


def pareto_plot(rows: list[dict[str, Any]], teachers: list[dict[str, Any]], path: Path, metric: str,
                winner: dict[str, Any] | None = None) -> None:
    """Validation metric against parameter count: every trial by arm and status, the teacher(s), the winner, and the
    Pareto front (the best validation metric reachable at each size or below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"valid_{metric}"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, marker, color, label in (("distilled", "o", "tab:blue", "student, distilled"),
                                      ("alone", "s", "tab:orange", "student alone (no distillation)")):
        for stopped in (False, True):
            pts = [(r["n_params"], r[key]) for r in rows if r["arm"] == arm and math.isfinite(r[key])
                   and (r["status"] == "stopped early") == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=36, alpha=0.85 if not stopped else 0.6,
                           facecolors=color if not stopped else "none", edgecolors=color,
                           label=label + (" (stopped early by ASHA)" if stopped else ""))
    front, best = [], -math.inf
    for r in sorted((r for r in rows if math.isfinite(r[key])), key=lambda r: r["n_params"]):
        if r[key] > best:
            best = r[key]
            front.append((r["n_params"], r[key]))
    if front:
        ax.step(*zip(*front), where="post", color="gray", linestyle="--", linewidth=1, label="Pareto front (trials)")
    ax.scatter([t["n_params"] for t in teachers], [t[key] for t in teachers], marker="*", s=260, color="tab:red",
               label="teacher" if len(teachers) == 1 else f"teachers (ensemble of {len(teachers)})")
    if winner is not None:
        ax.scatter([winner["n_params"]], [winner[key]], marker="o", s=180, facecolors="none", edgecolors="black",
                   linewidths=1.5, label=f"winner ({winner['arm']})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title("kdray search: validation quality against size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _export_winner(winner: dict[str, Any], best_dir: Path) -> None:
    """Copies the winner's exported checkpoint to ``best_dir`` (via a temporary sibling, then a rename)."""
    tmp = best_dir.with_name(f".{best_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(winner["checkpoint"], tmp)
    if best_dir.exists():
        shutil.rmtree(best_dir)
    tmp.rename(best_dir)


def _check_search_state(cfg: Config, space: dict[str, dict[str, Any]], resume: bool) -> Path:
    """A fresh search refuses to write over an existing one; a resumed one must be the same search."""
    record = cfg.run_dir / "tune" / "search.json"
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
        rows += _rows(grid, arm, cfg, data, teacher["n_params"], cache,
                      [k for k in space if k.startswith(DISTILL_PREFIX)])
    out = cfg.run_dir / "tune"

    ratio = cfg.tune.max_params_ratio
    best = {arm: choose_winner([r for r in rows if r["arm"] == arm], metric, ratio) for arm in ARMS}
    winner = choose_winner([b for b in best.values() if b is not None], metric, ratio)
    if winner is None:
        write_leaderboard(rows, out, metric)
        raise KdrayError(f"no trial completed within tune.max_params_ratio={ratio} of the teacher's "
                         f"{teacher['n_params']:,} parameters; see {out / 'leaderboard.md'}")
    best_dir = cfg.run_dir / "best"
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
    (out / "report.md").write_text(_report(cfg, data, summary, rows))
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


def _report(cfg: Config, data: Any, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    metric = summary["metric"]
    lines = ["| model | trial | params | size vs teacher | valid " + metric + " | test " + metric
             + " | test recall@10 | ms / 1k users |", "|---|---|---|---|---|---|---|---|"]
    for t in summary["teachers"]:
        lines.append(f"| {t['model']} | - | {t['n_params']:,} | {100 * t['n_params'] / summary['teachers'][0]['n_params']:.0f}% | "
                     f"{t[f'valid_{metric}']:.4f} | {t[f'test_{metric}']:.4f} | "
                     f"{t.get('test_recall@10', float('nan')):.4f} | {t['latency_ms_per_1000_users']:.1f} |")
    for arm in ARMS:
        r = summary["best"][arm]
        if r is None:
            lines.append(f"| best {arm} | none completed within the budget | | | | | | |")
            continue
        lines.append(f"| best {arm}{' (winner)' if r['trial'] == summary['winner']['trial'] else ''} | {r['trial']} | "
                     f"{r['n_params']:,} | {100 * r['params_ratio']:.1f}% | {r[f'valid_{metric}']:.4f} | "
                     f"{r[f'test_{metric}']:.4f} | {r['test'].get('test_recall@10', float('nan')):.4f} | "
                     f"{r['latency_ms_per_1000_users']:.1f} |")
    per_arm = ", ".join(f"{arm} {summary['trials'][arm]} trials ({summary['stopped_early'][arm]} stopped early by "
                        f"ASHA, {summary['errored'][arm]} failed)" for arm in ARMS)
    n_teachers = len(summary["teachers"])
    return (
        f"# kdray search `{cfg.name}`\n\n"
        f"Data: `{cfg.data.source}` ({data.n_users:,} users, {data.n_items:,} items). Teacher: `{cfg.teacher.name}` "
        f"dim {cfg.teacher.dim}{f' x {n_teachers} (an ensemble, distilled as one)' if n_teachers > 1 else ''}, "
        f"trained once before the search. Student: `{cfg.student.name}`; sizes are relative to one teacher.\n\n"
        f"Search: {per_arm}; ASHA on validation {metric} per epoch (grace {cfg.tune.grace_period}, reduction "
        f"{cfg.tune.reduction_factor}, at most {cfg.student_train.epochs} epochs), {cfg.tune.searcher} search, "
        f"at most {cfg.tune.max_concurrent_trials} trial(s) at a time, {cfg.ray.num_workers} worker(s) x "
        f"{cfg.ray.cpus_per_worker:g} CPU per trial. The control arm searches the same space without the "
        "`distill.*` dimensions, with the same number of trials.\n\n"
        f"Winner rule: the best validation {metric} among completed trials with at most "
        f"{summary['max_params_ratio']} of the teacher's parameters; only each arm's best is evaluated on the test "
        f"split, once.\n\n" + "\n".join(lines) + "\n\n"
        f"Every trial: `leaderboard.md` / `leaderboard.csv`; plot: `pareto.png`. Wall time {summary['seconds']:.0f} s"
        f"{' (this session, resumed)' if summary['resumed'] else ''}.\n")
