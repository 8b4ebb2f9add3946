"""The ``kdray`` command.

    kdray run      [--config FILE] [key=value ...]   the whole pipeline: data, teacher(s), student, control, report
    kdray data     [--config FILE] [key=value ...]   prepare the data only
    kdray teacher  [--config FILE] [key=value ...]   train the teacher(s)
    kdray distill  --teacher CKPT [--teacher CKPT ...] [--config FILE] [key=value ...]
    kdray eval     --checkpoint CKPT [--checkpoint CKPT ...] [--output FILE.json] [--config FILE] [key=value ...]
    kdray tune     [--config FILE] [--resume] [key=value ...]
    kdray study    [--config FILE] [--resume] [key=value ...]   the equal-budget study: teacher, alone, distilled
    kdray serve    --checkpoint CKPT [--config FILE] [key=value ...]
    kdray update   --run RUN --interactions NEW.parquet [--checkpoint CKPT] [--epochs N] [--rollout] [key=value ...]

Every command takes ``--address`` (or ``RAY_ADDRESS``) to run on an existing Ray cluster; without it a local cluster
is started. User mistakes (bad config, missing files, mismatched checkpoints) print one line naming the problem and
exit with status 2, before any Ray worker starts. Options and ``key=value`` overrides mix in any order.

``run``, ``teacher``, ``distill``, ``tune`` and ``study`` print kdray's lines only (stages, epochs, trials, the tables);
what Ray (and Ray Tune's progress table) prints goes to RUN/logs/ray.log, or to the console with ``--verbose``
(kdray.console). ``serve`` sends Ray's log lines to RUN/logs/serve.log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kdray.errors import KdrayError
from kdray.layout import RunLayout, atomic_write_text

if TYPE_CHECKING:
    from kdray.config import Config


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``kdray`` parser (for ``--help`` and unknown commands) and each command's own parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config (defaults: the built-in synthetic data set)")
    common.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a new local cluster)")
    common.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. student.dim=32")

    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--verbose", "-v", action="store_true",
                       help="show Ray's own logs on the console (by default they go to RUN/logs/ray.log)")

    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation for recommenders on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common, quiet], help="the whole pipeline and its report")
    sub.add_parser("data", parents=[common], help="prepare the data (Parquet under the run directory)")
    sub.add_parser("teacher", parents=[common, quiet], help="train the teacher (or the ensemble of teachers)")
    p = sub.add_parser("distill", parents=[common, quiet], help="distil a student from teacher checkpoints")
    p.add_argument("--teacher", action="append", required=True, help="teacher checkpoint directory (repeatable)")
    p.add_argument("--out", help="where to export the student (default RUN/student)")
    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint (or an ensemble) on the test split")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint directory; repeat it to rank several as one ensemble, the way a student distils "
                        "them (distill.teacher_weights, or equal weights)")
    p.add_argument("--output", help="also write the metrics, with the checkpoint's model, training settings and "
                                    "epochs, to this JSON file")
    p = sub.add_parser("tune", parents=[common, quiet], help="Ray Tune search over distillation settings")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p = sub.add_parser("study", parents=[common, quiet], help="equal-budget study: teacher, student alone and "
                       "distilled student, each tuned with the same Ray Tune budget, winners retrained over seeds")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p = sub.add_parser("serve", parents=[common], help="serve a checkpoint behind an HTTP endpoint (Ray Serve)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=True,
                   help="keep serving until interrupted (default)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Ray's log lines on the console (default: only in RUN/logs/serve.log)")
    p = sub.add_parser("update", parents=[common],
                       help="fold new interactions into a run's student: a short warm-started training, a new version")
    p.add_argument("--run", required=True, help="the run directory (its config.yaml is the default --config)")
    p.add_argument("--interactions", required=True, help="Parquet or CSV with columns user, item[, timestamp]")
    p.add_argument("--checkpoint", help="the student to start from (default: the run's latest version)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the warm-started training (default 3)")
    p.add_argument("--rollout", action="store_true",
                   help="redeploy the running Serve application with the new version (zero downtime)")
    return parser, dict(sub.choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides mix in any order (``kdray data a=1 --config F b=2``): each command's
    parser reads its arguments with ``parse_intermixed_args``, which argparse cannot do across subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, or an error naming the commands
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


# Ray Train V2 workers hand each report to the controller through a queue of one, which the controller drains on its
# health-check tick (2 s by default): with epochs shorter than that, every report would wait up to 2 s
# (BENCHMARKS.md, Ray overhead). Its print patch also echoes every worker print twice.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_TRAIN_V2_ENABLED": "1"}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
             log_to_driver: bool = True, system_config: dict[str, Any] | None = None) -> None:
    """Connects to ``address`` / $RAY_ADDRESS, or starts a local cluster (``address="local"`` never joins a stale
    cluster left by an earlier ``ray start``). kdray's Ray settings (RAY_ENV) reach every process of the job.
    ``system_config`` passes Ray's internal settings to a local cluster it starts (benchmarks only; kdray sets none)."""
    import ray

    if ray.is_initialized():
        return
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=env)
    else:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, log_to_driver=log_to_driver, runtime_env=env, _system_config=system_config)


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise KdrayError(f"{what} {p} does not exist")
    return p


def _serve_checkpoint_dir(path: str, run_dir: Path) -> Path:
    """``path`` if it is a directory, else an error naming the checkpoints that exist under the run directory
    (``best`` exists only after ``kdray tune``; ``kdray run`` leaves ``student``, ``teacher``, ...)."""
    p = Path(path)
    if p.is_dir():
        return p
    found = sorted(str(d.parent) for d in run_dir.glob("**/meta.json")) if run_dir.is_dir() else []
    hint = (f"checkpoints under {run_dir}: {', '.join(found)}" if found
            else f"no checkpoints under {run_dir} (the run directory): run `kdray run` first")
    raise KdrayError(f"checkpoint directory {p} does not exist; {hint}")


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Imports after parsing so `kdray --help` is instant and config errors come before Ray starts.
    from kdray.config import load_config

    if args.command == "update":
        from kdray.train.update import read_interactions, update_run

        run_dir = _require_dir(args.run, "run directory")
        cfg = load_config(args.config or RunLayout(run_dir).config, args.overrides)
        rows = read_interactions(args.interactions)
        init_ray(args.address)
        update_run(cfg, run_dir, rows, source=str(Path(args.interactions).resolve()), checkpoint=args.checkpoint,
                   epochs=args.epochs, rollout=args.rollout)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "data":
        from kdray.pipeline import prepare_data, write_resolved_config

        write_resolved_config(cfg)
        data = prepare_data(cfg)
        if cfg.task == "pointwise":
            print(f"prepared {data.n_users} users, {data.n_items} items, rows per split {data.counts} in {data.path}")
            return 0
        print(f"prepared {data.n_users} users, {data.n_items} items, {data.train.nnz} / {data.valid.nnz} / "
              f"{data.test.nnz} train / valid / test interactions in {data.path}")
        return 0
    if args.command == "eval":
        from kdray.evaluate import evaluate_checkpoint
        from kdray.pipeline import prepare_data

        ckpts = [_require_dir(c, "checkpoint directory") for c in args.checkpoint]
        if args.output and Path(args.output).is_dir():
            raise KdrayError(f"--output {args.output} is a directory; give the JSON file to write")
        if len(ckpts) > 1 and cfg.task == "pointwise":
            raise KdrayError("kdray eval ranks several checkpoints as one ensemble for the ranking task only; give "
                             "one --checkpoint for task=pointwise")
        data = prepare_data(cfg)
        weights = list(cfg.distill.teacher_weights)
        if cfg.task == "pointwise":
            from kdray.pointwise_run import evaluate_pointwise

            metrics = evaluate_pointwise(ckpts[0], data)
        elif len(ckpts) > 1:
            from kdray.evaluate import evaluate_ensemble

            metrics = evaluate_ensemble(ckpts, data, weights, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        else:
            metrics = evaluate_checkpoint(ckpts[0], data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        if args.output:
            import json
            import shlex

            from kdray.evaluate import ensemble_record, evaluation_record

            command = shlex.join(["kdray", *argv])
            record = (ensemble_record(ckpts, data, metrics, command, weights) if len(ckpts) > 1
                      else evaluation_record(ckpts[0], data, metrics, command))
            try:
                atomic_write_text(Path(args.output), json.dumps(record, indent=2) + "\n")
            except OSError as e:
                raise KdrayError(f"--output {args.output}: cannot write it ({e.strerror or e})") from None
            print(f"written to {args.output}")
        return 0
    if args.command == "serve":
        from kdray.console import ray_loggers_to_file
        from kdray.serve.app import check_checkpoint, serve_checkpoint
        from kdray.serve.ingress import ingress_env

        ckpt = check_checkpoint(_serve_checkpoint_dir(args.checkpoint, cfg.run_dir))  # before Ray starts
        if not args.verbose:
            log = cfg.run_dir / "logs" / "serve.log"
            ray_loggers_to_file(log)
            print(f"kdray: Ray's log lines go to {log} (--verbose shows them here)", flush=True)
        ingress_env(cfg.serve)  # a missing HAProxy binary too, before Ray starts
        init_ray(args.address, log_to_driver=args.verbose)
        if not args.verbose:
            ray_loggers_to_file(cfg.run_dir / "logs" / "serve.log")  # ray.init may have added its console handler
        serve_checkpoint(ckpt, cfg.serve, blocking=args.blocking)
        return 0

    if args.command == "tune":
        from kdray.tune.search import run_search
        from kdray.tune.space import resolve_space, validate_space

        validate_space(cfg, resolve_space(cfg))  # a bad space is refused before anything is written
        return _on_ray(args, cfg.run_dir, lambda console: run_search(cfg, resume=args.resume, log=console.log))
    if args.command == "study":
        import shlex

        from kdray.tune.study import run_study, study_config, study_spaces

        study_cfg = study_config(cfg)
        study_spaces(study_cfg)  # bad study settings are refused before anything is written
        return _on_ray(args, study_cfg.run_dir, lambda console: run_study(
            cfg, resume=args.resume, log=console.log, command=shlex.join(["kdray", *argv])))
    teachers = [_require_dir(t, "teacher checkpoint") for t in getattr(args, "teacher", None) or []]
    return _on_ray(args, cfg.run_dir, lambda console: _train(args, cfg, teachers, console))


def _on_ray(args: argparse.Namespace, run_dir: Path, work: Callable[[Any], object]) -> int:
    """Runs ``work(console)`` on Ray with kdray's own lines on the console and everything Ray prints in
    RUN/logs/ray.log, unless ``--verbose`` (kdray.console). Shuts down a Ray it started."""
    import ray

    from kdray.console import Console, ray_output_to

    console = Console(verbose=args.verbose)
    ray_log = None if args.verbose else RunLayout(run_dir).ray_log
    if ray_log is not None:
        console.log(f"[ray] Ray's own logs: {ray_log} (--verbose shows them here)")
    started = not ray.is_initialized()
    try:
        with ray_output_to(ray_log):
            try:
                init_ray(args.address)
                work(console)
            finally:
                if started and ray.is_initialized():  # while Ray's last lines still go to the log
                    ray.shutdown()
    finally:
        console.close()
    return 0


def _train(args: argparse.Namespace, cfg: Config, teachers: list[Path], console: Any) -> None:
    """``run``, ``teacher`` and ``distill``."""
    from kdray.pipeline import prepare_data, run_pipeline, train_stage, train_teachers, write_resolved_config

    if args.command == "run":
        run_pipeline(cfg, log=console.log, on_epoch=console.epoch)
    elif args.command == "teacher":
        write_resolved_config(cfg)
        for path in train_teachers(cfg, prepare_data(cfg), console.log, console.epoch):
            console.log(f"teacher checkpoint: {path}")
    elif args.command == "distill":
        write_resolved_config(cfg)
        out = Path(args.out) if args.out else RunLayout(cfg.run_dir).student
        path = train_stage(cfg, "student", prepare_data(cfg), out, teachers, console.log, console.epoch)
        console.log(f"student checkpoint: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except KdrayError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
