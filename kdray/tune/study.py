"""The equal-budget study (issue 11): does a distilled student beat the same student *equally tuned* alone?

Papers (and kdray's own first benchmarks) often compare a tuned distilled student with an untuned control, and
distil from a teacher nobody tuned. ``kdray study`` gives three arms the same Ray Tune budget:

* ``teacher``: the teacher, over ``teacher_train.*``;
* ``alone``: the student without distillation, over ``student_train.*``;
* ``distilled``: the student distilled from the teacher arm's winner, over ``student_train.*`` and the distillation
  settings (``study.distill_space``), with ``distill.loss``;
* ``distilled-<loss>`` for each of ``study.losses``: the same distilled arm with another loss, so that losses are
  compared with the same budget against the same teacher and student alone. Adding losses to a finished study
  (``--resume``) trains only their arms.

"The same budget" is the same number of trials (``study.num_samples``), the same scheduler (ASHA with
``tune.grace_period``, by default half of ``study.epochs``, and ``tune.reduction_factor``), the same searcher and the
same training space over each role's own section (:data:`~kdray.tune.space.TRAIN_SPACE`: lr, weight_decay,
embedding_l2, batch_size; ``study.space`` changes it), with epochs and patience fixed for every arm
(``study.epochs``, ``study.patience``). The arms run in order, teacher first; each arm is
:func:`kdray.tune.search.run_arm`, so trials run in parallel on the cluster (``tune.max_concurrent_trials``) and ASHA
stops lagging ones cleanly. ASHA's early rungs would keep the fastest starters: a student started from the teacher's
vectors starts near its plateau and a slowly learning student alone does not, so a short grace period weakens the
control's search more than the distilled arm's (BENCHMARKS.md).

Winners are picked on validation, then retrained with every seed of ``study.seeds``: for seed ``s`` the teacher, the
student alone and the distilled student (which distils from the seed-``s`` teacher) train with ``s`` and are
evaluated once on the test split. A winning trial trained with the configured seed *is* that seed's model and is
reused as such. The output is the test mean ± std per arm, the gain (distilled - alone), the share of the
teacher-alone gap recovered, and whether the gain exceeds twice the larger of the two student arms' seed std
(:func:`compare`); and, on validation, whether the tuned teacher beats the tuned student alone at all.

The teacher arm does not depend on the student, so every student size of a dataset shares it: its search and its
seed models live in ``RUNS_DIR/study-<dataset>-teacher-<key>``, named after what they depend on (data, teacher,
teacher_train, eval, the teacher's space and the search budget). The first study of a dataset tunes the teacher; the
next sizes reuse it, or resume it if it was interrupted. A lock file there makes a second study wait while another
one works on the same teacher. (Studies started before the teacher was shared keep their teacher in their own
directory, and ``--resume`` still finds it there.)

A teacher too costly to search (a LightGCN on a large catalog takes half an hour a training on two cores), or the one
already in production, can be given instead: ``study.teacher=RUN/teacher``. Then there is no teacher search: every
seed's distilled student distils from that one model, the student arms still get the same budget as each other, and
the result says that the teacher was given (``teacher_given``) and got no trials of the study's budget. Several
directories, ``'study.teacher=[RUN1/teacher, RUN2/teacher]'``, are one teacher: an ensemble with equal weights, which
the students distil as one ranking (as ``kdray run`` distils ``distill.n_teachers`` teachers) and which is scored as
one on validation and test (``teacher_members`` lists its models).

Everything else lives in one run directory per size, ``RUNS_DIR/study-<dataset>-d<dim>``: ``tune/`` (the student
searches), ``seed-S/`` (the retrained students, reused by their stage key) and ``study.json``. ``--resume`` restores
interrupted searches with Tune and reuses every finished model; the result also goes to
``<study.results_dir>/<dataset>-d<dim>.json``, from which ``benchmarks/study_report.py`` writes BENCHMARKS.md's tables
and the compression frontier.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kdray.checkpoint import check_matches_data, check_same_training_split, load_checkpoint, stage_key
from kdray.config import TOP_K_ORDER_LOSSES, Config, fingerprint, replace, to_dict
from kdray.data.prepare import popularity_note
from kdray.errors import CheckpointError, ConfigError, KdrayError
from kdray.layout import RunLayout, atomic_replace_dir, atomic_write_text
from kdray.tune.asha import grace_period
from kdray.tune.space import (
    DISTILL_PREFIX,
    DISTILL_STUDY_SPACE,
    STUDY_ARMS,
    TRAIN_SPACE,
    arm_trials,
    distils,
    loss_arm,
    role_of,
    section_space,
    trial_config,
    validate_space,
)
from kdray.tune.teacher import ArmResult, search_arm, settings_text

# ----------------------------------------------------------------------------------------------------------------
# The arithmetic of the claim (pure: pinned by hand-computed values in the tests).


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value: one seed says nothing of the spread)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def compare(teacher: Sequence[float], alone: Sequence[float], distilled: Sequence[float]) -> dict[str, Any]:
    """The study's verdict from per-seed test scores of the three arms.

    ``gain = mean(distilled) - mean(alone)``; ``gap_recovered = gain / (mean(teacher) - mean(alone))``, None when the
    teacher is not better than the student alone (there is no gap to recover); ``significant``: the gain exceeds
    ``2 * max(std(alone), std(distilled))``, False when a std is undefined (one seed)."""
    (t, t_sd), (a, a_sd), (d, d_sd) = mean_std(teacher), mean_std(alone), mean_std(distilled)
    gain, gap = d - a, t - a
    threshold = 2 * max(a_sd, d_sd)
    return {"mean": {"teacher": t, "alone": a, "distilled": d}, "std": {"teacher": t_sd, "alone": a_sd,
                                                                         "distilled": d_sd},
            "gain": gain, "gap": gap, "gap_recovered": gain / gap if gap > 0 else None,
            "threshold_2x_std": threshold, "significant": bool(math.isfinite(threshold) and gain > threshold)}


# ----------------------------------------------------------------------------------------------------------------
# The study's config and spaces: everything checked before anything trains.


def label_of(cfg: Config) -> str:
    return cfg.study.dataset or cfg.data.source


def study_config(cfg: Config) -> Config:
    """The base config of every arm: one teacher (the distilled arm distils the teacher arm's model), the study's
    epochs and patience for both roles, the study's trial count, ASHA's grace period resolved to a number of epochs
    (the study's key and result record it), and the run directory of this (dataset, dim)."""
    st = cfg.study
    if not cfg.has_validation:
        raise ConfigError(f"data.split_ratios: {list(cfg.data.split_ratios)} leaves no validation split, and the study "
                          "picks every arm's winner on validation; give the second ratio a non-zero fraction")
    if cfg.distill.loss == "none":
        raise ConfigError("distill.loss: 'none' leaves the study's distilled arm without a teacher; choose a "
                          "distillation loss (the alone arm is the study's control)")
    if cfg.distill.loss in st.losses:
        raise ConfigError(f"study.losses: {cfg.distill.loss!r} is distill.loss, the main distilled arm; list only "
                          "other losses there")
    for loss in st.losses:
        loss_config(cfg, loss)
    return replace(cfg, name=f"study-{label_of(cfg)}-d{cfg.student.dim}", **{
        "tune.num_samples": st.num_samples, "tune.grace_period": grace_period(cfg, st.epochs),
        "distill.n_teachers": 1, "distill.teacher_weights": [],
        "teacher_train.epochs": st.epochs, "student_train.epochs": st.epochs,
        "teacher_train.patience": st.patience, "student_train.patience": st.patience})


def loss_config(cfg: Config, loss: str) -> Config:
    """The distilled arm's config with another loss (a cached top-K only where the loss can read it); ConfigError if
    it cannot be."""
    cached = {} if loss in TOP_K_ORDER_LOSSES else {"distill.cached_topk": False}
    try:
        return replace(cfg, **{"distill.loss": loss, **cached})
    except ConfigError as e:
        raise ConfigError(f"study.losses: {loss!r} cannot be the distilled arm's loss here: {e}") from None


def study_spaces(cfg: Config) -> dict[str, dict[str, dict[str, Any]]]:
    """Each arm's space: the same training space over the arm's own section; the distilled arm adds the
    distillation settings. Raises ConfigError naming the key for anything the search could not run."""
    distill = {k: v for k, v in {**DISTILL_STUDY_SPACE, **cfg.study.distill_space}.items() if v is not None}
    for key in distill:
        if not key.startswith(DISTILL_PREFIX):
            raise ConfigError(f"study.distill_space.{key}: not a distillation setting; the distilled arm adds "
                              "distill.* keys to the shared training space (study.space)")
    spaces = {arm: section_space(TRAIN_SPACE, cfg.study.space, arm, "study.space") for arm in STUDY_ARMS}
    spaces["distilled"] = {**spaces["distilled"], **distill}
    for arm, space in spaces.items():
        section = "study.distill_space" if arm == "distilled" else "study.space"
        searchable = ("teacher_train.",) if arm == "teacher" else ("student_train.", DISTILL_PREFIX)
        validate_space(cfg, space, searchable, section)
    trials = {arm: arm_trials(cfg, space, arm) for arm, space in spaces.items()}
    if len(set(trials.values())) > 1:
        raise ConfigError(f"study.distill_space: a grid dimension gives the arms different trial counts ({trials}); "
                          "the protocol needs the same budget for every arm: use choice instead of grid there")
    return spaces


def _key(cfg: Config, spaces: dict[str, Any]) -> str:
    """What the searches depend on (seeds, resources and concurrency may change on --resume)."""
    keys = [stage_key(p) for p in cfg.study.teacher]
    # one given teacher keeps the key it had when study.teacher was a single path, so such studies still resume
    given = {"given_teacher": keys[0] if len(keys) == 1 else keys} if keys else {}
    return fingerprint({"spaces": spaces, "num_samples": cfg.tune.num_samples, "searcher": cfg.tune.searcher,
                        **given,
                        "grace_period": cfg.tune.grace_period, "reduction_factor": cfg.tune.reduction_factor,
                        **{s: to_dict(getattr(cfg, s)) for s in ("data", "teacher", "teacher_train", "student",
                                                                   "student_train", "distill", "eval")}})


def _check_state(cfg: Config, spaces: dict[str, Any], resume: bool) -> None:
    """A fresh study refuses to write over an earlier one; a resumed one must be the same study."""
    record = RunLayout(cfg.run_dir).tune / "study.json"
    key = _key(cfg, spaces)
    if record.is_file():
        before = json.loads(record.read_text())
        if not resume:
            raise ConfigError(f"a study already exists in {cfg.run_dir}; continue it with kdray study --resume, or "
                              "choose another runs_dir (or delete it)")
        if before.get("key") != key:
            raise ConfigError(f"--resume: the study in {cfg.run_dir} was started with other settings; resume it "
                              "with its own config (RUN/config.yaml), or start it in another runs_dir")
    atomic_write_text(record, json.dumps({"key": key, "spaces": spaces}, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The teacher arm, shared by every student size of a dataset.


def teacher_home(cfg: Config, space: dict[str, Any]) -> Config:
    """The config whose run directory holds the teacher arm: ``study-<dataset>-teacher-<key>``, where the key is
    everything the teacher search and its seed models depend on. The student (its size, its training) is not part
    of it; the searcher's seed is, since it decides which settings the trials sample. A study started before the
    teacher was shared has the teacher search in its own directory: that one stays where it is."""
    from ray import tune

    from kdray.tune.search import _storage, experiment_name

    if tune.Tuner.can_restore(f"{_storage(cfg)}/{experiment_name(cfg, 'teacher')}"):
        return cfg
    key = fingerprint({"space": space, "num_samples": cfg.tune.num_samples, "searcher": cfg.tune.searcher,
                       "searcher_seed": cfg.student_train.seed, "grace_period": cfg.tune.grace_period,
                       "reduction_factor": cfg.tune.reduction_factor,
                       **{s: to_dict(getattr(cfg, s)) for s in ("data", "teacher", "teacher_train", "eval")}})
    return replace(cfg, name=f"study-{label_of(cfg)}-teacher-{key}")


@contextlib.contextmanager
def teacher_lock(run_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Holds ``run_dir/.lock`` (an OS file lock, released when the process ends however it ends): two studies that
    share a teacher must not run its Tune experiment or train its seed models at the same time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[study] another study is tuning the same teacher in {run_dir}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _teacher_arm(cfg: Config, space: dict[str, Any], data: Any, resume: bool,
                 log: Callable[[str], None]) -> tuple[ArmResult, dict[int, Path], Path]:
    """The tuned teacher and its model for every seed (searched, resumed or reused), and where they live."""
    home = teacher_home(cfg, space)
    shared = home.run_dir != cfg.run_dir
    if shared:
        log(f"[study] the teacher arm is shared by every student size of this dataset: {home.run_dir}")
    with teacher_lock(home.run_dir, log):
        # a shared teacher arm with the same key is the same search: reuse it, or resume it if it was interrupted
        result = search_arm(home, "teacher", space, data, [], resume or shared, log,
                            name=home.name if shared else None)
        if result.winner is None:
            raise KdrayError("the study's teacher arm completed no trial; see "
                             f"{RunLayout(home.run_dir).tune_trials('teacher')}")
        log(_arm_line("teacher", result, cfg.select_metric))
        models = {}
        for seed in cfg.study.seeds:
            seed_cfg = replace(trial_config(home, result.params, "teacher"), **{"teacher_train.seed": seed})
            out = RunLayout(home.run_dir / f"seed-{seed}").teacher(0)
            models[seed] = _seed_model(seed_cfg, "teacher", data, out, [], result.winner, log)
    return result, models, home.run_dir


def given_teacher(cfg: Config, data: Any, log: Callable[[str], None]) -> tuple[Config, ArmResult]:
    """``study.teacher``: trained teachers as the teacher arm, searched by no one here; several are one ensemble with
    equal weights. Returns ``cfg`` with the (first) teacher's own ``teacher`` and ``teacher_train`` sections (so the
    study's records name the real teacher) and ``distill.n_teachers`` the number of models, and the arm, whose
    winner holds the checkpoints (``checkpoints``) and the teacher's validation score: the model's own, or, for an
    ensemble, the ensemble's, from its test and validation scores (``scores``), ranked here once for every seed.
    ConfigError naming ``study.teacher`` for anything that cannot be it."""
    from kdray.evaluate import evaluate_ensemble

    valid_key = f"valid_{cfg.select_metric}"
    paths = [Path(p).expanduser().resolve() for p in cfg.study.teacher]
    ckpts = []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
            check_matches_data(ckpt, data)
            if ckpt.pointwise or valid_key not in ckpt.metrics:
                raise ConfigError(f"study.teacher: {path} has no {valid_key} in its metrics.json (a ranking model "
                                  f"trained and validated with eval.metric={cfg.eval.metric}, eval.k={cfg.eval.k}); "
                                  "the study compares the teacher with the student alone on validation by it")
            check_same_training_split(ckpt, data)
        except CheckpointError as e:
            raise ConfigError(f"study.teacher: {e}") from None
        ckpts.append(ckpt)
    sections = {f"{section}.{k}": v for section in ("teacher", "teacher_train")
                for k, v in ckpts[0].config.get(section, {}).items()}
    try:
        cfg = replace(cfg, **sections, **{"study.teacher": tuple(map(str, paths)), "distill.n_teachers": len(paths)})
    except ConfigError as e:
        raise ConfigError(f"study.teacher: {paths[0]}/config.json: {e}") from None
    members = [{"checkpoint": str(path), "model": f"{c.config['teacher']['name']}-{c.config['teacher']['dim']}",
                "n_params": int(c.metrics.get("n_params") or sum(p.numel() for p in c.model.parameters())),
                valid_key: c.metrics[valid_key]} for path, c in zip(paths, ckpts)]
    scored = {}
    if len(ckpts) == 1:
        valid = members[0][valid_key]
    else:  # ranked the way the students distil it; the validation split masks (and propagates over) train only
        scored = {"scores": evaluate_ensemble(paths, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)}
        valid = scored["scores"][valid_key]
        for m in members:
            log(f"[study] teacher member: {m['checkpoint']}, {m['model']}, {m['n_params']:,} parameters, valid "
                f"{cfg.select_metric} {m[valid_key]:.4f}")
    what = members[0]["model"] if len(ckpts) == 1 else f"an ensemble of {len(ckpts)} models, equal weights"
    winner = {"trial": "given", "checkpoints": [str(p) for p in paths], "members": members,
              "n_params": sum(m["n_params"] for m in members), valid_key: valid, **scored}
    log(f"[study] teacher: given ({', '.join(winner['checkpoints'])}), {what}, {winner['n_params']:,} parameters, "
        f"valid {cfg.select_metric} {valid:.4f}; not tuned by this study")
    return cfg, ArmResult(rows=[], winner=winner, params={})


# ----------------------------------------------------------------------------------------------------------------
# The study.


def _count(result: ArmResult, status: str) -> int:
    return sum(r["status"] == status for r in result.rows)


def _arm_line(arm: str, result: ArmResult, metric: str) -> str:
    """What one finished search gave, for the console."""
    w = result.winner
    return (f"[study] {arm}: {len(result.rows)} trials ({_count(result, 'completed')} completed, "
            f"{_count(result, 'stopped early')} stopped early by ASHA); winner {w['trial']}, valid {metric} "
            f"{w[f'valid_{metric}']:.4f} ({settings_text(result.params)})")


def _seed_model(cfg: Config, role: str, data: Any, out_dir: Path, teachers: list[Path], winner: dict[str, Any],
                log: Callable[[str], None]) -> Path:
    """One winner retrained with one seed, or reused: a finished stage with the same key, or the winning trial
    itself when it trained with exactly these settings (the configured seed)."""
    from kdray.pipeline import stage_key_of, train_stage

    key = stage_key_of(cfg, role, teachers)
    if stage_key(out_dir) != key and stage_key(winner["checkpoint"]) == key:
        log(f"[{out_dir.parent.name}/{out_dir.name}] the winning trial {winner['trial']} trained with this seed")
        atomic_replace_dir(out_dir, lambda tmp: shutil.copytree(winner["checkpoint"], tmp, dirs_exist_ok=True))
    return train_stage(cfg, role, data, out_dir, teachers, log)


def _scores(path: Path, data: Any, cfg: Config) -> dict[str, float]:
    """Test and validation scores of one arm's model of one seed (its validation score from training)."""
    from kdray.evaluate import evaluate_checkpoint

    valid_key = f"valid_{cfg.select_metric}"
    test = evaluate_checkpoint(path, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size, write=False)
    return {**test, valid_key: load_checkpoint(path).metrics[valid_key]}


def run_study(cfg: Config, resume: bool = False, log: Callable[[str], None] = print,
              command: str = "") -> dict[str, Any]:
    """Runs (or resumes) the three searches and the seed retraining; writes and returns the result (see the module
    docstring). ``command`` is recorded as how to reproduce it."""
    from kdray.pipeline import prepare_data, write_resolved_config
    from kdray.tune.search import _searcher, check_resources

    t0 = time.perf_counter()
    cfg = study_config(cfg)
    spaces = study_spaces(cfg)
    metric = cfg.select_metric
    _searcher(cfg, metric)  # the optional package is there
    check_resources(cfg)
    data = prepare_data(cfg)
    if cfg.study.teacher:
        cfg, given = given_teacher(cfg, data, log)
    _check_state(cfg, spaces, resume)
    write_resolved_config(cfg)

    extra = {loss_arm(loss): loss for loss in cfg.study.losses}  # the same distilled arm, another loss
    all_arms = (*STUDY_ARMS, *extra)
    arm_spaces = {**spaces, **dict.fromkeys(extra, spaces["distilled"])}
    arms: dict[str, ArmResult] = {}
    if cfg.study.teacher:  # the given model(s): every seed's student distils from them
        arms["teacher"], searched = given, [Path(p) for p in given.winner["checkpoints"]]
        teacher_models, teacher_run = dict.fromkeys(cfg.study.seeds, searched), ", ".join(map(str, searched))
    else:
        arms["teacher"], seed_teachers, home = _teacher_arm(cfg, spaces["teacher"], data, resume, log)
        searched, teacher_run = [Path(arms["teacher"].winner["checkpoint"])], str(home)
        teacher_models = {seed: [path] for seed, path in seed_teachers.items()}
    # the student arms distil from (and record) the tuned teacher
    base = trial_config(cfg, arms["teacher"].params, "teacher")
    bases = {a: loss_config(base, extra[a]) if a in extra else base for a in all_arms[1:]}
    for arm in all_arms[1:]:
        arms[arm] = search_arm(bases[arm], arm, arm_spaces[arm], data, searched if distils(arm) else [], resume, log)
        if arms[arm].winner is None:
            raise KdrayError(f"the study's {arm} arm completed no trial; see {RunLayout(cfg.run_dir).tune_trials(arm)}")
        log(_arm_line(arm, arms[arm], metric))

    valid_key, test_key, recall_key = f"valid_{metric}", f"test_{metric}", f"test_recall@{cfg.eval.k}"
    scores: dict[str, dict[str, list[float]]] = {k: {arm: [] for arm in all_arms}
                                                 for k in (test_key, recall_key, valid_key)}
    # every model is scored once: a given ensemble was when the study started (given_teacher), the rest are here
    scored = {tuple(searched): arms["teacher"].winner["scores"]} if "scores" in arms["teacher"].winner else {}
    for seed in cfg.study.seeds:
        layout = RunLayout(cfg.run_dir / f"seed-{seed}")
        configs = {arm: replace(trial_config(bases[arm], arms[arm].params, arm),
                                **{f"{role_of(arm)}_train.seed": seed}) for arm in all_arms[1:]}
        teachers = teacher_models[seed]
        out_dirs = {"alone": layout.student_alone, "distilled": layout.student,
                    **{arm: layout.root / f"student-{loss}" for arm, loss in extra.items()}}
        paths = {"teacher": teachers}
        for arm, out in out_dirs.items():
            used = teachers if distils(arm) else []
            paths[arm] = [_seed_model(configs[arm], "student", data, out, used, arms[arm].winner, log)]
        for arm, models in paths.items():
            key = tuple(models)
            if key not in scored:  # a given teacher is the same model for every seed
                scored[key] = _scores(models[0], data, cfg)
            for k in (test_key, recall_key, valid_key):
                scores[k][arm].append(scored[key][k])
        log(f"[study] seed {seed}: test {metric} " + ", ".join(f"{a} {scores[test_key][a][-1]:.4f}" for a in all_arms))

    winners_valid = {arm: arms[arm].winner[valid_key] for arm in all_arms}
    main = {k: {arm: v[arm] for arm in STUDY_ARMS} for k, v in scores.items()}
    result = {
        "dataset": label_of(cfg), "metric": test_key, "student_dim": cfg.student.dim,
        "params": {"teacher": arms["teacher"].winner["n_params"], "student": arms["alone"].winner["n_params"]},
        "loss": cfg.distill.loss,
        "arms": main[test_key], "recall": {"metric": recall_key, "arms": main[recall_key]},
        "valid": {"metric": valid_key, "arms": main[valid_key], "winners": {a: winners_valid[a] for a in STUDY_ARMS}},
        "seeds": list(cfg.study.seeds),
        "summary": compare(*(scores[test_key][a] for a in STUDY_ARMS)),
        "teacher_beats_alone_on_valid": winners_valid["teacher"] > winners_valid["alone"],
        # how far the split's test items are from its validation items in training popularity (picked on one,
        # reported on the other; kdray.data.prepare.popularity_note)
        "popularity_shift": data.popularity_shift(),
        # study.losses: each extra loss's distilled arm, against the same teacher and student alone
        "losses": {loss: {"arm": arm, "arms": scores[test_key][arm], "recall": scores[recall_key][arm],
                          "valid": scores[valid_key][arm], "winner_valid": winners_valid[arm],
                          "winner": {"trial": arms[arm].winner["trial"], "params": arms[arm].params},
                          "summary": compare(scores[test_key]["teacher"], scores[test_key]["alone"],
                                             scores[test_key][arm])}
                   for arm, loss in extra.items()},
        # a given teacher (study.teacher) got none of the study's trials; several given models are one ensemble
        "teacher_given": bool(cfg.study.teacher),
        **({"teacher_members": arms["teacher"].winner["members"]} if len(cfg.study.teacher) > 1 else {}),
        "budget": {"trials": {arm: 0 if arm == "teacher" and cfg.study.teacher
                              else arm_trials(cfg, arm_spaces[arm], arm) for arm in all_arms},
                   "completed": {arm: _count(arms[arm], "completed") for arm in all_arms},
                   "stopped_early": {arm: _count(arms[arm], "stopped early") for arm in all_arms},
                   "scheduler": {"name": "ASHA", "grace_period": cfg.tune.grace_period,
                                 "reduction_factor": cfg.tune.reduction_factor, "max_t": cfg.study.epochs},
                   "searcher": cfg.tune.searcher, "max_concurrent_trials": cfg.tune.max_concurrent_trials,
                   "epochs": cfg.study.epochs, "patience": cfg.study.patience, "spaces": spaces},
        "winners": {arm: {"trial": arms[arm].winner["trial"], "params": arms[arm].params,
                          valid_key: winners_valid[arm]} for arm in STUDY_ARMS},
        "teacher_run": teacher_run, "command": command, "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(result, indent=2, default=float) + "\n"
    atomic_write_text(cfg.run_dir / "study.json", text)
    out = Path(cfg.study.results_dir).expanduser() / f"{label_of(cfg)}-d{cfg.student.dim}.json"
    atomic_write_text(out, text)
    for line in verdict(result):
        log(f"[study] {line}")
    log(f"[study] written to {out} ({result['seconds']:.0f} s)")
    return result


def _gain_line(what: str, s: dict[str, Any]) -> str:
    recovered = "no gap to recover" if s["gap_recovered"] is None else f"{s['gap_recovered']:.0%} of the gap"
    return (f"{what} {s['gain']:+.4f}, {recovered}; {'exceeds' if s['significant'] else 'does not exceed'} 2x the "
            f"larger seed std ({s['threshold_2x_std']:.4f})")


def verdict(result: dict[str, Any]) -> list[str]:
    """The study's outcome in plain sentences (console and report)."""
    s, metric = result["summary"], result["metric"]
    lines = [f"{arm}: {metric} {s['mean'][arm]:.4f} ± {s['std'][arm]:.4f} over {len(result['arms'][arm])} seeds"
             for arm in STUDY_ARMS]
    lines.append(_gain_line(f"gain (distilled with {result.get('loss', 'the configured loss')} - alone)", s))
    for loss, r in result.get("losses", {}).items():
        ls = r["summary"]
        lines.append(f"distilled with {loss}: {metric} {ls['mean']['distilled']:.4f} ± {ls['std']['distilled']:.4f}; "
                     + _gain_line("gain", ls))
    v = result["valid"]["winners"]
    if result.get("teacher_given"):
        lines.append(f"the teacher was given ({result['teacher_run']}), not tuned by the study; the student arms had "
                     "the same budget")
    teacher = "the given teacher" if result.get("teacher_given") else "the tuned teacher"
    if not result["teacher_beats_alone_on_valid"]:
        lines.append(f"{teacher} does NOT beat the tuned student alone on validation ({v['teacher']:.4f} vs "
                     f"{v['alone']:.4f}): distillation cannot be expected to help here")
    else:
        lines.append(f"on validation {teacher} beats the tuned student alone ({v['teacher']:.4f} vs "
                     f"{v['alone']:.4f})")
    popularity = popularity_note(result.get("popularity_shift"))
    if popularity:
        lines.append(popularity.replace("**", ""))
    return lines
