"""The search space of a tune run: resolved from the config, validated before anything starts, split into the
distilled arm and the control arm (the same space minus every distillation setting)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from ray import tune

from kdray.config import Config, fingerprint, replace, to_dict
from kdray.distill import CONTROL
from kdray.errors import ConfigError

ARMS = ("distilled", "alone")  # kdray tune's two arms; kdray study adds "teacher" (STUDY_ARMS)


STUDY_ARMS = ("teacher", "alone", "distilled")  # the equal-budget study, in the order it runs them; study.losses
# adds one distilled arm per extra loss, "distilled-<loss>" (loss_arm)


DISTILL_PREFIX = "distill."  # every key of this section is a distillation setting: the control arm drops them


SEARCHABLE = ("student.", "student_train.", "distill.")  # the teacher, data and evaluation are fixed for a search


FIXED_KEYS = ("distill.n_teachers", "distill.teacher_weights")  # the teachers are trained before the search


DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.temperature": {"loguniform": [0.5, 4.0]},
    "distill.alpha": {"uniform": [0.1, 0.9]},
    "distill.loss": {"choice": ["kl", "mse", "rd", "rrd", "listwise", "soft_bce"]},
    "distill.init_from_teacher": {"choice": [False, True]},
    "student.dim": {"choice": [4, 8, 16]},  # all within tune.max_params_ratio=0.1 of the default 256-d teacher
    "student_train.lr": {"loguniform": [1e-3, 3e-2]},
    "student_train.weight_decay": {"choice": [0.0, 1e-6, 1e-5]},
    "student_train.batch_size": {"choice": [128, 256, 512]},
}


# A student with towers (two_tower, neumf) also searches their widths.
DEFAULT_TOWERS: dict[str, Any] = {"student.hidden": {"choice": [[32], [64, 32], [128, 64]]}}


KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


# The training space every arm of the study shares, over the arm's own section (teacher_train or student_train), and
# what `kdray run`'s teacher-tuning stage searches. The ranges cover what tuned the student alone and the teacher in
# issue 11 (lr 1e-2 with weight_decay 1e-5; a teacher with weight_decay 3e-5; embedding_l2 1e-3 .. 1e-2).
TRAIN_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"loguniform": [1e-3, 3e-2]},
    "weight_decay": {"choice": [0.0, 1e-6, 1e-5, 3e-5, 1e-4]},
    "embedding_l2": {"choice": [0.0, 1e-4, 1e-3, 1e-2]},
    "batch_size": {"choice": [128, 256, 512]},
}
TEACHER_SPACE: dict[str, dict[str, Any]] = {k: TRAIN_SPACE[k] for k in ("lr", "weight_decay", "embedding_l2")}
DISTILL_STUDY_SPACE: dict[str, dict[str, Any]] = {  # what the distilled arm adds (the configured loss stays)
    "distill.alpha": {"uniform": [0.1, 0.9]},
    "distill.init_from_teacher": {"choice": [False, True]},
}
TRAIN_KEYS = ("lr", "weight_decay", "embedding_l2", "batch_size", "hard_loss", "n_negatives")  # searchable in a
# training space; epochs and patience are fixed per study (study.epochs, study.patience), the seed by the protocol


def loss_arm(loss: str) -> str:
    """The study's distilled arm for one of ``study.losses``."""
    return f"distilled-{loss}"


def distils(arm: str) -> bool:
    """Whether an arm's students distil from the teacher (every student arm but the control)."""
    return arm not in ("teacher", "alone")


def role_of(arm: str) -> str:
    """Which model an arm trains: the teacher arm a teacher, every other arm a student."""
    return "teacher" if arm == "teacher" else "student"


def train_section(arm: str) -> str:
    return f"{role_of(arm)}_train"


def section_space(defaults: dict[str, dict[str, Any]], overrides: dict[str, Any], arm: str,
                  where: str) -> dict[str, dict[str, Any]]:
    """A training space over one arm's own section: ``overrides`` (keys relative to the section, null drops one)
    merged over ``defaults``, prefixed with ``teacher_train.`` or ``student_train.``."""
    for key in overrides:
        if key not in TRAIN_KEYS:
            raise ConfigError(f"{where}.{key}: not a searchable training setting; allowed: {', '.join(TRAIN_KEYS)}")
    merged = {**defaults, **overrides}
    return {f"{train_section(arm)}.{k}": v for k, v in merged.items() if v is not None}




ARCH_KEYS = ("student.name", "student.dim", "student.hidden")  # what a student's size depends on


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


def validate_space(cfg: Config, space: dict[str, dict[str, Any]], searchable: tuple[str, ...] = SEARCHABLE,
                   section: str = "tune.space") -> None:
    """Raises ConfigError, naming the key, for an empty space, a parameter that is unknown or not searchable, a
    malformed domain, a value the config itself would reject, or a searcher that cannot run this space.
    ``searchable`` and ``section`` serve the study's and the teacher search's spaces."""
    if not cfg.has_validation:
        raise ConfigError(f"data.split_ratios: {list(cfg.data.split_ratios)} leaves no validation split, and "
                          f"{section.split('.')[0]} picks its winner on validation; give the second ratio a non-zero "
                          "fraction")
    if not space:
        raise ConfigError(f"{section}: the search space is empty; give at least one dimension "
                          f"(defaults: {', '.join(DEFAULT_SPACE if section == 'tune.space' else TRAIN_SPACE)})")
    for key, spec in space.items():
        where = f"{section}.{key}"
        if not key.startswith(searchable) or key in FIXED_KEYS:
            raise ConfigError(f"{where}: not a searchable parameter; the search varies keys under "
                              f"{', '.join(s.rstrip('.') for s in searchable)} (except {', '.join(FIXED_KEYS)}): "
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
        raise ConfigError(f"{section}.{grids[0]}: grid dimensions need tune.searcher=random "
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
    return [k for k in space if arm != "alone" or not k.startswith(DISTILL_PREFIX)]


def arm_space(space: dict[str, dict[str, Any]], arm: str) -> dict[str, Any]:
    """Tune's param_space for one arm: dotted config keys -> domains (the control drops the distillation keys)."""
    return {k: _domain(space[k]) for k in arm_keys(space, arm)}


def _grid_size(space: dict[str, dict[str, Any]], keys: list[str]) -> int:
    return math.prod(len(space[k]["grid"]) for k in keys if "grid" in space[k])


def arm_samples(cfg: Config, space: dict[str, dict[str, Any]], arm: str) -> int:
    """Tune's ``num_samples`` for an arm, so that both arms train the same number of students: Tune runs every grid
    point ``num_samples`` times, and the control has no distillation grid. A control with no dimension left would
    train the same student again and again: it runs once."""
    if arm != "alone":
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


def plain_value(value: Any) -> Any:
    """numpy scalars (Tune's randint samples) as Python values, which the typed config accepts."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple)) else value


def trial_config(base: Config, params: dict[str, Any], arm: str) -> Config:
    """The config one trial trains with: the base config, the sampled settings, and for the control no teacher (the
    teacher arm's settings are ``teacher_train.*`` keys: nothing else changes)."""
    overrides = {k: plain_value(v) for k, v in params.items()}
    if arm == "alone":
        overrides.update(CONTROL)
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


def model_params(m: Any, data: Any) -> int:
    """Trainable parameters of the model a ``ModelConfig`` describes, on this data (side features included)."""
    from kdray.models import count_parameters, model_from_config

    return count_parameters(model_from_config(m, data))


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
