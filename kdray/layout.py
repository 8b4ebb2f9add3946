"""Where a run keeps its files, and the one way kdray replaces a file or folder without a reader ever seeing half of
it.

A run lives in one deterministic directory, ``RUNS_DIR/NAME`` (no timestamps, so the same command resumes)::

    config.yaml            the resolved config
    data/                  the prepared Parquet (kdray.data.prepare)
    teacher/ teacher-2/ ...  exported teacher checkpoints (an ensemble has several)
    student/               the distilled student
    student_alone/         the same student trained without distillation (the control)
    ray/                   Ray Train's own run state (resumable)
    tune/                  a search: search.json, ray/ (Tune state), trials/ARM/TRIAL/ (exported students)
    best/                  the search's winner
    versions/N/            incremental refreshes (kdray update): data/, student/, update.json
    metrics.json, report.md
    learning_curves.png    validation metric per epoch of every model of the run
    logs/ray.log           what Ray printed (the console shows kdray's lines only)
    tensorboard/STAGE/     TensorBoard event files, one folder per trained model
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def teacher(self, index: int = 0) -> Path:
        """The ``index``-th teacher of an ensemble (0 is the only one of a single-teacher run)."""
        return self.root / ("teacher" if index == 0 else f"teacher-{index + 1}")

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def student_alone(self) -> Path:
        return self.root / "student_alone"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def learning_curves(self) -> Path:
        return self.root / "learning_curves.png"

    @property
    def ray_log(self) -> Path:
        return self.root / "logs" / "ray.log"

    def tensorboard(self, stage: str) -> Path:
        """The event files of one trained model (``stage`` is its checkpoint folder's name: teacher, student...)."""
        return self.root / "tensorboard" / stage

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def tune_ray(self) -> Path:
        return self.tune / "ray"

    @property
    def search_record(self) -> Path:
        return self.tune / "search.json"

    def tune_trials(self, arm: str) -> Path:
        return self.tune / "trials" / arm

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def versions(self) -> Path:
        """Incremental refreshes (``kdray update``): ``versions/N/`` holds data/, student/ and update.json of
        version N (N >= 2; version 1 is the run's own data/ and student/)."""
        return self.root / "versions"

    def version(self, n: int) -> Path:
        return self.versions / str(n)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_replace_dir(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Builds a folder with ``fill(tmp)`` in a temporary sibling, then swaps it in place of ``directory``.

    A crash while filling leaves ``directory`` as it was; between the two renames of the swap the old copy sits
    beside it as ``.NAME.old-PID``. A folder another process published first, while this one was filling, is
    replaced too: the last writer wins.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
