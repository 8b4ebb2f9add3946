"""The job scripts (jobs/*.py) and their runtime environments.

Fast tests call each script's ``main`` with ``kdray.cli.main`` stubbed out (what it would run) or for real up to
the config check (no Ray). The slow tests start a real Ray head on 127.0.0.1 in a subprocess (its own ports, temp
dir and token, so neither the session ``ray_cluster`` fixture nor anybody else's Ray ever joins it), submit the
scripts through the Jobs API exactly as ``ray job submit --working-dir .`` does, and stop the head by its PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"

# A run small enough for a 2-core machine: synthetic data, MF teacher 16-d, student 4-d, two epochs each.
TINY = {
    "name": "tiny",
    "data": {"source": "synthetic", "n_users": 200, "n_items": 100, "n_interactions": 4000, "n_clusters": 4},
    "teacher": {"name": "mf", "dim": 16, "hidden": []},
    "student": {"name": "mf", "dim": 4},
    "teacher_train": {"epochs": 2, "batch_size": 64, "lr": 0.02},
    "student_train": {"epochs": 2, "batch_size": 64, "lr": 0.02},
    "eval": {"batch_size": 64},
    "distill": {"n_teachers": 1},  # the default ensemble of three would triple the job for no extra coverage
    "teacher_search": {"enabled": False},  # the job's plumbing is under test, not the teacher search
    # One trial per arm, the space pinned to one point: the job's plumbing is under test, not the search.
    "tune": {"num_samples": 1, "max_concurrent_trials": 1, "max_params_ratio": 0.5,
             "space": {"distill.temperature": None, "distill.alpha": {"choice": [0.5]},
                       "distill.loss": {"choice": ["rd"]}, "student.dim": {"choice": [4]},
                       "student_train.lr": {"choice": [0.02]}, "student_train.weight_decay": None,
                       "student_train.batch_size": None, "distill.init_from_teacher": None}},
}


def _load_script(name: str, monkeypatch) -> Any:
    """Imports jobs/NAME.py the way `python jobs/NAME.py` sees it: with jobs/ first on sys.path (for _job)."""
    monkeypatch.syspath_prepend(str(JOBS))
    spec = importlib.util.spec_from_file_location(f"kdray_job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def captured(monkeypatch):
    """Stubs kdray.cli.main and records the argv each job script hands it."""
    import kdray.cli

    calls: list[list[str]] = []
    monkeypatch.setattr(kdray.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("KDRAY_RUNS_DIR", raising=False)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# What each script runs (no Ray).


def test_pipeline_runs_kdray_run_on_the_cluster_it_is_submitted_to(captured, monkeypatch):
    pipeline = _load_script("pipeline", monkeypatch)
    assert pipeline.main(["--config", "configs/ml-100k.yaml", "student.dim=8"]) == 0
    # outside a job there is no RAY_ADDRESS: "auto" joins the cluster on this machine, never starts a new one
    assert captured[-1] == ["run", "--config", "configs/ml-100k.yaml", "--address", "auto", "student.dim=8"]

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what the job supervisor sets for the entrypoint
    monkeypatch.setenv("KDRAY_RUNS_DIR", "/mnt/kdray/runs")  # what jobs/runtime_env.yaml sets
    pipeline.main(["--config", "c.yaml", "runs_dir=/elsewhere"])
    # the shared runs dir comes first, so an explicit runs_dir= override still wins
    assert captured[-1] == ["run", "--config", "c.yaml", "--address", "10.0.0.5:6379", "runs_dir=/mnt/kdray/runs",
                            "runs_dir=/elsewhere"]


def test_tune_and_serve_scripts(captured, monkeypatch):
    tune = _load_script("tune", monkeypatch)
    tune.main(["--config", "c.yaml", "--resume", "--runs-dir", "/shared/runs", "tune.num_samples=4"])
    assert captured[-1] == ["tune", "--config", "c.yaml", "--address", "auto", "--resume", "runs_dir=/shared/runs",
                            "tune.num_samples=4"]

    serve = _load_script("serve", monkeypatch)
    serve.main(["--checkpoint", "/shared/runs/x/student", "serve.host=0.0.0.0"])
    # a Serve application outlives the job that deployed it: by default the job returns once it is live
    assert captured[-1] == ["serve", "--address", "auto", "--checkpoint", "/shared/runs/x/student", "--no-blocking",
                            "serve.host=0.0.0.0"]
    serve.main(["--checkpoint", "ck", "--blocking"])
    assert "--blocking" in captured[-1]


def test_overrides_and_options_mix_in_any_order(captured, monkeypatch):
    pipeline = _load_script("pipeline", monkeypatch)
    pipeline.main(["student.dim=8", "--config", "c.yaml", "runs_dir=/r"])
    assert captured[-1] == ["run", "--config", "c.yaml", "--address", "auto", "student.dim=8", "runs_dir=/r"]
    tune = _load_script("tune", monkeypatch)
    tune.main(["tune.num_samples=4", "--resume", "a=1"])
    assert captured[-1] == ["tune", "--address", "auto", "--resume", "tune.num_samples=4", "a=1"]
    serve = _load_script("serve", monkeypatch)
    serve.main(["serve.port=9000", "--checkpoint", "ck"])
    assert captured[-1] == ["serve", "--address", "auto", "--checkpoint", "ck", "--no-blocking", "serve.port=9000"]


def test_a_bad_config_exits_2_with_one_line_before_ray_starts(monkeypatch, capsys, tmp_path):
    import kdray.cli

    def no_ray(*args, **kwargs):
        raise AssertionError("connected to Ray before checking the config")

    monkeypatch.setattr(kdray.cli, "init_ray", no_ray)
    pipeline = _load_script("pipeline", monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert pipeline.main(["--runs-dir", str(tmp_path), "student.dimm=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdray: error: unknown key student.dimm")


def test_runtime_envs_are_valid_and_the_pip_one_matches_pyproject():
    from ray.runtime_env import RuntimeEnv

    shipped = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    pip_env = yaml.safe_load((JOBS / "runtime_env_pip.yaml").read_text())
    for env in (shipped, pip_env):
        RuntimeEnv(**env)  # Ray's own validation of the fields
        assert {".git", "runs", ".venv"} <= set(env["excludes"])
        assert Path(env["env_vars"]["KDRAY_RUNS_DIR"]).is_absolute()

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower()

    project = {name(d): d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    packages = {name(p): p for p in pip_env["pip"]["packages"]}
    assert set(packages) == set(project) - {"ray"}  # the cluster brings its own Ray
    assert packages.pop("torch") == f"torch=={pinned['torch']}"  # as constraints.txt pins it
    assert packages == {k: v for k, v in project.items() if k in packages}  # the same bounds


# ----------------------------------------------------------------------------------------------------------------
# A real head node and the Jobs API.


def _free_port() -> int:
    from kdray.serve.ingress import free_port

    return free_port()  # outside the ephemeral range, so no client socket takes it before the server binds it


def _ours(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``marker`` (this head's token): everything the head
    started, and nothing anybody else did."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@dataclass
class Head:
    client: Any  # ray.job_submission.JobSubmissionClient
    gcs_port: int
    dashboard: str  # http://127.0.0.1:PORT, the Jobs API
    env: dict[str, str]  # what a client of this head needs: RAY_AUTH_MODE=token and its token
    log: Path


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    from ray.job_submission import JobSubmissionClient

    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="kdj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = tmp_path_factory.mktemp("head") / "ray-head.log"
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           # on SIGTERM a 2.60 node first drains for up to 30 s, and idle job workers keep it from finishing
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # `python` in an entrypoint must be this interpreter, as on a cluster node with kdray installed
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           "--num-cpus=2", f"--object-store-memory={512 << 20}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, client = time.monotonic() + 90, None
        while client is None:
            if proc.poll() is not None:
                pytest.fail(f"the Ray head exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not answer within 90 s:\n{log.read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}",
                                             headers={"Authorization": f"Bearer {token}"})
            except Exception:  # not up yet (connection refused, dashboard still starting)
                time.sleep(1)
        yield Head(client=client, gcs_port=gcs_port, dashboard=f"http://127.0.0.1:{dashboard_port}",
                   env=env, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node cleanly on SIGTERM to that one process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for pid in _ours(token):  # e.g. a job driver still running when a test timed out
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    """The tiny config and the shared runs directory of every job in this module."""
    d = tmp_path_factory.mktemp("jobs")
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    return d


def _runtime_env(runs_dir: Path) -> dict[str, Any]:
    """jobs/runtime_env.yaml as shipped, with its shared runs directory pointed at this test's temp dir."""
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    env["working_dir"] = str(ROOT)
    env["env_vars"] = {**env["env_vars"], "KDRAY_RUNS_DIR": str(runs_dir)}
    return env


def _run_job(head: Head, entrypoint: str, runs_dir: Path, timeout: float) -> tuple[str, str, Any]:
    """Submits like `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- ENTRYPOINT`, waits for a
    terminal status; returns (status, logs, job info)."""
    from ray.job_submission import JobStatus

    job_id = head.client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(runs_dir))
    deadline = time.monotonic() + timeout
    while (status := head.client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                  JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            head.client.stop_job(job_id)
            pytest.fail(f"job {entrypoint!r} still {status} after {timeout:.0f} s; logs:\n"
                        f"{head.client.get_job_logs(job_id)[-4000:]}")
        time.sleep(1)
    return str(status), head.client.get_job_logs(job_id), head.client.get_job_info(job_id)


def _pipeline_ready() -> str | None:
    """Why the real pipeline cannot run yet (modules still being written), or None."""
    try:
        import kdray.pipeline  # noqa: F401
    except ImportError as e:
        return f"kdray.pipeline does not import yet: {e}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_job_succeeds_and_writes_the_run(head, job_dir):
    if reason := _pipeline_ready():
        pytest.skip(reason)
    runs = job_dir / "runs"
    status, logs, info = _run_job(head, f"python jobs/pipeline.py --config {job_dir / 'tiny.yaml'}", runs, 240)
    assert status == "SUCCEEDED", logs[-4000:]
    # joined the head it was submitted to (Ray advertises the machine's IP, not 127.0.0.1), did not start its own
    assert re.search(rf"^kdray job: kdray run .*--address [0-9.]+:{head.gcs_port} ", logs, re.M), logs[:2000]
    run = runs / "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["runs_dir"] == str(runs)
    summary = json.loads((run / "metrics.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["teacher", "student (distilled)", "student (alone)"]
    for row in summary["rows"]:
        assert 0.0 <= row["test_ndcg@10"] <= 1.0
        assert (Path(row["path"]) / "model.pt").is_file()
    assert (run / "report.md").read_text().startswith("# kdray run `tiny`")
    assert any((run / "ray").iterdir())  # Ray Train's state under the configured shared storage


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tune_job_succeeds_and_exports_the_winner(head, job_dir):
    if reason := _pipeline_ready():
        pytest.skip(reason)
    runs = job_dir / "runs"  # the pipeline test's run: its prepared data and teacher are reused
    status, logs, _ = _run_job(head, f"python jobs/tune.py --config {job_dir / 'tiny.yaml'}", runs, 240)
    assert status == "SUCCEEDED", logs[-4000:]
    run = runs / "tiny"
    board = (run / "tune" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 2  # header + one trial per arm (distilled, alone)
    assert (run / "tune" / "pareto.png").stat().st_size > 0
    assert (run / "best" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    ("student.dimm=4", "unknown key student.dimm"),
    ("data.source=csv data.path=/nonexistent/kdray/ratings.csv", "/nonexistent/kdray/ratings.csv"),
], ids=["bad-config", "missing-data"])
def test_a_user_mistake_fails_the_job_fast_with_the_message(head, job_dir, args, message):
    if "data.path" in args and (reason := _pipeline_ready()):
        pytest.skip(reason)
    t0 = time.monotonic()
    status, logs, info = _run_job(head, f"python jobs/pipeline.py --config {job_dir / 'tiny.yaml'} {args}",
                                  job_dir / "runs-bad", 90)
    assert status == "FAILED"
    assert "kdray: error:" in logs and message in logs, logs[-3000:]
    assert "Traceback" not in logs  # one line naming the problem, not a stack
    assert "exit code 2" in info.message and message in info.message  # in `ray job status` too
    assert "training on Ray Train" not in logs
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_documented_ray_job_submit_command(head, job_dir):
    """The README's command line, run by the `ray` CLI from the repository root with the shipped runtime_env:
    a user mistake makes `ray job submit` exit non-zero with kdray's one-line message in what it streams."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard,
           "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
           "python", "jobs/pipeline.py", "--config", str(job_dir / "tiny.yaml"), "--runs-dir", str(job_dir / "cli"),
           "teacher.dim=oops"]
    out = subprocess.run(cmd, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=90)
    assert out.returncode != 0
    assert "kdray: error:" in out.stdout and "teacher.dim: expected an integer, got 'oops'" in out.stdout, \
        out.stdout[-3000:] + out.stderr[-3000:]
    assert "failed" in out.stdout.lower()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_job_deploys_the_student_and_returns(head, job_dir):
    """Runs last: the Serve application outlives its job (that is the point) and holds a CPU until the head stops."""
    student = job_dir / "runs" / "tiny" / "student"
    if not (student / "model.pt").is_file():
        pytest.skip("needs the student exported by test_pipeline_job_succeeds_and_writes_the_run")
    port = _free_port()
    status, logs, _ = _run_job(head, f"python jobs/serve.py --checkpoint {student} serve.port={port} "
                                     "serve.max_replicas=1 serve.num_cpus=0.5", job_dir / "runs", 150)
    assert status == "SUCCEEDED", logs[-4000:]
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as r:
        assert json.load(r)["status"] == "ok"
    request = urllib.request.Request(f"{url}/recommend", data=json.dumps({"user_id": "0", "k": 5}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        body = json.load(r)
    assert body["user_id"] == "0" and len(body["items"]) == 5
