"""The ``kdray`` command.

    kdray run      [--config FILE] [key=value ...]   the whole pipeline: data, teacher(s), student, control, report
    kdray data     [--config FILE] [key=value ...]   prepare the data only
    kdray teacher  [--config FILE] [key=value ...]   train the teacher(s)
    kdray distill  --teacher CKPT [--teacher CKPT ...] [--config FILE] [key=value ...]
    kdray eval     --checkpoint CKPT [--config FILE] [key=value ...]
    kdray tune     [--config FILE] [--resume] [key=value ...]
    kdray serve    --checkpoint CKPT [--config FILE] [key=value ...]
    kdray update   --run RUN --interactions NEW.parquet [--checkpoint CKPT] [--epochs N] [--rollout] [key=value ...]

Every command takes ``--address`` (or ``RAY_ADDRESS``) to run on an existing Ray cluster; without it a local cluster
is started. User mistakes (bad config, missing files, mismatched checkpoints) print one line naming the problem and
exit with status 2, before any Ray worker starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from kdray.errors import KdrayError
from kdray.layout import RunLayout


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="YAML config (defaults: the built-in synthetic data set)")
    common.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a new local cluster)")
    common.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. student.dim=32")

    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation for recommenders on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="the whole pipeline and its report")
    sub.add_parser("data", parents=[common], help="prepare the data (Parquet under the run directory)")
    sub.add_parser("teacher", parents=[common], help="train the teacher (or the ensemble of teachers)")
    p = sub.add_parser("distill", parents=[common], help="distil a student from teacher checkpoints")
    p.add_argument("--teacher", action="append", required=True, help="teacher checkpoint directory (repeatable)")
    p.add_argument("--out", help="where to export the student (default RUN/student)")
    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint on the test split")
    p.add_argument("--checkpoint", required=True)
    p = sub.add_parser("tune", parents=[common], help="Ray Tune search over distillation settings")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p = sub.add_parser("serve", parents=[common], help="serve a checkpoint behind an HTTP endpoint (Ray Serve)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--blocking", action=argparse.BooleanOptionalAction, default=True,
                   help="keep serving until interrupted (default)")
    p = sub.add_parser("update", parents=[common],
                       help="fold new interactions into a run's student: a short warm-started training, a new version")
    p.add_argument("--run", required=True, help="the run directory (its config.yaml is the default --config)")
    p.add_argument("--interactions", required=True, help="Parquet or CSV with columns user, item[, timestamp]")
    p.add_argument("--checkpoint", help="the student to start from (default: the run's latest version)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the warm-started training (default 3)")
    p.add_argument("--rollout", action="store_true",
                   help="redeploy the running Serve application with the new version (zero downtime)")
    return parser


# Ray Train V2 workers hand each report to the controller through a queue of one, which the controller drains on its
# health-check tick (2 s by default): with epochs shorter than that, every report would wait up to 2 s
# (BENCHMARKS.md, Ray overhead). Its print patch also echoes every worker print twice.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_TRAIN_V2_ENABLED": "1"}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
             log_to_driver: bool = True) -> None:
    """Connects to ``address`` / $RAY_ADDRESS, or starts a local cluster (``address="local"`` never joins a stale
    cluster left by an earlier ``ray start``). kdray's Ray settings (RAY_ENV) reach every process of the job."""
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
                 include_dashboard=False, log_to_driver=log_to_driver, runtime_env=env)


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise KdrayError(f"{what} {p} does not exist")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        print(f"prepared {data.n_users} users, {data.n_items} items, {data.train.nnz} / {data.valid.nnz} / "
              f"{data.test.nnz} train / valid / test interactions in {data.path}")
        return 0
    if args.command == "eval":
        from kdray.evaluate import evaluate_checkpoint
        from kdray.pipeline import prepare_data

        ckpt = _require_dir(args.checkpoint, "checkpoint directory")
        data = prepare_data(cfg)
        metrics = evaluate_checkpoint(ckpt, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
        for k, v in metrics.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return 0
    if args.command == "serve":
        from kdray.serve.app import serve_checkpoint

        ckpt = _require_dir(args.checkpoint, "checkpoint directory")
        init_ray(args.address)
        serve_checkpoint(ckpt, cfg.serve, blocking=args.blocking)
        return 0

    teachers = [_require_dir(t, "teacher checkpoint") for t in getattr(args, "teacher", None) or []]
    from kdray.pipeline import (
        prepare_data,
        run_pipeline,
        train_stage,
        train_teachers,
        write_resolved_config,
    )

    init_ray(args.address)
    if args.command == "run":
        run_pipeline(cfg)
    elif args.command == "teacher":
        write_resolved_config(cfg)
        for path in train_teachers(cfg, prepare_data(cfg)):
            print(f"teacher checkpoint: {path}")
    elif args.command == "distill":
        write_resolved_config(cfg)
        out = Path(args.out) if args.out else RunLayout(cfg.run_dir).student
        print(f"student checkpoint: {train_stage(cfg, 'student', prepare_data(cfg), out, teachers)}")
    elif args.command == "tune":
        from kdray.tune.search import run_search

        run_search(cfg, resume=args.resume)
    return 0


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
