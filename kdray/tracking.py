"""TensorBoard event files for every model a run trains, written by the driver as each epoch's record arrives
(kdray.train.progress), so ``tensorboard --logdir RUN/tensorboard`` follows a run live.

Written with tensorboardX, which Ray Train and Tune already install (they use it for their own TensorBoard
logging); viewing needs the ``tensorboard`` package (``pip install tensorboard``). Tune searches get event files
from Ray Tune itself, one folder per trial under ``RUN/tune/ray``, and go to MLflow through Ray's own
``MLflowLoggerCallback`` when mlflow is installed (an optional dependency: ``pip install mlflow``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import TracebackType

from kdray.train.progress import Event


def tag(name: str) -> str:
    """A reported metric's TensorBoard tag, grouped as the dashboard shows them: ``valid/ndcg_at_10``,
    ``train/loss``, ``time/epoch_seconds`` (TensorBoard tags cannot hold ``@``)."""
    if "@" in name or name in ("best", "n_users_evaluated"):
        return f"valid/{name.replace('@', '_at_')}"
    if name.endswith("_seconds"):
        return f"time/{name}"
    return f"train/{name}"


class TensorBoardLog:
    """One model's event file: every numeric metric of each epoch event, at step = epoch."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        # tensorboardX writes from its own thread and flushes every flush_secs: a second keeps the board live
        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=1)

    def epoch(self, event: Event) -> None:
        if "epoch" not in event:
            return
        for name, value in event["metrics"].items():
            if name != "epoch":
                self._writer.add_scalar(tag(name), value, global_step=event["epoch"])

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._writer.close()


def mlflow_callbacks(experiment: str) -> list:
    """Ray Tune's ``MLflowLoggerCallback`` logging every trial to the MLflow experiment ``experiment`` when mlflow is
    installed, else nothing. The tracking server comes from MLflow's own setting (``MLFLOW_TRACKING_URI``; without
    it, ``./mlruns``)."""
    if importlib.util.find_spec("mlflow") is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(experiment_name=experiment)]
