"""Shared fixtures. Tests that need Ray use the one session-scoped local cluster below (ray.init takes ~6 s)."""

from __future__ import annotations

import os

import pytest

# Ray writes to ~/ray_results and reports usage stats by default; keep test runs self-contained.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session: 2 CPUs, a small object store, no dashboard."""
    import ray

    from kdray.cli import init_ray

    init_ray("local", num_cpus=2, object_store_memory=512 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()
