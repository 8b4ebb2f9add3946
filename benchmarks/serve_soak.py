"""Bounded soak of the Serve endpoint on loopback: many clients for a fixed time; errors, latency, replica memory.

    python benchmarks/serve_soak.py --seconds 60 --clients 32       # the recorded soak (~1.5 min with start-up)
    python benchmarks/serve_soak.py --seconds 10 --clients 8        # a quick look

It writes a checkpoint of a 16-d MF student over a synthetic catalog (2,000 users x 5,000 items, 20 seen items per
user: the weights' values do not matter for latency or memory), deploys it with ``kdray.serve.build_app`` on a local
Ray cluster (or the one this process is already connected to) bound to 127.0.0.1, and runs ``--clients`` threads,
each with its own ``requests.Session``, sending ``POST /recommend`` (a random known or unknown user, k=10) back to
back until ``--seconds`` have passed. Every 2 s it samples the resident memory (VmRSS from /proc) of each replica
process. Memory is *flat* when the last sample is at most ``--rss-tolerance`` (default 10%) above the first sample
after the warm-up (``--warmup`` seconds, default 10): allocator caches and the first batches fill early, a leak keeps
growing. Prints one JSON object: requests, errors (with the first few), p50/p90/p99/max latency, throughput, the
RSS samples per replica, growth, slope and whether it passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.checkpoint import Vocab, save_checkpoint  # noqa: E402
from kdray.config import ServeConfig  # noqa: E402
from kdray.models import build_model  # noqa: E402
from kdray.sparse import Csr  # noqa: E402

SAMPLE_EVERY_S = 2.0


def write_checkpoint(directory: Path, n_users: int = 2000, n_items: int = 5000, seen_per_user: int = 20,
                     seed: int = 0) -> Path:
    """An untrained MF-16 student over a synthetic catalog, with seen items to mask."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), seen_per_user)
    cols = np.concatenate([rng.choice(n_items, seen_per_user, replace=False) for _ in range(n_users)])
    vocab = Vocab(user_ids=np.array([f"u{i}" for i in range(n_users)]),
                  item_ids=np.array([f"i{i}" for i in range(n_items)]),
                  seen=Csr.from_pairs(rows, cols, n_users, n_items))
    torch.manual_seed(seed)
    model = build_model("mf", n_users=n_users, n_items=n_items, dim=16)
    return save_checkpoint(directory, model, role="student", config={"name": "soak"}, vocab=vocab,
                           metrics={}, lineage={"teacher": None, "seed": seed})


def free_port() -> int:
    from kdray.serve.ingress import free_port as pick

    return pick()  # outside the ephemeral range, so no client socket takes it before the server binds it


def replica_pids(deployment: str = "Recommender") -> dict[str, int]:
    """Actor id -> PID of every live Serve replica of ``deployment`` on the connected cluster. Reads the GCS actor
    table directly: ``ray.util.state.list_actors`` needs the dashboard and refuses to pick a cluster when a
    machine runs several."""
    from ray._private import state

    return {actor_id: int(info["Pid"]) for actor_id, info in state.actors().items()
            if info.get("State") == "ALIVE" and info.get("ActorClassName", "").startswith("ServeReplica")
            and info.get("ActorClassName", "").endswith(f":{deployment}") and info.get("Pid")}


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (VmRSS), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def soak(url: str, seconds: float, clients: int, users: Sequence[str], pids: dict[str, int],
         warmup_s: float = 10.0, tolerance: float = 0.10, seed: int = 0) -> dict[str, Any]:
    """Drives ``clients`` threads against ``url`` + /recommend for ``seconds``; samples the RSS of ``pids``."""
    import requests

    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    n_errors = 0

    def client(i: int) -> None:
        nonlocal n_errors
        rng = random.Random(seed * 1000 + i)
        session = requests.Session()
        while not stop.is_set():
            user = rng.choice(users) if rng.random() < 0.9 else f"stranger-{rng.randrange(10 ** 6)}"  # 10% cold
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/recommend", json={"user_id": user, "k": 10}, timeout=30)
                ok = r.status_code == 200 and len(r.json()["items"]) == 10
                problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except Exception as e:  # a refused or dropped connection counts as an error too
                problem = repr(e)[:200]
            dt = time.perf_counter() - t0
            with lock:
                if problem is None:
                    latencies.append(dt)
                else:
                    n_errors += 1
                    if len(errors) < 5:
                        errors.append(problem)

    samples: dict[str, list[tuple[float, float | None]]] = {aid: [] for aid in pids}
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    while (elapsed := time.monotonic() - start) < seconds:
        for aid, pid in pids.items():
            samples[aid].append((round(elapsed, 1), rss_mb(pid)))
        time.sleep(min(SAMPLE_EVERY_S, max(0.0, seconds - elapsed)))
    stop.set()
    for t in threads:
        t.join(timeout=35)
    wall = time.monotonic() - start
    for aid, pid in pids.items():
        samples[aid].append((round(wall, 1), rss_mb(pid)))

    memory = {}
    for aid, series in samples.items():
        after = [(t, m) for t, m in series if t >= warmup_s and m is not None]
        if len(after) < 2:
            memory[aid] = {"pid": pids[aid], "samples_mb": series, "flat": None}
            continue
        base, last = after[0][1], after[-1][1]
        slope = np.polyfit([t for t, _ in after], [m for _, m in after], 1)[0] * 60  # MiB per minute
        memory[aid] = {"pid": pids[aid], "start_mb": series[0][1], "after_warmup_mb": base, "end_mb": last,
                       "peak_mb": max(m for _, m in series if m is not None),
                       "growth_mb": round(last - base, 1), "growth_pct": round(100 * (last - base) / base, 2),
                       "slope_mb_per_min": round(float(slope), 2), "flat": last <= base * (1 + tolerance),
                       "samples_mb": [(t, None if m is None else round(m, 1)) for t, m in series]}
    n_ok = len(latencies)
    return {
        "seconds": round(wall, 1), "clients": clients, "requests": n_ok + n_errors, "ok": n_ok, "errors": n_errors,
        "first_errors": errors, "throughput_rps": round((n_ok + n_errors) / wall, 1),
        "latency_ms": {q: round(1000 * percentile(latencies, p), 1) for q, p in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "warmup_s": warmup_s, "rss_tolerance": tolerance, "replicas": memory,
        "memory_flat": bool(memory) and all(m["flat"] for m in memory.values()),
        "passed": n_errors == 0 and bool(memory) and all(m["flat"] for m in memory.values()),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the memory baseline sample")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed end/baseline growth (0.10 = 10%%)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--ingress", choices=("haproxy", "proxy", "direct"), default=ServeConfig().ingress,
                   help="serve.ingress (default: kdray serve's)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from kdray.cli import init_ray
    from kdray.serve.app import APP_NAME, serve_checkpoint

    t0 = time.monotonic()

    def log(message: str) -> None:
        print(f"[serve_soak {time.monotonic() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    own_cluster = not ray.is_initialized()
    if own_cluster:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        init_ray("local", num_cpus=2, object_store_memory=256 << 20, log_to_driver=False)
        log("ray started")
    port = free_port()
    cfg = ServeConfig(port=port, min_replicas=args.replicas, max_replicas=args.replicas, num_cpus=args.num_cpus,
                      ingress=args.ingress)
    with tempfile.TemporaryDirectory(prefix="kdray-soak-") as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt")
        try:
            serve_checkpoint(ckpt, cfg, blocking=False)
            pids = replica_pids()
            log(f"deployed, replica PIDs {sorted(pids.values())}; soaking {args.seconds:g} s with {args.clients} clients")
            users = [f"u{i}" for i in range(2000)]
            result = soak(f"http://127.0.0.1:{port}", args.seconds, args.clients, users, pids,
                          warmup_s=args.warmup, tolerance=args.rss_tolerance)
            log("soak done")
            serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            log("serve shut down")
    if own_cluster:
        ray.shutdown()
        log("ray shut down")
    result["config"] = {"ingress": cfg.ingress, "replicas": args.replicas, "num_cpus": args.num_cpus,
                        "max_ongoing_requests": cfg.max_ongoing_requests, "max_batch_size": cfg.max_batch_size,
                        "catalog": "2000 users x 5000 items, MF-16", "cpu_count": os.cpu_count()}
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
