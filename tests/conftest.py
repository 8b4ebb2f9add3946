"""Shared fixtures. Tests that need Ray use the one session-scoped local cluster below (ray.init takes ~6 s): one
cluster per test process (pyproject.toml runs two, pytest-xdist's ``-n 2``)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

# Ray writes to ~/ray_results and reports usage stats by default; keep test runs self-contained.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_configure(config):
    """Before the test processes start: make sure Ray's authentication token exists.

    Ray 2.60 turns token authentication on for a new local cluster and, when ``~/.ray/auth_token`` is missing, writes a
    fresh token there. Two test processes starting their clusters at the same moment on a machine that never ran Ray
    could each write one, and the cluster whose token was overwritten would refuse its own later processes. So the
    first process (xdist's controller, or the only one) writes it once, exclusively, as Ray would (64 hex digits).
    """
    if hasattr(config, "workerinput") or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    token = Path.home() / ".ray" / "auth_token"
    token.parent.mkdir(parents=True, exist_ok=True)
    try:
        with token.open("x") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        pass


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session of this test process: 2 CPUs, a small object store, no
    dashboard."""
    import ray

    from kdray.cli import init_ray

    init_ray("local", num_cpus=2, object_store_memory=512 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()
