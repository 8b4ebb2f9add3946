"""Fault tolerance of training and tuning: faults injected from outside, and what each one costs.

* a Ray Train worker SIGKILLed mid-epoch: the worker group restarts and resumes from the last epoch's checkpoint; the
  model is bit-identical to an uninterrupted run's;
* the driver (``kdray teacher``) SIGKILLed after its first checkpoint: the same command resumes the run;
* a driver killed after training finished but before the export: the rerun trains no further epoch, even after an
  early stop;
* a Tune trial whose loss becomes non-finite: recorded as an error with its reason, and the search goes on;
* a process killed while it writes a kdray checkpoint: the previous checkpoint stays the one that loads.

The kill tests train a NeuMF teacher with dropout and sampled negatives (every random stream the loop has) for three
epochs of about two seconds each, on one worker with one thread: on CPU the run is deterministic, so "nothing lost"
is checked as equality with an uninterrupted run (the ``reference`` fixture), weights included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.pipeline import prepare_data
from kdray.train.driver import train_model

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
SLOW = [
    "data.n_users=5000", "data.n_items=800", "data.n_interactions=50000", "data.n_clusters=4",
    "teacher.name=neumf", "teacher.dim=16", "teacher.hidden=[32,16]", "teacher.dropout=0.2",
    "teacher_train.hard_loss=sampled_softmax", "teacher_train.n_negatives=256", "teacher_train.batch_size=16",
    "teacher_train.lr=0.03", f"teacher_train.epochs={EPOCHS}", "eval.batch_size=512", "distill.n_teachers=1",
    "teacher_search.enabled=false",  # the faults are injected into one teacher's training, not a search
]
# what has to match an uninterrupted run, epoch by epoch
COMPARED = ("epoch", "loss", "ndcg@10", "recall@10", "best")


def _slow(runs_dir: Path, *extra: str):
    return load_config(None, [*SLOW, f"runs_dir={runs_dir}", *extra])


def _curve(history: list[dict]) -> list[tuple]:
    return [tuple(h[k] for k in COMPARED) for h in history]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "model.pt", weights_only=True)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _registered_epoch(run: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered for the run in ``run`` (0: none yet): the one a
    restarted worker group, or a new driver, resumes from."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


def _wait_for_epoch(run: Path, epoch: int, alive, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _registered_epoch(run) < epoch:
        assert alive(), f"the training ended before epoch {epoch} was checkpointed"
        assert time.monotonic() < deadline, f"epoch {epoch} was not checkpointed in {timeout} s"
        time.sleep(0.05)


def _alive_actors(class_name: str, job_id: str | None = None) -> list[dict]:
    """Live actors of a class, from the GCS actor table (the state API needs the dashboard, which the test cluster
    runs without)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] == "ALIVE"
            and (job_id is None or a["JobID"] == job_id)]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """The uninterrupted run every fault is compared with."""
    cfg = _slow(tmp_path_factory.mktemp("faults"))
    data = prepare_data(cfg)
    outcome = train_model(cfg, "teacher", data, out_dir=cfg.run_dir / "reference", name="reference")
    assert outcome.metrics["resumed_after"] == [] and len(outcome.history) == EPOCHS
    return cfg, data, outcome


# ----------------------------------------------------------------------------------------------------------------
# A worker killed mid-epoch.


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_epoch_restarts_and_loses_only_that_epoch(reference, ray_cluster):
    cfg, data, expected = reference
    name = "worker-kill"
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["value"] = train_model(cfg, "teacher", data, out_dir=cfg.run_dir / name, name=name)
        except BaseException as e:  # re-raised in the test's thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        _wait_for_epoch(cfg.run_dir / "ray" / name, 1, thread.is_alive)
        time.sleep(0.5)  # into epoch 2 (about 2 s): no checkpoint of it exists yet
        workers = _alive_actors("RayTrainWorker", ray_cluster.get_runtime_context().get_job_id())
        assert len(workers) == 1
        assert _registered_epoch(cfg.run_dir / "ray" / name) == 1, "epoch 2 ended before the kill: slow it down"
        os.kill(workers[0]["Pid"], signal.SIGKILL)  # from outside, as the OOM killer or a lost node would
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive(), "the training did not finish after the worker was killed"
    if "error" in outcome:
        raise outcome["error"]
    got = outcome["value"]
    # the worker group restarted from epoch 1's checkpoint: the partial epoch 2 was trained again, nothing else
    assert got.metrics["resumed_after"] == [1]
    assert [h["epoch"] for h in got.history] == list(range(1, EPOCHS + 1))
    assert _alive_actors("RayTrainWorker", ray_cluster.get_runtime_context().get_job_id()) == []
    # and it ends exactly where the uninterrupted run ended
    assert _curve(got.history) == _curve(expected.history)
    assert {k: v for k, v in got.metrics.items() if k.startswith("valid_")} == \
        {k: v for k, v in expected.metrics.items() if k.startswith("valid_")}
    assert _same_weights(_weights(got.checkpoint), _weights(expected.checkpoint))


# ----------------------------------------------------------------------------------------------------------------
# The driver killed: the same command again.


def _teacher_cli(runs: Path, address: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "kdray.cli", "teacher", "--address", address, *SLOW,
                                 f"runs_dir={runs}", "name=driver"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_resumes_when_the_same_command_runs_again(reference, ray_cluster, tmp_path):
    _, _, expected = reference
    address = ray_cluster.get_runtime_context().gcs_address
    from ray._private import state
    from ray.util import placement_group_table

    def held_placement_groups() -> set[str]:
        return {k for k, pg in placement_group_table().items() if pg["state"] != "REMOVED"}

    held_before = held_placement_groups()  # by earlier tests of the session, if any
    ray_root = tmp_path / "driver" / "ray"
    first = _teacher_cli(tmp_path, address, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while not list(ray_root.glob("teacher-*")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the teacher's Ray Train run did not start in 240 s"
            time.sleep(0.1)
        run = next(ray_root.glob("teacher-*"))  # teacher-{stage key}: the name a rerun finds again
        _wait_for_epoch(run, 1, lambda: first.poll() is None)
        os.kill(first.pid, signal.SIGKILL)  # the driver only: its job's actors are Ray's to clean up
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
    killed_at = _registered_epoch(run)
    assert 1 <= killed_at < EPOCHS and not (tmp_path / "driver" / "teacher").exists()
    job = next(j["JobID"] for j in state.jobs() if j.get("DriverPid") == first.pid)
    try:
        # Ray ends a dead driver's job: its controller and workers go, so nothing holds the CPUs the rerun needs
        deadline = time.monotonic() + 60
        while _alive_actors("TrainController", job) or _alive_actors("RayTrainWorker", job):
            assert time.monotonic() < deadline, "the killed driver's Train actors are still alive after 60 s"
            time.sleep(0.2)

        second = _teacher_cli(tmp_path, address, tmp_path / "second.log")
        try:
            assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
        finally:
            if second.poll() is None:
                os.kill(second.pid, signal.SIGKILL)
        assert held_placement_groups() <= held_before  # neither run left its workers' CPUs reserved
    finally:
        # Ray Train's detached PlacementGroupCleaner of the killed run asks the state API whether the controller
        # died; that API needs the dashboard, which this cluster runs without, so it never learns and never exits.
        # It holds no resources (the job's placement group went with the job); end it so the session does not carry
        # it. (On a cluster with the dashboard it removes itself.)
        for cleaner in _alive_actors("PlacementGroupCleaner", job):
            os.kill(cleaner["Pid"], signal.SIGKILL)
    rerun = (tmp_path / "second.log").read_text()
    assert "teacher checkpoint:" in rerun and f"epoch {killed_at}/{EPOCHS} " not in rerun  # not trained again
    ckpt = load_checkpoint(tmp_path / "driver" / "teacher")
    # it went on from the checkpoint the killed driver left (only the unfinished epoch was trained again)
    assert ckpt.metrics["resumed_after"] == [killed_at]
    assert [h["epoch"] for h in ckpt.metrics["history"]] == list(range(1, EPOCHS + 1))
    assert _curve(ckpt.metrics["history"]) == _curve(expected.history)
    assert ckpt.metrics["valid_ndcg@10"] == expected.metrics["valid_ndcg@10"]
    assert _same_weights(_weights(tmp_path / "driver" / "teacher"), _weights(expected.checkpoint))


# ----------------------------------------------------------------------------------------------------------------
# A driver killed after the training finished, before the export: the rerun trains nothing.

TINY = [
    "data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4",
    "teacher.name=mf", "teacher.dim=32", "teacher.hidden=[]", "student.dim=4", "teacher_train.batch_size=32",
    "student_train.batch_size=32", "student_train.lr=0.02", "student_train.epochs=2", "eval.batch_size=64",
    "distill.n_teachers=1", "teacher_search.enabled=false",
]


@pytest.mark.ray
@pytest.mark.slow
def test_rerunning_a_finished_early_stopped_run_trains_no_further_epoch(ray_cluster, tmp_path):
    # on this data a high learning rate stops early (patience 1) at epoch 2 of 10
    cfg = load_config(None, [*TINY, "teacher_train.lr=0.3", "teacher_train.epochs=10", "teacher_train.patience=1",
                             f"runs_dir={tmp_path}"])
    data = prepare_data(cfg)
    first = train_model(cfg, "teacher", data, out_dir=tmp_path / "first", name="early-stop")
    assert len(first.history) < cfg.teacher_train.epochs  # it did stop early
    def checkpoints() -> list[str]:
        return sorted(p.name for p in (cfg.run_dir / "ray" / "early-stop").glob("checkpoint_*") if p.is_dir())

    before = checkpoints()
    # the export is lost (a driver killed between fit and export): the same run name again
    again = train_model(cfg, "teacher", data, out_dir=tmp_path / "again", name="early-stop")
    assert checkpoints() == before  # no epoch trained, so no checkpoint written
    assert _curve(again.history) == _curve(first.history)
    assert again.metrics["best_epoch"] == first.metrics["best_epoch"]
    assert _same_weights(_weights(again.checkpoint), _weights(first.checkpoint))


# ----------------------------------------------------------------------------------------------------------------
# A Tune trial whose loss becomes non-finite.


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(ray_cluster, tmp_path):
    from kdray.tune.report import choose_winner, leaderboard_rows, write_leaderboard
    from kdray.tune.search import run_arm
    from kdray.tune.space import resolve_space, validate_space

    space = {"student_train.lr": {"grid": [1e30, 0.02]}}  # the diverging trial runs first
    cfg = load_config(None, [*TINY, f"runs_dir={tmp_path}", "name=search", "tune.num_samples=1",
                             "tune.max_concurrent_trials=1", "tune.max_params_ratio=1.0",
                             f"tune.space={json.dumps({**{k: None for k in resolve_space(load_config(None))}, **space})}"])
    space = resolve_space(cfg)
    validate_space(cfg, space)
    data = prepare_data(cfg)
    grid = run_arm(cfg, "alone", space, data.path, [], resume=False, log=lambda line: None)
    rows = {r["student_train.lr"]: r for r in leaderboard_rows(grid, "alone", cfg, data, 10_000, {}, [])}
    failed, good = rows[1e30], rows[0.02]
    assert failed["status"] == "error" and not failed["checkpoint"]
    assert "non-finite" in failed["error"] and "lower student_train.lr" in failed["error"]
    assert np.isnan(failed["valid_ndcg@10"])  # no score at all, not a real-looking one
    assert good["status"] == "completed" and good["epochs"] == cfg.student_train.epochs
    assert choose_winner(list(rows.values()), "ndcg@10", 1.0)["trial"] == good["trial"]
    write_leaderboard(list(rows.values()), tmp_path / "board", "ndcg@10")
    assert "non-finite" in (tmp_path / "board" / "leaderboard.md").read_text()
    # the diverged model's weights were never written anywhere
    trial_runs = Path(cfg.run_dir / "tune" / "ray" / "search-alone-trials" / failed["trial"])
    assert trial_runs.is_dir() and not list(trial_runs.rglob("model.pt"))


# ----------------------------------------------------------------------------------------------------------------
# A process killed while it writes a kdray checkpoint.

_CRASHING_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from kdray.checkpoint import Vocab, save_checkpoint
    from kdray.models import build_model
    from kdray.sparse import Csr

    def crash(*args, **kwargs):  # the weights are on disk by now, the vocabulary never will be
        os._exit(9)

    np.savez = crash
    seen = Csr.from_pairs(np.array([0]), np.array([1]), 5, 7)
    vocab = Vocab(user_ids=np.array([f"u{i}" for i in range(5)]), item_ids=np.array([f"i{i}" for i in range(7)]),
                  seen=seen)
    save_checkpoint(sys.argv[1], build_model("mf", n_users=5, n_items=7, dim=3), role="teacher",
                    config={"name": "new"}, vocab=vocab)
""")


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-one", "first-write"])
def test_a_crash_mid_write_never_leaves_a_checkpoint_that_loads(tmp_path, existing):
    from kdray.checkpoint import Vocab, save_checkpoint
    from kdray.models import build_model
    from kdray.sparse import Csr

    target = tmp_path / "ckpt"
    if existing:
        vocab = Vocab(user_ids=np.array([f"u{i}" for i in range(5)]),
                      item_ids=np.array([f"i{i}" for i in range(7)]),
                      seen=Csr.from_pairs(np.array([0]), np.array([1]), 5, 7))
        save_checkpoint(target, build_model("mf", n_users=5, n_items=7, dim=4), role="teacher",
                        config={"name": "old"}, vocab=vocab)
    done = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(target)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    half = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert len(half) == 1 and (half[0] / "model.pt").is_file()  # it did die mid-write
    if existing:
        ckpt = load_checkpoint(target)
        assert ckpt.config == {"name": "old"} and ckpt.args["dim"] == 4
    else:
        assert not target.exists()
        from kdray.errors import CheckpointError

        with pytest.raises(CheckpointError, match="does not exist"):
            load_checkpoint(target)
