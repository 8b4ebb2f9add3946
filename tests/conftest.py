"""Shared fixtures. Tests that need Ray use the one session-scoped local cluster below (ray.init takes ~6 s)."""

from __future__ import annotations

import os

import pytest

# Ray writes to ~/ray_results and reports usage stats by default; keep test runs self-contained.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session: 2 CPUs, a small object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=512 << 20,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
