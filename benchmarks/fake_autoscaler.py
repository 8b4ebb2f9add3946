"""Autoscaling on one machine: a search whose trials need more CPUs than the head has makes Ray's autoscaler add
worker nodes, the search finishes, and the nodes go away once idle.

    /work/venv/bin/python benchmarks/fake_autoscaler.py [--workload kdray-tune|kdray-pipeline|plain] [--out FILE]

Ray's fake multi-node provider (benchmarks/fake_cluster.yaml) "launches" a node by starting one more raylet on this
machine, with the node type's logical resources: a 2-CPU head, and up to two 2-CPU ``cpu_worker`` and two
``gpu_worker`` nodes (a logical GPU, no GPU behind it). The script

1. starts ``RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=2 --autoscaling-config=... --block`` with its own
   ports, temp dir and auth token (the dashboard and Jobs API on 127.0.0.1);
2. submits a job through the Jobs API:
   - ``kdray-tune``: ``jobs/tune.py`` on a tiny synthetic config with ``ray.num_workers=2 ray.cpus_per_worker=2
     tune.autoscaling=true``: every training (the teacher, then each trial) asks for 2 x 2 CPUs, twice the head;
   - ``kdray-pipeline``: ``jobs/pipeline.py`` on the same config (teacher, student, control: each 2 x 2 CPUs);
   - ``plain``: a plain Ray Tune search over a trivial function whose trials each reserve a placement group of
     0.5 + 2 x 2 CPUs (the shape of a Ray Train trial) and run two 2-CPU tasks in it;
3. samples the cluster's nodes every 2 s until the job ends and then until only the head is left (idle timeout
   30 s), and prints the timeline, ``ray status`` at the peak, and a JSON summary;
4. stops the head by SIGTERM to its PID, then any leftover process that carries this run's token (the fake worker
   raylets are started by the autoscaler, not by ``ray start``), each by PID.

Everything is bounded by ``--deadline`` seconds (default 280).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE_CLUSTER = Path(__file__).resolve().parent / "fake_cluster.yaml"
HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's fixed id for the head


# ----------------------------------------------------------------------------------------------------------------
# The workloads (the plain one runs inside the submitted job).


def plain_search(trials: int, seconds: int, storage: str) -> None:
    """A Ray Tune search over a trivial function; each trial reserves 0.5 + 2 x 2 CPUs and keeps two 2-CPU tasks
    busy for ``seconds``, so no trial fits on the 2-CPU head alone."""
    import ray
    from ray import tune
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=2)
    def work(x: float, seconds: int) -> float:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
        return x * x

    def trial(config: dict[str, Any]) -> None:
        pg = get_current_placement_group()
        refs = [work.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote(config["x"], seconds) for i in (1, 2)]
        tune.report({"score": -abs(sum(ray.get(refs)) - 1.0)})

    ray.init()
    tuner = tune.Tuner(
        tune.with_resources(trial, tune.PlacementGroupFactory([{"CPU": 0.5}, {"CPU": 2}, {"CPU": 2}])),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=trials, max_concurrent_trials=trials),
        run_config=tune.RunConfig(name="fake-autoscaler", storage_path=storage),
    )
    best = tuner.fit().get_best_result()
    print(f"plain search finished: {trials} trials, best score {best.metrics['score']:.4f}", flush=True)


TINY = {
    "name": "fake-autoscaler",
    # The fake gpu_worker nodes advertise a logical GPU with no GPU behind it: with device=auto a stage that starts
    # while one is up would ask for it (kdray.train.driver.resolve_use_gpu) and fail to find NCCL.
    "device": "cpu",
    "data": {"source": "synthetic", "n_users": 200, "n_items": 100, "n_interactions": 4000, "n_clusters": 4},
    "teacher": {"name": "mf", "dim": 16, "hidden": []},
    "student": {"name": "mf", "dim": 4},
    "teacher_train": {"epochs": 2, "batch_size": 64, "lr": 0.02},
    "student_train": {"epochs": 2, "batch_size": 64, "lr": 0.02},
    "eval": {"batch_size": 64},
    "ray": {"num_workers": 2, "cpus_per_worker": 2.0},
    "tune": {"num_samples": 2, "max_concurrent_trials": 2, "max_params_ratio": 0.5, "autoscaling": True,
             "space": {"distill.temperature": None, "distill.alpha": {"choice": [0.3, 0.7]},
                       "distill.loss": {"choice": ["rd"]}, "student.dim": {"choice": [4]},
                       "student_train.lr": {"choice": [0.02]}, "student_train.weight_decay": None,
                       "student_train.batch_size": None, "distill.init_from_teacher": None}},
}


def kdray_ready() -> str | None:
    """Why kdray's own search cannot run here yet, or None."""
    try:
        import kdray.pipeline  # noqa: F401
        import kdray.tune.search  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------------
# The fake cluster.


def _free_port() -> int:
    from kdray.serve.ingress import free_port

    return free_port()  # outside the ephemeral range, so no client socket takes it before the head binds it


def _ours(token: str) -> list[int]:
    """PIDs of live processes whose environment carries this run's token: what the head and its autoscaler
    started, and nothing else."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if token.encode() in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _sample(ray: Any) -> dict[str, Any]:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    kinds = {"head": 0, "cpu_worker": 0, "gpu_worker": 0}
    for n in alive:
        kind = "head" if n["NodeID"] == HEAD_NODE_ID else "gpu_worker" if n["Resources"].get("GPU") else "cpu_worker"
        kinds[kind] += 1
    return {**kinds, "cpus": sum(n["Resources"].get("CPU", 0) for n in alive)}


def run(workload: str, deadline_s: float, log=print) -> dict[str, Any]:
    t_start = time.monotonic()
    token = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix="kdfa-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = _free_port(), _free_port()
    # This process watches the cluster as a driver, so it needs the token too, set before Ray is imported (Ray reads
    # the auth mode once, at import).
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    import ray._private.services

    node_ip = ray._private.services.get_node_ip_address()
    cluster = yaml.safe_load(FAKE_CLUSTER.read_text())
    cluster["provider"]["gcs_address"] = f"{node_ip}:{gcs_port}"  # not the default 6379: others may use it
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    idle_timeout_s = 60 * cluster["idle_timeout_minutes"]

    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
           "--num-cpus=2", f"--autoscaling-config={tmp / 'cluster.yaml'}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--object-store-memory={256 << 20}",
           f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
    log(f"$ RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 RAY_AUTH_MODE=token ray {' '.join(cmd[1:])}")
    head_log = open(tmp / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    timeline: list[dict[str, Any]] = []
    result: dict[str, Any] = {"workload": workload}
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        import ray

        client = None
        while client is None:
            if head.poll() is not None or time.monotonic() - t_start > 90:
                raise RuntimeError(f"the fake head did not start:\n{(tmp / 'head.log').read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}",
                                             headers={"Authorization": f"Bearer {token}"})
            except Exception:  # not up yet
                time.sleep(1)
        ray.init(address=f"{node_ip}:{gcs_port}", log_to_driver=False, configure_logging=False)

        # No working_dir: every fake node shares this machine's session directory, and a node's runtime-env agent
        # deletes the unpacked working_dir when its own tasks are done with it, under the driver and the other
        # nodes' workers (seen as FileNotFoundError from os.getcwd()). The job imports the kdray installed in this
        # interpreter and runs the scripts by absolute path instead; tests/test_jobs.py covers --working-dir.
        if workload == "plain":
            entrypoint = (f"python {Path(__file__).resolve()} --run-plain-search 4 --trial-seconds 20 "
                          f"--storage {tmp / 'tune'}")
        else:
            (tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
            script = ROOT / "jobs" / ("tune.py" if workload == "kdray-tune" else "pipeline.py")
            entrypoint = f"python {script} --config {tmp / 'tiny.yaml'} --runs-dir {tmp / 'runs'}"
        job_id = client.submit_job(entrypoint=entrypoint)
        t0 = time.monotonic()
        log(f"submitted job {job_id}: {entrypoint}")
        log(f"{'t (s)':>6}  {'job':<9} {'head':>4} {'cpu_w':>5} {'gpu_w':>5} {'CPUs':>5}")

        status, peak, peak_status, t_end_job, last = None, None, "", None, None
        while time.monotonic() - t_start < deadline_s:
            status = client.get_job_status(job_id)
            s = _sample(ray)
            row = {"t": round(time.monotonic() - t0, 1), "job": str(status), **s}
            timeline.append(row)
            if (s["cpu_worker"], s["gpu_worker"], s["cpus"], str(status)) != last:  # print changes only
                log(f"{row['t']:>6}  {row['job']:<9} {s['head']:>4} {s['cpu_worker']:>5} {s['gpu_worker']:>5} "
                    f"{s['cpus']:>5g}")
                last = (s["cpu_worker"], s["gpu_worker"], s["cpus"], str(status))
            if peak is None or s["cpus"] > peak["cpus"]:
                peak = row
                peak_status = subprocess.run([cmd[0], "status", f"--address={node_ip}:{gcs_port}"], env=env,
                                             capture_output=True, text=True, timeout=30).stdout
            if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and t_end_job is None:
                t_end_job = time.monotonic() - t0
                log(f"job {status} after {t_end_job:.0f} s; waiting for idle nodes to go (idle timeout "
                    f"{idle_timeout_s:.0f} s)")
            if t_end_job is not None and s["cpu_worker"] == s["gpu_worker"] == 0:
                break
            time.sleep(2)
        logs = client.get_job_logs(job_id)
        final = timeline[-1]
        removed_at = final["t"] if final["cpu_worker"] == final["gpu_worker"] == 0 and t_end_job else None
        result.update({
            "entrypoint": entrypoint, "job_status": str(status), "job_seconds": t_end_job,
            "peak": peak, "nodes_added": max(r["cpu_worker"] + r["gpu_worker"] for r in timeline),
            "first_node_added_at_s": next((r["t"] for r in timeline if r["cpu_worker"] + r["gpu_worker"]), None),
            "all_workers_removed_at_s": removed_at,
            "idle_timeout_s": idle_timeout_s, "timeline": timeline, "ray_status_at_peak": peak_status,
            "job_log_tail": logs[-2500:],
        })
        ray.shutdown()
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        head_log.close()
        time.sleep(2)
        leftovers = _ours(token)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        result["leftover_processes_killed"] = len(leftovers)
        shutil.rmtree(tmp, ignore_errors=True)
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=["auto", "kdray-tune", "kdray-pipeline", "plain"], default="auto",
                   help="kdray's search (jobs/tune.py), kdray's pipeline (jobs/pipeline.py, every training 2 x 2 "
                        "CPUs), a plain Ray Tune search, or (auto) kdray's search when it can run")
    p.add_argument("--deadline", type=float, default=280.0, help="seconds before the script gives up and cleans up")
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    p.add_argument("--run-plain-search", type=int, metavar="TRIALS", help=argparse.SUPPRESS)  # inside the job
    p.add_argument("--trial-seconds", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_plain_search:
        plain_search(args.run_plain_search, args.trial_seconds, args.storage)
        return 0

    workload = args.workload
    if workload == "auto":
        reason = kdray_ready()
        workload = "kdray-tune" if reason is None else "plain"
        if reason:
            print(f"kdray's search cannot run yet ({reason}): using a plain Ray Tune search", flush=True)
    result = run(workload, args.deadline)
    summary = {k: v for k, v in result.items() if k not in ("timeline", "ray_status_at_peak", "job_log_tail")}
    print("\nray status at the peak:\n" + result.get("ray_status_at_peak", ""))
    print("job log (tail):\n" + result.get("job_log_tail", ""))
    print("summary: " + json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = (result.get("job_status") == "SUCCEEDED" and result.get("nodes_added", 0) > 0
          and result.get("all_workers_removed_at_s") is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
