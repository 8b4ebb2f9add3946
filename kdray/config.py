"""Typed, frozen configuration for every stage, with its defaults in exactly one place: the dataclasses below.

A config is built from (in order of precedence) ``key=value`` overrides, a YAML file, and these defaults.
Validation happens once, here, at the boundary: an unknown key, a value of the wrong type or out of range raises
:class:`~kdray.errors.ConfigError` naming the dotted key and what is allowed. Nothing downstream calls
``cfg.get("lr", 1e-3)``.

Example::

    cfg = load_config("configs/ml-100k.yaml", ["train.epochs=5", "student.dim=32"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml

from kdray.errors import ConfigError

DataSource = Literal["synthetic", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "lightgcn", "csv", "parquet"]
SplitKind = Literal["random", "loo", "given"]
ModelName = Literal["mf", "neumf", "two_tower", "lightgcn"]
DistillKind = Literal["none", "kl", "mse", "rd", "soft_bce", "rrd", "listwise"]
HardLoss = Literal["softmax", "sampled_softmax", "bpr", "bce"]
Device = Literal["auto", "cpu", "cuda"]
Metric = Literal["ndcg", "recall", "hr", "mrr", "precision"]


@dataclass(frozen=True)
class DataConfig:
    """Where interactions come from and how they become train/valid/test splits."""

    source: DataSource = "synthetic"
    path: str | None = None  # a directory or file; for MovieLens, the unpacked archive directory
    download: bool = False  # fetch a MovieLens archive by name into cache_dir when path is missing
    cache_dir: str = "~/.cache/kdray"
    url: str | None = None  # overrides the archive URL (mirrors, tests)
    # csv / parquet column map: the file's column names for user, item and the optional rating / timestamp
    user_col: str = "user"
    item_col: str = "item"
    rating_col: str | None = None
    timestamp_col: str | None = None
    sep: str = ","
    # preprocessing
    min_rating: float | None = None  # implicit feedback: keep rating >= min_rating (None keeps every row)
    k_core: int = 0  # iteratively drop users and items with fewer interactions (0 = off)
    split: SplitKind = "random"  # random: per-user ratio; loo: leave-one-out by time; given: the file's own split
    # random: each user's interactions split train/valid/test by these fractions; given: the file's own test set,
    # and valid = valid / (train + valid) of each user's training items
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    side_features: bool = True  # load user/item side features when the source has them (ml-100k)
    # synthetic generator (source == "synthetic")
    n_users: int = 3000
    n_items: int = 2000
    n_interactions: int = 150_000
    n_clusters: int = 16
    latent_dim: int = 8
    popularity_exponent: float = 1.0  # Zipf exponent of the long-tail item popularity
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """One recommender's architecture (see kdray/models.py for the registry)."""

    name: ModelName = "mf"
    dim: int = 64
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher(s)."""

    loss: DistillKind = "rd"  # the defaults are the best setting of the study in BENCHMARKS.md
    alpha: float = 0.7  # total = (1 - alpha) * hard + alpha * distill
    temperature: float = 1.0
    topk: int = 10  # ranking distillation: the teacher's top-K unobserved items
    mask_seen: bool = True  # leave the user's training positives out of both distributions
    n_teachers: int = 3  # >1 trains an ensemble of teachers with different seeds (the study's best on built-in data)
    teacher_weights: tuple[float, ...] = ()  # ensemble weights (empty = uniform)
    init_from_teacher: bool = True  # start the student from the teacher's user/item vectors projected by PCA
    cached_topk: bool = False  # precompute the teacher's top-K per user with Ray Data instead of scoring per batch
    allow_larger_student: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The shared training loop's settings (teacher and student each get their own section)."""

    epochs: int = 20
    batch_size: int = 256  # users per batch: each batch scores the whole catalog (or sampled candidates) per user
    lr: float = 1e-3
    weight_decay: float = 0.0  # Adam's (coupled) L2 on every parameter, every step
    # L2 on the embeddings a batch uses (its users and their positive items), summed and divided by the batch's user
    # count: RecBole's reg_weight, LightGCN's decay. Unlike weight_decay it leaves rows the batch does not use alone:
    # with batches of users, a user's row gets its data gradient once an epoch but Adam's coupled weight decay pulls
    # it every step (117 steps an epoch on Gowalla)
    embedding_l2: float = 0.0
    hard_loss: HardLoss = "softmax"
    n_negatives: int = 1024  # sampled_softmax: shared negatives per batch; bpr / bce: negatives per positive
    patience: int = 5  # epochs without validation improvement before stopping (0 = never stop early)
    seed: int = 0


@dataclass(frozen=True)
class RayConfig:
    """How training is placed on the Ray cluster."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    threads_per_worker: int = 0  # torch intra-op threads per worker (0 = cpus_per_worker rounded, at least 1)
    # memory: each worker reads its shard once and re-batches it locally every epoch;
    # stream: each epoch iterates the shard through Ray Data again (BENCHMARKS.md compares the two)
    shard_mode: Literal["memory", "stream"] = "memory"
    storage_path: str | None = None  # Ray Train results and checkpoints (None = RUN/ray); shared FS or s3:// on many nodes
    max_failures: int = 2  # worker-group restarts from the last checkpoint before a training fails


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 20)
    metric: Metric = "ndcg"  # model selection on validation uses metric@k
    k: int = 10
    batch_size: int = 1024


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over the student's distillation settings (kdray/tune.py)."""

    num_samples: int = 8
    max_concurrent_trials: int = 2
    searcher: Literal["random", "optuna", "hyperopt"] = "random"
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2
    max_params_ratio: float = 0.1  # the winner must have at most this fraction of the teacher's parameters
    storage_path: str | None = None  # None = RUN/tune/ray; a local dir, shared filesystem or s3:// URI
    autoscaling: bool = False  # the cluster adds nodes for pending trials: skip the "can this ever run here" check
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {"choice": [...]} | {"uniform": [a, b]} ...


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.0  # batches still form under load (BENCHMARKS.md); waiting only adds latency
    max_ongoing_requests: int = 64
    max_k: int = 100
    max_request_batch: int = 256
    max_history: int = 200  # longest fold-in history a request may carry (kdray.serve.foldin); longer: a 422
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 16
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Config:
    name: str = "default"  # the run directory is RUNS_DIR/name: deterministic, so a rerun resumes
    runs_dir: str = "runs"
    device: Device = "auto"
    data: DataConfig = DataConfig()
    teacher: ModelConfig = ModelConfig(name="mf", dim=256)
    student: ModelConfig = ModelConfig(name="mf", dim=16)
    # measured on the built-in data (BENCHMARKS.md): the teacher plateaus within ~40 epochs, a 16-d student within ~100
    teacher_train: TrainConfig = TrainConfig(lr=3e-3, epochs=40)
    student_train: TrainConfig = TrainConfig(lr=1e-2, epochs=100, patience=10)
    distill: DistillConfig = DistillConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir).expanduser() / self.name

    @property
    def select_metric(self) -> str:
        """The validation metric used for early stopping, best checkpoints and Tune, e.g. ``ndcg@10``."""
        return f"{self.eval.metric}@{self.eval.k}"


# ----------------------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with type checks that name the dotted key.


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_INT_LIMIT = 2 ** 63


def _short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a YAML file may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts lists to tuples; raises ConfigError on mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -_INT_LIMIT <= value < _INT_LIMIT:  # torch, numpy and Ray take 64-bit integers
            raise ConfigError(f"{key}: {_short(value)} is out of range; expected an integer in [-2**63, 2**63)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int past the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_short(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not a user error


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - set(fields)))  # YAML keys may be numbers, null or booleans
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys{' in ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            default = fields[name].default
            merged = {**dataclasses.asdict(default), **value} if isinstance(value, dict) else value
            kwargs[name] = _build(tp, merged, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Validation of ranges and of combinations, after types are known.


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Range and consistency checks; returns ``cfg`` unchanged so it can be chained."""
    d, dist = cfg.data, cfg.distill
    _check(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."),
           f"name: {cfg.name!r} must be a non-empty directory name without '/'")
    _check(len(d.split_ratios) == 3 and all(r >= 0 for r in d.split_ratios),
           f"data.split_ratios: {list(d.split_ratios)} must be three non-negative fractions (train, valid, test)")
    _check(abs(sum(d.split_ratios) - 1.0) < 1e-6,
           f"data.split_ratios: {list(d.split_ratios)} must sum to 1, they sum to {sum(d.split_ratios):g}")
    _check(d.split_ratios[0] > 0 and (d.split_ratios[2] > 0 or d.split == "given"),
           f"data.split_ratios: {list(d.split_ratios)} needs a non-zero train and test fraction")
    _check(d.k_core >= 0, f"data.k_core: {d.k_core} must be >= 0")
    if d.source == "synthetic":
        _check(d.path is None, "data.path: the synthetic source reads no files; leave data.path empty")
        for key in ("n_users", "n_items", "n_interactions", "n_clusters", "latent_dim"):
            _check(getattr(d, key) > 0, f"data.{key}: {getattr(d, key)} must be > 0")
        _check(d.n_interactions <= d.n_users * d.n_items,
               f"data.n_interactions: {d.n_interactions} exceeds n_users * n_items = {d.n_users * d.n_items}")
        _check(d.popularity_exponent >= 0, f"data.popularity_exponent: {d.popularity_exponent} must be >= 0")
    elif not d.download:
        _check(d.path is not None, f"data.path: required for data.source={d.source!r} (or set data.download=true "
                                   "for a MovieLens archive)")
    if d.download:
        _check(d.source.startswith("ml-"), f"data.download: only MovieLens sources can be downloaded, not {d.source!r}")
    if d.split == "given":
        _check(d.source == "lightgcn", f"data.split: 'given' needs a source with its own split (lightgcn), not {d.source!r}")
    if d.source in ("csv", "parquet"):
        _check(bool(d.user_col) and bool(d.item_col), "data.user_col and data.item_col must name columns")
    if d.min_rating is not None:
        _check(d.source not in ("lightgcn",), "data.min_rating: the lightgcn layout has no ratings")

    for section in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, section)
        _check(m.dim > 0, f"{section}.dim: {m.dim} must be > 0")
        _check(all(h > 0 for h in m.hidden), f"{section}.hidden: {list(m.hidden)} must be positive widths")
        _check(0.0 <= m.dropout < 1.0, f"{section}.dropout: {m.dropout} must be in [0, 1)")
    _check(dist.allow_larger_student or cfg.student.dim <= cfg.teacher.dim,
           f"student.dim: {cfg.student.dim} is larger than teacher.dim {cfg.teacher.dim}; "
           "set distill.allow_larger_student=true if that is intended")

    _check(0.0 <= dist.alpha <= 1.0, f"distill.alpha: {dist.alpha} must be in [0, 1]")
    _check(dist.temperature > 0, f"distill.temperature: {dist.temperature} must be > 0")
    _check(dist.topk > 0, f"distill.topk: {dist.topk} must be > 0")
    _check(dist.n_teachers >= 1, f"distill.n_teachers: {dist.n_teachers} must be >= 1")
    _check(not dist.teacher_weights or len(dist.teacher_weights) == dist.n_teachers,
           f"distill.teacher_weights: {len(dist.teacher_weights)} weights for {dist.n_teachers} teachers")
    _check(all(w >= 0 for w in dist.teacher_weights) and (not dist.teacher_weights or sum(dist.teacher_weights) > 0),
           f"distill.teacher_weights: {list(dist.teacher_weights)} must be non-negative with a positive sum")
    _check(not (dist.loss == "none" and dist.alpha > 0),
           "distill.alpha: must be 0 when distill.loss is 'none' (the student then trains alone)")
    _check(not dist.cached_topk or dist.loss == "rd",
           f"distill.cached_topk: only ranking distillation (distill.loss='rd') reads cached top-K, not {dist.loss!r}")
    if dist.init_from_teacher:
        _check(cfg.student.name in ("mf", "two_tower") and cfg.teacher.name in ("mf", "two_tower", "neumf", "lightgcn"),
               "distill.init_from_teacher: needs id embeddings in both models")

    for section in ("teacher_train", "student_train"):
        t: TrainConfig = getattr(cfg, section)
        _check(t.epochs > 0, f"{section}.epochs: {t.epochs} must be > 0")
        _check(t.batch_size > 0, f"{section}.batch_size: {t.batch_size} must be > 0")
        _check(t.lr > 0, f"{section}.lr: {t.lr} must be > 0")
        _check(t.weight_decay >= 0, f"{section}.weight_decay: {t.weight_decay} must be >= 0")
        _check(t.embedding_l2 >= 0, f"{section}.embedding_l2: {t.embedding_l2} must be >= 0")
        _check(t.n_negatives > 0, f"{section}.n_negatives: {t.n_negatives} must be > 0")
        _check(t.patience >= 0, f"{section}.patience: {t.patience} must be >= 0")

    r = cfg.ray
    _check(r.num_workers >= 1, f"ray.num_workers: {r.num_workers} must be >= 1")
    _check(r.cpus_per_worker > 0, f"ray.cpus_per_worker: {r.cpus_per_worker} must be > 0")
    _check(r.threads_per_worker >= 0, f"ray.threads_per_worker: {r.threads_per_worker} must be >= 0")
    _check(r.max_failures >= -1, f"ray.max_failures: {r.max_failures} must be >= 0 (or -1 for unlimited)")

    e = cfg.eval
    _check(len(e.ks) > 0 and all(k > 0 for k in e.ks), f"eval.ks: {list(e.ks)} must be positive cut-offs")
    _check(e.k > 0, f"eval.k: {e.k} must be > 0")
    _check(e.k in e.ks, f"eval.k: {e.k} must be one of eval.ks {list(e.ks)}")
    _check(e.batch_size > 0, f"eval.batch_size: {e.batch_size} must be > 0")

    tu = cfg.tune
    _check(tu.num_samples >= 1, f"tune.num_samples: {tu.num_samples} must be >= 1")
    _check(tu.max_concurrent_trials >= 1, f"tune.max_concurrent_trials: {tu.max_concurrent_trials} must be >= 1")
    _check(tu.grace_period >= 1, f"tune.grace_period: {tu.grace_period} must be >= 1")
    _check(tu.reduction_factor >= 2, f"tune.reduction_factor: {tu.reduction_factor} must be >= 2")
    _check(0 < tu.max_params_ratio, f"tune.max_params_ratio: {tu.max_params_ratio} must be > 0")

    s = cfg.serve
    _check(0 < s.port < 65536, f"serve.port: {s.port} must be in 1..65535")
    _check(s.max_batch_size >= 1 and s.max_k >= 1 and s.max_request_batch >= 1,
           "serve.max_batch_size, serve.max_k and serve.max_request_batch must be >= 1")
    _check(s.max_history >= 1, f"serve.max_history: {s.max_history} must be >= 1")
    _check(s.max_ongoing_requests >= s.max_batch_size,
           f"serve.max_ongoing_requests: {s.max_ongoing_requests} must be >= serve.max_batch_size "
           f"{s.max_batch_size}, or batches never fill")
    _check(1 <= s.min_replicas <= s.max_replicas,
           f"serve.min_replicas/max_replicas: need 1 <= {s.min_replicas} <= {s.max_replicas}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Public API: load, override, serialise.


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is parsed as YAML (numbers, lists, true/null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, for example student.dim=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {_short(text)}: the value is not valid YAML ({problem})") from None
    except ValueError as e:  # PyYAML's int() of a number past Python's 4300-digit limit
        raise ConfigError(f"override {key.strip()}: the value is not usable ({e})") from None
    return key.strip(), _yaml11_float(value)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; everyone means the number."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_yaml11_float(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml11_float(v) for k, v in value.items()}
    return value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(values: dict[str, Any]) -> Config:
    """Builds and validates a Config from a nested mapping (a parsed YAML file); missing keys take defaults."""
    return validate(_build(Config, values or {}, ""))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config (or only the defaults when ``path`` is None) and applies ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = _yaml11_float(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: PyYAML's int() of a 4300+ digit number
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top, got {type(tree).__name__}")
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return from_dict(tree)
    except ConfigError as e:
        where = f"config file {path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-able nested dict (tuples become lists) that ``from_dict`` turns back into the same config."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def replace(cfg: Config, **dotted: Any) -> Config:
    """A validated copy with dotted keys changed: ``replace(cfg, **{"student.dim": 32})``."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return from_dict(tree)


def fingerprint(section: Any) -> str:
    """A short stable hash of a config section: names cached artifacts (prepared data, teachers) so that a change
    of settings never silently reuses a stale one."""
    blob = json.dumps(to_dict(section) if dataclasses.is_dataclass(section) else section, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
