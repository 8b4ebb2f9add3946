"""What ``kdray run`` (and ``teacher``, ``distill``, ``tune``, ``study``) shows on the console, and where Ray's own
output goes (``kdray serve``, which runs until interrupted, moves Ray's loggers instead: :func:`ray_loggers_to_file`).

The console gets kdray's lines only: each stage as it starts, one line per epoch (on a terminal, one tqdm progress
bar per stage instead), and the final table. Everything else this process prints while Ray runs goes to
``RUN/logs/ray.log``: Ray's Python loggers (``ray``, ``ray.data``: "Started a local Ray instance", Ray Data's
progress), and the output of every Ray worker and actor that Ray streams to the driver (``log_to_driver``): Ray
Train's "Reporting training result" and "Checkpoint successfully created" lines, the worker's own epoch lines, and
tracebacks from Ray's helper actors, such as Ray Train's PlacementGroupCleaner when the dashboard is off. The
redirection is at the file-descriptor level, so native (C++) log lines go to the file too. ``--verbose`` leaves
everything on the console, as plain Ray does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from tqdm import tqdm

from kdray.train.progress import Event


class Console:
    """kdray's own output: ``log`` for stage lines and tables, ``epoch`` for the events of kdray.train.progress.

    ``out`` is where the user looks (default: this process's stdout as it is now, before any redirection).
    ``bar``: one tqdm bar per stage instead of a line per epoch (default: when ``out`` is a terminal).
    ``verbose``: Ray's stream already shows the worker's epoch lines, so ``epoch`` shows nothing."""

    def __init__(self, out: IO[str] | None = None, *, bar: bool | None = None, verbose: bool = False):
        self._owned = out is None
        self.out = out if out is not None else _current_stdout()
        self.bar = self.out.isatty() if bar is None else bar
        self.verbose = verbose
        self._bars: dict[str, tqdm] = {}

    def log(self, text: str) -> None:
        self._close_bars()
        print(text, file=self.out, flush=True)

    def epoch(self, stage: str, event: Event) -> None:
        if self.verbose:
            return
        if not self.bar:
            print(f"[{stage}] {event['text']}", file=self.out, flush=True)
            return
        if "epoch" not in event:  # a note: resuming, early stop
            tqdm.write(f"[{stage}] {event['text']}", file=self.out)
            if stage in self._bars and event.get("final"):
                self._bars.pop(stage).close()
            return
        if stage not in self._bars:
            self._bars[stage] = tqdm(total=event["epochs"], initial=event["epoch"] - 1, desc=f"[{stage}]",
                                     unit="epoch", file=self.out, dynamic_ncols=True)
        bar = self._bars[stage]
        bar.set_postfix_str(_postfix(event["metrics"]), refresh=False)
        bar.update(1)
        if event["epoch"] >= event["epochs"]:
            self._bars.pop(stage).close()

    def _close_bars(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def close(self) -> None:
        self._close_bars()
        if self._owned and self.out is not sys.stdout:
            self.out.close()
        else:
            self.out.flush()


def _current_stdout() -> IO[str]:
    """Where stdout points now, unaffected by a later :func:`ray_output_to`: a duplicate of its file descriptor, or
    the stream object itself when it has none (an in-memory capture)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")


def _postfix(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if k == "loss" or "@" in k}
    return " ".join(f"{k} {v:.4f}" for k, v in shown.items())


@contextlib.contextmanager
def ray_output_to(log_file: Path | None) -> Iterator[None]:
    """While the block runs, sends this process's stdout and stderr (file descriptors 1 and 2, so Python, Ray's
    log stream and native code alike) to ``log_file``, appended under a dated header; ``None`` changes nothing
    (``--verbose``). A :class:`Console` made before the block keeps writing to the real console.

    Ray Data's progress bars are turned off in the block: in a file they are only noise, and Ray Data logs its
    progress there anyway."""
    if log_file is None:
        yield
        return
    from ray.data import DataContext

    log_file.parent.mkdir(parents=True, exist_ok=True)
    ctx = DataContext.get_current()
    progress_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log_file.open("a", buffering=1) as f:
        f.write(f"===== kdray {' '.join(sys.argv[1:])} ({datetime.datetime.now().isoformat(timespec='seconds')})\n")
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            # and sys.stdout / sys.stderr themselves, for when they are not backed by descriptors 1 and 2
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            ctx.enable_progress_bars = progress_bars


def ray_loggers_to_file(path: Path) -> None:
    """Ray's driver-side log lines (start-up, Serve's controller messages) go to ``path`` instead of the console,
    which keeps only kdray's own lines: ``kdray serve``'s way. It runs until interrupted and prints its own lines
    with ``print``, so it moves Ray's Python loggers rather than the process's output (:func:`ray_output_to`)."""
    import logging

    import ray.serve  # noqa: F401  (configures Serve's driver logger, which is replaced here)

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.serve"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
