"""Timing two ways of doing one thing in one process, alternating them, so that changes in the machine's load fall
on both alike (these machines are shared: only ratios measured side by side mean anything)."""

from __future__ import annotations

from typing import Callable


def alternate(ways: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each way. A way runs once per call and returns its own seconds (so it can leave set-up out
    of the timing). ``warmup`` untimed rounds first, then ``repeats`` timed rounds, the order reversed every other
    round."""
    names = list(ways)
    for _ in range(warmup):
        for name in names:
            ways[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(ways[name]())
    return times
