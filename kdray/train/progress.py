"""Each epoch's record, from the rank-0 Ray Train worker to the driver while ``fit`` runs.

The worker's own ``print`` reaches the driver only through Ray's log stream, which also carries every line Ray Train,
Ray Data and Ray's helper actors write; kdray sends that stream to a log file (kdray.console). The epoch records
travel here instead, as data, through a :class:`ray.util.queue.Queue` (one small actor that reserves no CPU): the
driver shows them (a line or a progress bar) and writes them to TensorBoard as they arrive.

An event is a dict: ``{"text": ...}`` for a note (resuming; early stop, which also carries ``final: True``), plus
``epoch``, ``epochs`` and ``metrics`` (the numbers reported to Ray Train for that epoch) for an epoch.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

Event = dict[str, Any]


class EpochFeed:
    """Driver side: a queue the worker writes to and a thread that hands each event to ``on_event``.

    Use as a context manager around ``fit``; on exit the events still queued are handed over before it returns."""

    def __init__(self, on_event: Callable[[Event], None], poll_s: float = 0.25):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._on_event = on_event
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="kdray-epoch-feed", daemon=True)

    def __enter__(self) -> "EpochFeed":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from ray.util.queue import Empty

        self._stop.set()
        self._thread.join()
        while True:
            try:
                self._on_event(self.queue.get_nowait())
            except Empty:
                break
        self.queue.shutdown()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=self._poll_s)
            except Empty:
                continue
            self._on_event(event)


def send(queue: Any, event: Event) -> None:
    """Worker side: puts ``event`` on the driver's queue (``None``: nobody listens, as in a Tune trial). The feed is
    for people watching; a driver that went away must not stop the training, so a failed put is only printed."""
    if queue is None:
        return
    import ray.exceptions

    try:
        queue.put_nowait(event)
    except ray.exceptions.RayError as e:
        print(f"kdray: could not send the epoch record to the driver ({type(e).__name__})", flush=True)
