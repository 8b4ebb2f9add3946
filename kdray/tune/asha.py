"""Clean early stopping under ASHA on Train V2: the scheduler's decisions go to a small named actor, and the trial's
Train controller raises :class:`TrialStopped` at its next report, so the worker group shuts down the normal way
instead of being killed with its placement group still held."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.train import UserCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from kdray.errors import KdrayError


def grace_period(cfg: Any, epochs: int) -> int:
    """ASHA's grace period for trials of ``epochs`` epochs: ``tune.grace_period``, or half the epochs when it is 0
    (the default), never more than the epochs."""
    return min(cfg.tune.grace_period or max(1, epochs // 2), epochs)


class TrialStopped(KdrayError):
    """Raised in a trial's Train controller when ASHA asked the trial to stop; the trial ends without an export."""


# ----------------------------------------------------------------------------------------------------------------
# The search space: resolved and validated before anything starts.


@ray.remote(num_cpus=0)
class Decisions:
    """ASHA's decisions for one arm's trials (a small actor named after the experiment): the last epoch decided per
    trial, and which trials must stop."""

    def __init__(self) -> None:
        self._decided: dict[str, int] = {}
        self._stop: set[str] = set()
        self._changed = asyncio.Condition()

    async def record(self, trial_id: str, epoch: int, stop: bool) -> None:
        async with self._changed:
            self._decided[trial_id] = max(epoch, self._decided.get(trial_id, 0))
            if stop:
                self._stop.add(trial_id)
            self._changed.notify_all()

    async def must_stop(self, trial_id: str, decided_epoch: int, timeout_s: float) -> bool:
        """Waits (at most ``timeout_s``) until ASHA has decided on ``decided_epoch``; then whether to stop."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self._decided.get(trial_id, 0) >= decided_epoch or trial_id in self._stop), timeout_s)
            except asyncio.TimeoutError:
                pass  # the driver is slow or gone: keep training rather than hang
            return trial_id in self._stop


class GracefulASHA(ASHAScheduler):
    """ASHA whose STOP decisions end a trial through its own Train controller (see the module docstring): the
    trial is told to continue, the decision goes to the named ``Decisions`` actor, and the trial's
    :class:`StopWhenAsked` callback ends the run at its next report. The stopped trial reports nothing more."""

    def __init__(self, decisions: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._decisions = decisions  # the actor's name: a handle would not survive Tune's pickling of the scheduler
        self._asked: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.trial_id in self._asked:
            return TrialScheduler.CONTINUE  # already stopping; its late results must not fill ASHA's rungs
        decision = super().on_trial_result(tune_controller, trial, result)
        stop = decision == TrialScheduler.STOP
        if stop:
            self._asked.add(trial.trial_id)
        if "epoch" in result:
            ray.get_actor(self._decisions).record.remote(trial.trial_id, int(result["epoch"]), stop)
        return TrialScheduler.CONTINUE if stop else decision


class StopWhenAsked(UserCallback):
    """Runs in a trial's Train controller, before ``TuneReportCallback``. Before a report goes to Tune it waits
    until ASHA has decided on the previous one (so a stopped trial never reports again, however slow the driver),
    and raises :class:`TrialStopped` if ASHA said stop. The controller then shuts its worker group down normally
    (placement group included), and ``train_model`` re-raises the error for :func:`_trial`."""

    def __init__(self, decisions: str, trial_id: str, timeout_s: float = 60.0) -> None:
        self.decisions, self.trial_id, self.timeout_s = decisions, trial_id, timeout_s
        self._forwarded: int | None = None  # the epoch of this controller's previous report

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            decisions = ray.get_actor(self.decisions)
        except ValueError:
            return  # no search running this arm any more: nobody can decide
        previous, self._forwarded = self._forwarded, metrics[0].get("epoch", self._forwarded)
        if ray.get(decisions.must_stop.remote(self.trial_id, previous or 0, self.timeout_s)):
            for name in _CONTROLLER_LOGGERS:  # this controller would log the stop twice, as an error with traceback
                logging.getLogger(name).addFilter(_not_a_stop)
            raise TrialStopped(f"trial {self.trial_id} stopped early by ASHA")


_CONTROLLER_LOGGERS = ("ray.train.v2._internal.execution.controller.controller",
                       "ray.train.v2._internal.execution.failure_handling.default")


def _not_a_stop(record: logging.LogRecord) -> bool:
    """A log filter: False for records about a TrialStopped (raw, or wrapped in Train's ControllerError)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(getattr(error, "controller_failure", error), TrialStopped)


# ----------------------------------------------------------------------------------------------------------------
# The trial function.
