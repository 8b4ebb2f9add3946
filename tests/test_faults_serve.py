"""Serving under faults and load, on the shared local cluster (127.0.0.1 only; every loop is bounded in time).

* A replica process killed with SIGKILL while clients keep calling: Serve starts a replacement, every request after
  the recovery succeeds, and at most the requests in flight at the kill fail.
* A soak: 32 clients for 60 s with no errors and flat replica memory (benchmarks/serve_soak.py, which also records
  the numbers in BENCHMARKS.md).
* The API's hostile-input check against the live deployment (the fuzzing itself runs in-process, tests/test_fuzz.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from kdray.config import ServeConfig
from test_serve import make_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _soak_module():
    spec = importlib.util.spec_from_file_location("serve_soak", REPO / "benchmarks" / "serve_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _deployment_healthy(app: str, n_replicas: int) -> bool:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return False
    deployment = status.deployments["Recommender"]
    return str(deployment.status).endswith("HEALTHY") and \
        dict(deployment.replica_states).get("RUNNING", 0) == n_replicas and len(deployment.replica_states) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_replica_killed_under_load_is_replaced_and_only_in_flight_requests_fail(ray_cluster, tmp_path):
    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.serve.app import APP_NAME, serve_checkpoint

    soak = _soak_module()
    port = soak.free_port()
    cfg = ServeConfig(port=port, max_k=5, max_batch_size=4, max_ongoing_requests=8, min_replicas=2, max_replicas=2,
                      num_cpus=0.25)
    url = f"http://127.0.0.1:{port}/recommend"
    n_clients, max_per_client = 6, 3000  # bounded load: at most 18k requests, and it stops with the test
    log: list[tuple[float, float, bool, str]] = []  # (sent, answered, ok, status or error)
    lock = threading.Lock()
    in_flight = 0
    stop = threading.Event()

    def client(i: int) -> None:
        nonlocal in_flight
        session = requests.Session()
        for n in range(max_per_client):
            if stop.is_set():
                return
            with lock:
                in_flight += 1
                sent = time.monotonic()
            try:
                r = session.post(url, json={"user_id": ["u0", "u1", 7, "nobody"][(i + n) % 4], "k": 2}, timeout=30)
                ok, detail = r.status_code == 200, str(r.status_code)
            except requests.RequestException as e:
                ok, detail = False, type(e).__name__
            with lock:
                in_flight -= 1
                log.append((sent, time.monotonic(), ok, detail))

    try:
        serve_checkpoint(make_checkpoint(tmp_path / "ckpt"), cfg, blocking=False)
        _wait_for(lambda: _deployment_healthy(APP_NAME, 2), 60, "two RUNNING replicas")
        before = _wait_for(lambda: p if len(p := soak.replica_pids()) == 2 else None, 30, "two replica PIDs")
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
        for t in threads:
            t.start()
        time.sleep(3)  # under steady load before the fault
        victim_id, victim_pid = sorted(before.items())[0]
        with lock:  # the kill happens inside the lock: no request starts or ends while we count
            in_flight_at_kill = in_flight
            sent_before_kill = len(log) + in_flight
            killed_at = time.monotonic()
            os.kill(victim_pid, signal.SIGKILL)
        _wait_for(lambda: soak.rss_mb(victim_pid) is None, 10, "the killed process to disappear", every=0.05)
        _wait_for(lambda: victim_id not in (p := soak.replica_pids()) and len(p) == 2 and
                  _deployment_healthy(APP_NAME, 2), 120, "a replacement replica", every=0.25)
        recovered_at = time.monotonic()
        time.sleep(3)  # load on the recovered deployment
        stop.set()
        for t in threads:
            t.join(timeout=35)
        assert not any(t.is_alive() for t in threads)

        after = soak.replica_pids()
        failed = [entry for entry in log if not entry[2]]
        after_recovery = [entry for entry in log if entry[0] >= recovered_at]
        summary = {
            "requests": len(log), "failed": len(failed), "in_flight_at_kill": in_flight_at_kill,
            "sent_before_kill": sent_before_kill, "recovery_s": round(recovered_at - killed_at, 2),
            "after_recovery": len(after_recovery), "failures": sorted({e[3] for e in failed}),
            "failed_sent_after_kill": sum(e[0] > killed_at for e in failed),
            "replaced": {victim_pid: sorted(set(after.values()) - set(before.values()))},
        }
        print("replica kill:", json.dumps(summary))
        (tmp_path / "replica_kill.json").write_text(json.dumps(summary, indent=2))

        assert after_recovery and all(ok for _, _, ok, _ in after_recovery), summary  # all succeed after recovery
        assert set(after) - set(before), summary  # a new replica actor, not the old one back
        # What may fail: the requests in flight on the killed replica, and, through HAProxy (the default ingress),
        # at most one request per client sent before the deployment recovered. HAProxy reloads its server list when
        # the replica goes and again when its replacement comes; the old process closes idle keep-alive
        # connections, and a request a client sends on one at that instant sees the connection reset (two of six
        # runs; the one examined lost 1 request of 11,403). A client retries such a read-only request once.
        assert len(failed) <= in_flight_at_kill + n_clients, summary
        assert all(sent < recovered_at for sent, _, _, _ in failed), summary
        serve.delete(APP_NAME)
    finally:
        stop.set()
        serve.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_soak_32_clients_60_s_no_errors_and_flat_memory(ray_cluster, tmp_path):
    pytest.importorskip("requests")
    out = tmp_path / "soak.json"
    # The recorded soak's length and load; a replica of half a CPU leaves the other tests' cluster room.
    result = _soak_module().main(["--seconds", "60", "--clients", "32", "--num-cpus", "0.5", "--out", str(out)])
    assert result["requests"] > 32, result
    assert result["errors"] == 0, result["first_errors"]
    (replica,) = result["replicas"].values()
    assert replica["flat"], replica  # last sample within 10% of the first after the 10 s warm-up


@pytest.mark.ray
@pytest.mark.slow
def test_live_deployment_answers_hostile_bodies_with_4xx(ray_cluster, tmp_path):
    """The in-process fuzz's regressions, through Serve's HTTP proxy: it must not turn them into 5xx either."""
    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.serve.app import APP_NAME, serve_checkpoint

    port = _soak_module().free_port()
    cfg = ServeConfig(port=port, max_k=5, max_request_batch=3, max_batch_size=4, max_ongoing_requests=8,
                      min_replicas=1, max_replicas=1, num_cpus=0.25)
    bodies = [b'{"user_id": "\\ud800", "k": 2}', b'{"user_id": NaN}', b'{"\\udfff": 1, "user_id": "u0"}',
              b'{"user_id": 1' + b"0" * 5000 + b"}", b"[" * 100_000, b"\xff\xfe", b"", b"null",
              b'{"user_ids": [Infinity]}', b'{"user_id": "u0", "k": 1e400}', "{\"user_id\": \"💥\"}".encode()]
    try:
        serve_checkpoint(make_checkpoint(tmp_path / "ckpt"), cfg, blocking=False)
        base = f"http://127.0.0.1:{port}"
        for route in ("/recommend", "/recommend/batch"):
            for body in bodies:
                r = requests.post(base + route, data=body, headers={"content-type": "application/json"}, timeout=30)
                if r.status_code == 200:  # the unicode id is a valid (cold-start) user on /recommend
                    assert route == "/recommend" and r.json()["cold_start"], (route, body[:40], r.text[:200])
                    continue
                assert 400 <= r.status_code < 500, (route, body[:40], r.status_code, r.text[:300])
                assert r.json()["detail"], (route, body[:40], r.text[:300])
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # the replica survived all of it
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()


@pytest.mark.ray
def test_incomplete_bodies_do_not_starve_the_endpoint(ray_cluster, tmp_path):
    """80 connections announce ``Content-Length: 100`` and send 15 bytes; with only 8 request slots on the replica,
    ``/healthz`` and valid requests still answer at once, and each stalled client gets a 408 after
    ``serve.body_timeout_s`` (the first-hour issue: ~40 s of timeouts through Serve's proxy)."""
    import socket

    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.serve.app import APP_NAME, serve_checkpoint

    port = _soak_module().free_port()
    cfg = ServeConfig(port=port, max_k=5, max_batch_size=4, max_ongoing_requests=8, min_replicas=1, max_replicas=1,
                      num_cpus=0.25, body_timeout_s=20.0)
    base = f"http://127.0.0.1:{port}"
    attackers: list[socket.socket] = []
    try:
        serve_checkpoint(make_checkpoint(tmp_path / "ckpt"), cfg, blocking=False)
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port), timeout=40)
            s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n" + b'{"user_id": "u1"')  # 15 of the 100 bytes
            attackers.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        # The bound is generous because a loaded 2-core CI machine can take seconds per request; it is still well
        # before any stalled body times out (20 s), and the endpoint starved for ~40 s before the fix.
        assert requests.get(f"{base}/healthz", timeout=15).status_code == 200
        r = requests.post(f"{base}/recommend", json={"user_id": "u0", "k": 2}, timeout=15)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 15
        answers = [s.recv(200) for s in attackers[:5]]  # bounded: socket timeout 40 s
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
        serve.delete(APP_NAME)
    finally:
        for s in attackers:
            s.close()
        serve.shutdown()
