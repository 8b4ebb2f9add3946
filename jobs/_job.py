"""What the job scripts share: connect to the cluster the job runs on, put the run on storage every node can reach,
and turn a user mistake into one line in the job's logs and a FAILED job.

Not an entry point: `python jobs/pipeline.py` puts this directory first on ``sys.path``, which is how the scripts
import it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

RUNS_DIR_ENV = "KDRAY_RUNS_DIR"
# Set by Ray's job supervisor in the environment of every submitted entrypoint.
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", help="YAML config, relative to the submitted working directory")
    p.add_argument("--runs-dir", default=os.environ.get(RUNS_DIR_ENV),
                   help="where the run directory goes; on several nodes a shared filesystem mounted at the same "
                        f"path everywhere (default: ${RUNS_DIR_ENV}, else the config's runs_dir)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                   help="the Ray cluster (default: $RAY_ADDRESS, which `ray job submit` sets, else the cluster "
                        "running on this machine)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. student.dim=32")
    return p


def run_kdray(command: str, args: argparse.Namespace, options: Sequence[str] = ()) -> int:
    """Runs ``kdray COMMAND`` on the cluster; returns its exit status (2 and a one-line message for a user error)."""
    from kdray import cli

    overrides = [f"runs_dir={args.runs_dir}"] if args.runs_dir else []
    overrides += args.overrides
    argv = [command, *(["--config", args.config] if args.config else []), "--address", args.address, *options,
            *overrides]
    print(f"kdray job: kdray {shlex.join(argv)}", flush=True)
    if os.environ.get(IN_RAY_JOB_ENV):
        _warn_about_relative_paths(args.config, overrides)
    return cli.main(argv)


def _warn_about_relative_paths(config: str | None, overrides: list[str]) -> None:
    """Inside a job the working directory is a temporary copy of what was submitted, unpacked on the head: a run
    written under it is hard to find and is garbage-collected with the copy, and a relative data path points into it."""
    from kdray.config import load_config
    from kdray.errors import KdrayError

    try:
        cfg = load_config(config, overrides)
    except KdrayError:
        return  # kdray reports it, with its exit status
    if not Path(cfg.runs_dir).expanduser().is_absolute():
        print(f"kdray job: warning: runs_dir {cfg.runs_dir!r} is relative, so this run is written to "
              f"{cfg.run_dir.resolve()}, inside the job's temporary copy of the working directory; set "
              f"{RUNS_DIR_ENV} (jobs/runtime_env.yaml) or --runs-dir to a path on shared storage", file=sys.stderr)
    path = cfg.data.path
    if path and "://" not in path and not Path(path).expanduser().is_absolute() and not Path(path).exists():
        print(f"kdray job: warning: data.path {path!r} is relative to the job's working directory "
              f"({Path.cwd()}), where it does not exist; pass an absolute path that every node can read (a shared "
              "filesystem), e.g. data.path=/mnt/kdray/data/ml-100k", file=sys.stderr)
