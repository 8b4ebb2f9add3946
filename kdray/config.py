"""Typed, frozen configuration for every stage, with its defaults in exactly one place: the dataclasses below.

A config is built from (in order of precedence) ``key=value`` overrides, a YAML file, and these defaults. pydantic
checks types and ranges from the annotations; the checks that span several keys are the validators of ``Config``.
Every mistake raises :class:`~kdray.errors.ConfigError` naming the dotted key, the bad value and what is allowed.
Model and loss names are checked against their registries (``kdray.models.MODELS``,
``kdray.distill.losses.DISTILL_LOSSES``, ``kdray.train.objective.HARD_LOSSES``), so registering a new one there is
all it takes for the config to accept it. Nothing downstream calls ``cfg.get("lr", 1e-3)``.

Example::

    cfg = load_config("configs/ml-100k.yaml", ["train.epochs=5", "student.dim=32"])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from kdray.config_types import (Bool, Count, DataSource, DistillLoss, Float, HardLoss, Int, ModelName, NonNegFloat,
                                NonNegInt, PosFloat, PosInt, Str, Widths, config_error, list_of, rule, short)
from kdray.errors import ConfigError

section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


# ----------------------------------------------------------------------------------------------------------------
# The sections and their defaults.


@section
class DataConfig:
    """Where interactions come from and how they become train/valid/test splits."""

    source: DataSource = "synthetic"
    path: Str | None = None  # a directory or file; for MovieLens, the unpacked archive directory
    download: Bool = False  # fetch a MovieLens archive by name into cache_dir when path is missing
    cache_dir: Str = "~/.cache/kdray"
    url: Str | None = None  # overrides the archive URL (mirrors, tests)
    # csv / parquet column map: the file's column names for user, item and the optional rating / timestamp
    user_col: Str = "user"
    item_col: Str = "item"
    rating_col: Str | None = None
    timestamp_col: Str | None = None
    sep: Str = ","  # csv: one character, or a name: tab (or \t), comma, semicolon, pipe, space (see separator())
    header: Bool = True  # csv: false = no header row; columns by position: user, item[, rating][, timestamp]
    # preprocessing
    min_rating: Float | None = None  # implicit feedback: keep rating >= min_rating (None keeps every row)
    k_core: NonNegInt = 0  # iteratively drop users and items with fewer interactions (0 = off)
    # random: each user's interactions split train/valid/test by split_ratios; loo: leave-one-out by time; given: the
    # file's own test set, and valid = valid / (train + valid) of each user's training items
    split: Literal["random", "loo", "given"] = "random"
    split_ratios: Annotated[tuple[NonNegFloat, NonNegFloat, NonNegFloat], list_of(3)] = (0.8, 0.1, 0.1)
    side_features: Bool = True  # load user/item side features when the source has them (ml-100k)
    # synthetic generator (source == "synthetic")
    n_users: PosInt = 3000
    n_items: PosInt = 2000
    n_interactions: PosInt = 150_000
    n_clusters: PosInt = 16
    latent_dim: PosInt = 8
    popularity_exponent: NonNegFloat = 1.0  # Zipf exponent of the long-tail item popularity
    seed: Int = 0


# the distillation losses that read only the teacher's top-K order, so distill.cached_topk can feed them
# (kdray.distill.losses.TOP_K_ORDER_LOSSES; repeated here so that loading a config needs no torch)
TOP_K_ORDER_LOSSES = ("rd", "rrd")

SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def separator(sep: str) -> str:
    """``data.sep`` as the character the CSV reader splits on: the character itself, or one of SEPARATOR_NAMES
    (``tab`` and ``\\t`` spare users a literal tab, which shells and YAML make hard to type)."""
    return SEPARATOR_NAMES.get(sep.lower(), sep)


@section
class ModelConfig:
    """One recommender's architecture (see kdray/models/ for the registry)."""

    name: ModelName = "mf"
    dim: PosInt = 64
    hidden: Widths = ()
    dropout: Annotated[Float, rule(lambda v: 0 <= v < 1, "must be in [0, 1)")] = 0.0
    # lightgcn only: 0 scores users and items by the dot product of their vectors; > 0 by their cosine divided by this
    # temperature (the softmax then sees logits in [-1/t, 1/t]). On Gowalla t = 0.1 learned faster and tied the dot
    # product on validation, but scored well below it on test, recommending less popular items (BENCHMARKS.md); hence
    # off by default
    cosine_temperature: NonNegFloat = 0.0


@section
class DistillConfig:
    """How the student learns from the teacher(s)."""

    # DE-RRD's relaxed ranking distillation: under the equal-budget protocol (kdray study, BENCHMARKS.md) it beat
    # rd and listwise at every student size measured on the built-in data
    loss: DistillLoss = "rrd"
    alpha: Annotated[Float, rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")] = 0.7  # (1-alpha) hard + alpha distill
    temperature: PosFloat = 1.0
    topk: PosInt = 10  # ranking distillation: the teacher's top-K unobserved items
    mask_seen: Bool = True  # leave the user's training positives out of both distributions
    n_teachers: Count = 3  # >1 trains an ensemble of teachers with different seeds (the study's best on built-in data)
    teacher_weights: Annotated[tuple[Float, ...], list_of(), rule(  # ensemble weights (empty = uniform)
        lambda ws: all(w >= 0 for w in ws) and (not ws or sum(ws) > 0), "must be non-negative with a positive sum")] = ()
    init_from_teacher: Bool = True  # start the student from the teacher's user/item vectors projected by PCA
    # precompute the teacher's top-K per user with Ray Data instead of scoring per batch; the cache holds unobserved
    # items only, so it needs mask_seen=true (a ConfigError otherwise)
    cached_topk: Bool = False
    allow_larger_student: Bool = False


@section
class TrainConfig:
    """The shared training loop's settings (teacher and student each get their own section)."""

    epochs: PosInt = 20
    batch_size: PosInt = 256  # users per batch: each batch scores the whole catalog (or sampled candidates) per user
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.0  # Adam's (coupled) L2 on every parameter, every step
    # L2 on the embeddings a batch uses (its users and their positive items), summed and divided by the batch's user
    # count: RecBole's reg_weight, LightGCN's decay. Unlike weight_decay it leaves rows the batch does not use alone:
    # with batches of users, a user's row gets its data gradient once an epoch but Adam's coupled weight decay pulls
    # it every step (117 steps an epoch on Gowalla)
    embedding_l2: NonNegFloat = 0.0
    hard_loss: HardLoss = "softmax"
    n_negatives: PosInt = 1024  # sampled_softmax: shared negatives per batch; bpr / bce: negatives per positive
    patience: NonNegInt = 5  # epochs without validation improvement before stopping (0 = never stop early)
    seed: Int = 0


@section
class RayConfig:
    """How training is placed on the Ray cluster."""

    num_workers: Count = 1
    cpus_per_worker: PosFloat = 1.0
    use_gpu: Bool = False
    threads_per_worker: NonNegInt = 0  # torch intra-op threads per worker (0 = cpus_per_worker rounded, at least 1)
    # memory: each worker reads its shard once and re-batches it locally every epoch;
    # stream: each epoch iterates the shard through Ray Data again (BENCHMARKS.md compares the two)
    shard_mode: Literal["memory", "stream"] = "memory"
    storage_path: Str | None = None  # Ray Train results and checkpoints (None = RUN/ray); shared FS or s3:// on many nodes
    # worker-group restarts from the last checkpoint before a training fails (-1 = unlimited)
    max_failures: Annotated[Int, rule(lambda v: v >= -1, "must be >= 0 (or -1 for unlimited)")] = 2


@section
class EvalConfig:
    ks: Annotated[Widths, rule(len, "must be positive cut-offs")] = (10, 20)
    metric: Literal["ndcg", "recall", "hr", "mrr", "precision"] = "ndcg"  # model selection on validation: metric@k
    k: PosInt = 10
    batch_size: PosInt = 1024


@section
class TuneConfig:
    """Ray Tune search over the student's distillation settings (kdray/tune/)."""

    num_samples: Count = 8
    max_concurrent_trials: Count = 2
    searcher: Literal["random", "optuna", "hyperopt"] = "random"
    # ASHA: epochs before a trial may be stopped (0 = half of the trials' epochs). Early rungs keep the fastest
    # starters, not the best settings: low learning rates and strong regularisation start slowly and finish highest,
    # and a student started from the teacher's vectors starts high, so early cuts weaken a student-alone search more
    # than a distilled one (BENCHMARKS.md, "Equal-budget studies")
    grace_period: NonNegInt = 0
    reduction_factor: Annotated[Int, rule(lambda v: v >= 2, "must be >= 2")] = 2
    max_params_ratio: PosFloat = 0.1  # the winner must have at most this fraction of the teacher's parameters
    storage_path: Str | None = None  # None = RUN/tune/ray; a local dir, shared filesystem or s3:// URI
    autoscaling: Bool = False  # the cluster adds nodes for pending trials: skip the "can this ever run here" check
    space: dict[Str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> {"choice": [...]} | ...


@section
class TeacherSearchConfig:
    """``kdray run``'s teacher-tuning stage: a small Tune search over the teacher's lr and regularisation, picked on
    validation (kdray/tune/teacher.py); the ensemble's other teachers reuse the winning settings with other seeds.
    ASHA, concurrency and the searcher come from ``tune``."""

    enabled: Bool = True
    num_samples: Count = 4
    space: dict[Str, Any] = dataclasses.field(default_factory=dict)  # teacher_train key -> domain, over TEACHER_SPACE


@section
class StudyConfig:
    """``kdray study``: the equal-budget protocol (kdray/tune/study.py). Teacher, student alone and distilled student
    each get ``num_samples`` trials over the same training space, then each winner is retrained with every seed."""

    # label of benchmarks/results/<dataset>-d<dim>.json ("" = data.source)
    dataset: Annotated[Str, rule(lambda n: "/" not in n and n not in (".", ".."),
                                  "must be a file-name label without '/'")] = ""
    seeds: Annotated[tuple[Int, ...], list_of(), rule(lambda s: len(s) >= 1 and len(set(s)) == len(s),
                                                        "must be distinct seeds, at least one")] = (0, 1, 2)
    num_samples: Count = 8
    epochs: Count = 100  # every arm trains at most this many epochs (the default student peaks at 80-95) ...
    patience: NonNegInt = 10  # ... and stops after this many without validation improvement
    space: dict[Str, Any] = dataclasses.field(default_factory=dict)  # training key -> domain, over TRAIN_SPACE
    # distill.* key -> domain, over DISTILL_STUDY_SPACE
    distill_space: dict[Str, Any] = dataclasses.field(default_factory=dict)
    # more distillation losses, each its own distilled arm with the same budget and space, against the same teacher
    # and student alone (distill.loss is the main one); adding some to a finished study resumes it (--resume)
    losses: Annotated[tuple[DistillLoss, ...], list_of(), rule(
        lambda ls: len(set(ls)) == len(ls) and "none" not in ls, "must be distinct distillation losses, not 'none'")] = ()
    results_dir: Str = "benchmarks/results"
    # a trained teacher (the directory `kdray teacher` exported) as the teacher arm, instead of tuning one: for a
    # teacher too costly to search (a LightGCN on a large catalog), or the one already in production. The student
    # arms still get the same budget; the result records that the teacher was given, not tuned by the study.
    # Several directories (a list) are one teacher: an ensemble with equal weights, distilled as one ranking.
    teacher: Annotated[tuple[Str, ...], list_of(single=True), rule(
        lambda ts: len(set(ts)) == len(ts) and all(ts), "must be distinct, non-empty checkpoint directories")] = ()


@section
class PointwiseConfig:
    """The pointwise task (``task: pointwise``): (user, item, features) rows with a like label and the rating."""

    like_threshold: Float = 4.0  # like = rating >= like_threshold
    heads: Annotated[tuple[Literal["like", "rating"], ...], list_of(), rule(
        lambda hs: len(hs) > 0 and len(set(hs)) == len(hs) and "like" in hs,
        "must be distinct heads including 'like' (AUC selects the model)")] = ("like",)
    task_weights: dict[Literal["like", "rating"], NonNegFloat] = dataclasses.field(
        default_factory=lambda: {"like": 1.0, "rating": 0.1})  # the rating MSE is ~10x the like BCE at the start
    # csv / parquet: the file's categorical and numeric feature columns (ml-100k's own fields are built in)
    categorical: Annotated[tuple[Str, ...], list_of()] = ()
    numeric: Annotated[tuple[Str, ...], list_of()] = ()
    # extra constructor options of the pointwise models (kdray.models.pointwise), e.g. {multitask: mmoe}
    teacher_options: dict[Str, Any] = dataclasses.field(default_factory=dict)
    student_options: dict[Str, Any] = dataclasses.field(default_factory=dict)
    # with two heads, also train a like-only student (alone and distilled) for the report's single- vs multi-task rows
    compare_single_task: Bool = False


@section
class ServeConfig:
    host: Str = "127.0.0.1"
    port: Annotated[Int, rule(lambda v: 0 < v < 65536, "must be in 1..65535")] = 8000
    route_prefix: Str = "/"
    max_batch_size: Count = 32
    batch_wait_timeout_s: Float = 0.0  # batches still form under load (BENCHMARKS.md); waiting only adds latency
    max_ongoing_requests: Int = 64
    max_k: Count = 100
    max_request_batch: Count = 256
    max_history: Count = 200  # longest fold-in history a request may carry (kdray.serve.foldin); longer: a 422
    min_replicas: Int = 1
    max_replicas: Int = 2
    target_ongoing_requests: Int = 16
    num_cpus: Float = 1.0
    num_gpus: Float = 0.0
    # how requests reach the replicas (kdray/serve/ingress.py; measured in BENCHMARKS.md, "Serving ingress")
    ingress: Literal["haproxy", "proxy", "direct"] = "haproxy"
    body_timeout_s: PosFloat = 5.0  # a request body not complete by then gets a 408 instead of holding a replica slot


# ----------------------------------------------------------------------------------------------------------------
# The whole config, and the checks that span several keys.


def _default(cls: type, **values: Any) -> Any:
    """A section's defaults in ``Config``, built when a Config is: a section built here, at import, would import
    the registries (and torch) to validate its names."""
    return dataclasses.field(default_factory=functools.partial(cls, **values))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@section
class Config:
    # the run directory is RUNS_DIR/name: deterministic, so a rerun resumes
    name: Annotated[Str, rule(lambda n: n not in ("", ".", "..") and "/" not in n,
                               "must be a non-empty directory name without '/'")] = "default"
    runs_dir: Str = "runs"
    task: Literal["ranking", "pointwise"] = "ranking"  # pointwise: like/rating prediction from features (issue 12)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = _default(DataConfig)
    teacher: ModelConfig = _default(ModelConfig, name="mf", dim=256)
    student: ModelConfig = _default(ModelConfig, name="mf", dim=16)
    # measured on the built-in data (BENCHMARKS.md): the teacher plateaus within ~40 epochs, a 16-d student within ~100
    teacher_train: TrainConfig = _default(TrainConfig, lr=3e-3, epochs=40)
    student_train: TrainConfig = _default(TrainConfig, lr=1e-2, epochs=100, patience=10)
    distill: DistillConfig = _default(DistillConfig)
    ray: RayConfig = _default(RayConfig)
    eval: EvalConfig = _default(EvalConfig)
    tune: TuneConfig = _default(TuneConfig)
    serve: ServeConfig = _default(ServeConfig)
    teacher_search: TeacherSearchConfig = _default(TeacherSearchConfig)  # kdray run tunes its teacher
    study: StudyConfig = _default(StudyConfig)  # kdray study: the equal-budget protocol
    pointwise: PointwiseConfig = _default(PointwiseConfig)  # read when task == "pointwise"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir).expanduser() / self.name

    @property
    def has_validation(self) -> bool:
        """Whether the data has a validation split: ``split='loo'`` always holds one out, the ratio splits when
        ``data.split_ratios[1]`` is non-zero. Without one every model keeps its last epoch."""
        return self.data.split == "loo" or self.data.split_ratios[1] > 0

    @property
    def select_metric(self) -> str:
        """The validation metric used for early stopping, best checkpoints and Tune, e.g. ``ndcg@10`` (``auc`` for
        the pointwise task)."""
        if self.task == "pointwise":
            return "auc"
        return f"{self.eval.metric}@{self.eval.k}"

    @model_validator(mode="after")
    def _keys_agree(self) -> "Config":
        """The checks that span several keys (one key's own range is in its annotation)."""
        d, ratios = self.data, list(self.data.split_ratios)
        _check(abs(sum(ratios) - 1.0) < 1e-6, f"data.split_ratios: {ratios} must sum to 1, they sum to {sum(ratios):g}")
        _check(ratios[0] > 0 and (ratios[2] > 0 or d.split == "given"),
               f"data.split_ratios: {ratios} needs a non-zero train and test fraction")
        if not self.has_validation:
            # Early stopping, best-epoch selection and every search read the validation split; without one the last
            # epoch is kept, so the epoch count must be chosen beforehand (e.g. on a run with validation, then refit).
            _check(self.task == "ranking", f"data.split_ratios: {ratios} leaves no validation split, which "
                                           "task='pointwise' needs; give the second ratio a non-zero fraction")
            late = [f"{r}_train.patience (now {getattr(self, r + '_train').patience})" for r in ("teacher", "student")
                    if getattr(self, r + "_train").patience > 0]
            _check(not late, f"data.split_ratios: {ratios} leaves no validation split, so nothing can stop training "
                             f"early or pick its best epoch; set {' and '.join(late)} to 0 (each model then keeps its "
                             "last epoch), or give the second ratio a non-zero fraction")
            _check(not self.teacher_search.enabled,
                   f"data.split_ratios: {ratios} leaves no validation split for the teacher search to pick on; set "
                   "teacher_search.enabled=false, or give the second ratio a non-zero fraction")
        if d.source == "synthetic":
            _check(d.path is None, "data.path: the synthetic source reads no files; leave data.path empty")
            _check(d.n_interactions <= d.n_users * d.n_items,
                   f"data.n_interactions: {d.n_interactions} exceeds n_users * n_items = {d.n_users * d.n_items}")
        elif not d.download:
            _check(d.path is not None, f"data.path: required for data.source={d.source!r} (or set data.download=true "
                                       "for a MovieLens archive)")
        if d.download:
            _check(d.source.startswith("ml-"),
                   f"data.download: only MovieLens sources can be downloaded, not {d.source!r}")
        if d.split == "given":
            _check(d.source == "lightgcn",
                   f"data.split: 'given' needs a source with its own split (lightgcn), not {d.source!r}")
        if d.source in ("csv", "parquet"):
            _check(bool(d.user_col) and bool(d.item_col), "data.user_col and data.item_col must name columns")
        sep = separator(d.sep)
        _check(len(sep) == 1 and sep not in "\"\r\n" and not sep.isalnum(),
               f"data.sep: {d.sep!r} is not a usable separator; expected one character that is not a letter, digit, "
               f"quote or newline, or one of the names {', '.join(SEPARATOR_NAMES)} (a literal tab typed in a shell "
               "is often lost: write data.sep=tab)")
        if d.min_rating is not None:
            _check(d.source != "lightgcn", "data.min_rating: the lightgcn layout has no ratings")

        dist = self.distill
        _check(dist.allow_larger_student or self.student.dim <= self.teacher.dim,
               f"student.dim: {self.student.dim} is larger than teacher.dim {self.teacher.dim}; "
               "set distill.allow_larger_student=true if that is intended")
        _check(not dist.teacher_weights or len(dist.teacher_weights) == dist.n_teachers,
               f"distill.teacher_weights: {len(dist.teacher_weights)} weights for {dist.n_teachers} teachers")
        _check(not (dist.loss == "none" and dist.alpha > 0),
               "distill.alpha: must be 0 when distill.loss is 'none' (the student then trains alone)")
        _check(not dist.cached_topk or dist.loss in TOP_K_ORDER_LOSSES,
               "distill.cached_topk: only the losses that read the teacher's top-K order "
               f"({', '.join(TOP_K_ORDER_LOSSES)}) can use a cached top-K, not {dist.loss!r}")
        _check(not dist.cached_topk or dist.mask_seen,
               "distill.cached_topk: the cached top-K holds unobserved items only, so it needs distill.mask_seen=true "
               "(got distill.mask_seen=false)")
        if self.task == "pointwise":
            _check_pointwise(self)
        elif dist.init_from_teacher:
            from kdray.models import MODELS  # imported here for the reason given in registered
            able = [name for name, cls in MODELS.items() if cls.pca_student]
            _check(self.student.name in able,
                   f"distill.init_from_teacher: needs id embeddings in both models; student.name={self.student.name!r}"
                   f" cannot start from the teacher's (one of {', '.join(map(repr, able))} can), or set "
                   "distill.init_from_teacher=false")

        if self.task == "ranking":
            from kdray.models import MODELS

            for role in ("teacher", "student"):
                name = getattr(self, role).name
                _check(name in MODELS, f"{role}.name: {name!r} is a pointwise model; allowed values for "
                                       f"task='ranking': {', '.join(map(repr, MODELS))}")
        for role in ("teacher", "student"):
            m = getattr(self, role)
            _check(not m.cosine_temperature or m.name == "lightgcn",
                   f"{role}.cosine_temperature: {m.cosine_temperature} is a lightgcn option ({role}.name is "
                   f"{m.name!r}); leave it at 0")
        e, s = self.eval, self.serve
        _check(e.k in e.ks, f"eval.k: {e.k} must be one of eval.ks {list(e.ks)}")
        _check(s.max_ongoing_requests >= s.max_batch_size,
               f"serve.max_ongoing_requests: {s.max_ongoing_requests} must be >= serve.max_batch_size "
               f"{s.max_batch_size}, or batches never fill")
        _check(1 <= s.min_replicas <= s.max_replicas,
               f"serve.min_replicas/max_replicas: need 1 <= {s.min_replicas} <= {s.max_replicas}")
        return self


def _check_pointwise(cfg: "Config") -> None:
    """The keys the pointwise task reads, checked against each other and against the pointwise model registry."""
    from kdray.models.pointwise import POINTWISE_MODELS, build_pointwise_model

    p, d, dist = cfg.pointwise, cfg.data, cfg.distill
    _check(d.source in ("ml-100k", "csv", "parquet"),
           f"data.source: {d.source!r} has no features for task='pointwise'; allowed: 'ml-100k', 'csv', 'parquet'")
    _check(d.split == "random", f"data.split: task='pointwise' splits each user's ratings at random, not {d.split!r}")
    _check(d.source not in ("csv", "parquet") or d.rating_col is not None,
           "data.rating_col: task='pointwise' needs the rating column of the csv/parquet file")
    _check(dist.loss in ("none", "soft_bce"),
           f"distill.loss: {dist.loss!r} is a ranking loss; task='pointwise' distils with 'soft_bce' (Hinton soft "
           "labels for the like head, MSE to the teacher's rating) or 'none'")
    _check(not dist.init_from_teacher and not dist.cached_topk,
           "distill.init_from_teacher / distill.cached_topk: ranking-only; set them false for task='pointwise'")
    missing = [h for h in p.heads if h not in p.task_weights]
    _check(not missing, f"pointwise.task_weights: no weight for head {missing[0]!r}" if missing else "")
    for role in ("teacher", "student"):
        m = getattr(cfg, role)
        _check(m.name in POINTWISE_MODELS, f"{role}.name: {m.name!r} is not allowed for task='pointwise'; allowed "
                                           f"values: {', '.join(map(repr, POINTWISE_MODELS))}")
        try:  # a tiny build checks every option by name and value (ConfigError naming it)
            build_pointwise_model(m.name, **pointwise_options(cfg, role, heads=p.heads),
                                  n_users=1, n_items=1, cardinalities=[2], n_num=1)
        except ConfigError as e:
            raise ConfigError(f"{role} (pointwise model {m.name!r}): {e}; set it in {role}.* or "
                              f"pointwise.{role}_options") from None


def pointwise_options(cfg: "Config", role: str, heads: Sequence[str]) -> dict[str, Any]:
    """The pointwise model options of ``role`` ("teacher"/"student"): ``dim``, ``hidden`` (when given) and
    ``dropout`` (for the models that take it) from the model section, then ``pointwise.<role>_options``."""
    import inspect

    from kdray.models.pointwise import POINTWISE_MODELS

    m = getattr(cfg, role)
    params = inspect.signature(POINTWISE_MODELS[m.name].__init__).parameters
    out: dict[str, Any] = {"dim": m.dim, "heads": list(heads)}
    if m.hidden and "hidden" in params:
        out["hidden"] = list(m.hidden)
    if "dropout" in params:
        out["dropout"] = m.dropout
    return {**out, **getattr(cfg.pointwise, f"{role}_options")}


# ----------------------------------------------------------------------------------------------------------------
# Public API: load, override, serialise.


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is parsed as YAML (numbers, lists, true/null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, for example student.dim=32")
    try:
        # a value of only whitespace is meant literally (data.sep=<TAB>); YAML would read it as nothing
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {short(text)}: the value is not valid YAML ({problem})") from None
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


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(values: dict[str, Any]) -> Config:
    """Builds and validates a Config from a nested mapping (a parsed YAML file); missing keys take defaults, and a
    section given in part keeps ``Config``'s defaults for the rest of it (the teacher's dim of 256)."""
    tree = values or {}
    if isinstance(tree, dict):
        sections = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not MISSING}
        tree = {k: {**to_dict(sections[k]()), **v} if k in sections and isinstance(v, dict) else v
                for k, v in tree.items()}
    try:
        return _adapter(Config).validate_python(tree)
    except ValidationError as e:
        raise config_error(e, Config) from None


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
    return _adapter(type(cfg)).dump_python(cfg, mode="json")


def replace(cfg: Config, **dotted: Any) -> Config:
    """A validated copy with dotted keys changed: ``replace(cfg, **{"student.dim": 32})``."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return from_dict(tree)


# Keys added to the config after runs were keyed by it, with the value that means "as before". fingerprint leaves a
# key out while it holds that value, so a teacher or study keyed before the key existed keeps its key, and its
# --resume and reuse, while any other value makes a new key.
ADDED_LATER = {"cosine_temperature": 0.0}


def _without_added_later(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_added_later(v) for k, v in node.items()
                if not (k in ADDED_LATER and v == ADDED_LATER[k])}
    if isinstance(node, (list, tuple)):
        return [_without_added_later(v) for v in node]
    return node


def fingerprint(section: Any) -> str:
    """A short stable hash of a config section: names cached artifacts (prepared data, teachers) so that a change
    of settings never silently reuses a stale one."""
    tree = to_dict(section) if dataclasses.is_dataclass(section) else section
    blob = json.dumps(_without_added_later(tree), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
