"""Bounded load test of the Serve endpoint: student vs teachers, large vs small catalog, HTTP vs in-process.

    python benchmarks/serve_load.py --data DATA           # gowalla + ml-100k, 3 models, 1/8/32 clients
    python benchmarks/serve_load.py --data DATA --requests 5000 --concurrency 1 8 32
    python benchmarks/serve_load.py --smoke-test          # tiny synthetic catalog, a few requests, ~30 s

For each catalog and model it writes an untrained checkpoint of the real size (latency depends on the catalog, the
model and the seen-item masks, not on the weights' values), deploys it with ``kdray.serve.build_app`` on a local
Ray cluster bound to 127.0.0.1, and sends a fixed number of ``POST /recommend`` requests (one random known user
each, k=10, exclude_seen) from 1, 8 and 32 client threads, each with its own ``requests.Session``. It reports
p50/p99 latency, throughput, errors and the mean @serve.batch size per level, then the same request through the
predictor in-process (the Serve overhead) and where the predictor's time goes (scoring vs masking + top-k).

Catalogs come from ``--data`` (DATA/gowalla: LightGCN train.txt, 29,858 x 40,981; DATA/ml-100k: u.data, 943 x 1,682).
A missing folder is reported and skipped. Results go to ``--out`` as JSON and to stdout as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.checkpoint import Vocab, save_checkpoint  # noqa: E402
from kdray.config import ServeConfig  # noqa: E402
from kdray.models import build_model, count_parameters  # noqa: E402
from kdray.serve.predictor import Query, Recommender  # noqa: E402
from kdray.sparse import Csr  # noqa: E402

MODELS = {  # the sizes: teachers as in configs/default.yaml and configs/gowalla.yaml, the 16-d student
    "student mf-16": {"name": "mf", "dim": 16},
    "teacher mf-256": {"name": "mf", "dim": 256},
    "teacher two_tower-256 (512,256)": {"name": "two_tower", "dim": 256, "hidden": (512, 256)},
}
K = 10


@dataclass(frozen=True)
class Catalog:
    name: str
    user_ids: np.ndarray  # [U] str
    item_ids: np.ndarray  # [I] str
    seen: Csr  # training interactions, masked at serving time
    source: str


def _catalog(name: str, users: np.ndarray, items: np.ndarray, source: str) -> Catalog:
    """Dense ids from raw ids, sorted as kdray's data preparation sorts them."""
    uniq_u, u = np.unique(users, return_inverse=True)
    uniq_i, i = np.unique(items, return_inverse=True)
    seen = Csr.from_pairs(u, i, len(uniq_u), len(uniq_i))
    return Catalog(name, uniq_u.astype(str), uniq_i.astype(str), seen, source)


def load_gowalla(path: Path) -> Catalog:
    """LightGCN's train.txt: ``user item item ...`` per line; the training split is what serving masks."""
    users, items = [], []
    with open(path / "train.txt") as f:
        for line in f:
            ids = line.split()
            if len(ids) > 1:
                users.extend([ids[0]] * (len(ids) - 1))
                items.extend(ids[1:])
    return _catalog("gowalla", np.array(users), np.array(items), f"{path}/train.txt")


def load_ml100k(path: Path) -> Catalog:
    """u.data, every rating an interaction; all of them masked (the real 80% training split masks a bit less)."""
    raw = np.loadtxt(path / "u.data", dtype=np.int64, usecols=(0, 1))
    return _catalog("ml-100k", raw[:, 0], raw[:, 1], f"{path}/u.data (all ratings as seen items)")


def synthetic(n_users: int = 200, n_items: int = 500, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 20)
    items = rng.integers(0, n_items, users.size)
    items[:n_items] = np.arange(n_items)  # every item occurs
    return _catalog("synthetic", users, items, "generated")


def write_checkpoint(cat: Catalog, spec: dict[str, Any], directory: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(n_users=len(cat.user_ids), n_items=len(cat.item_ids), **spec)
    role = spec_label(spec).split()[0]
    return save_checkpoint(directory, model, role=role, config={"name": f"bench-{cat.name}"},
                           vocab=Vocab(cat.user_ids, cat.item_ids, cat.seen), lineage={"note": "untrained"})


def spec_label(spec: dict[str, Any]) -> str:
    return next(label for label, s in MODELS.items() if s == spec)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def http_level(url: str, users: Sequence[str], concurrency: int) -> dict[str, Any]:
    """Sends one POST per user, split over ``concurrency`` threads; latency per request, wall time overall."""
    import requests

    chunks = [list(users[i::concurrency]) for i in range(concurrency)]

    def client(chunk: list[str]) -> list[tuple[float, bool]]:
        out = []
        with requests.Session() as s:
            for user in chunk:
                t0 = time.perf_counter()
                try:
                    r = s.post(url, json={"user_id": user, "k": K, "exclude_seen": True}, timeout=120)
                    ok = r.status_code == 200 and len(r.json()["items"]) == K
                except Exception:  # timeouts and refused connections count as errors
                    ok = False
                out.append((time.perf_counter() - t0, ok))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = [x for chunk in pool.map(client, chunks) for x in chunk]
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies = [lat for lat, ok in results if ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": sum(not ok for _, ok in results),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "throughput_rps": len(results) / wall,
        "wall_s": wall,
        "client_cpu_ms_per_request": 1000 * client_cpu / len(results),
    }


def _proc_tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of the Ray processes under ``root`` (this driver started the local cluster, so
    they are its descendants), by role: the HTTP proxy, the replica(s), and the rest (controller, raylet, GCS)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, title = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry)
        parent[pid], cpu[pid], title[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd
    out = {"proxy": 0.0, "replica": 0.0, "ray other": 0.0}
    for pid in cpu:
        p = parent.get(pid)
        while p and p != root:
            p = parent.get(p)
        if p != root:
            continue
        role = ("proxy" if "ProxyActor" in title[pid] else "replica" if "ServeReplica" in title[pid]
                else "ray other")
        out[role] += cpu[pid]
    return out


def http_batch_level(url: str, users: Sequence[str], per_request: int, concurrency: int) -> dict[str, Any]:
    """``POST /recommend/batch`` with ``per_request`` users each: the HTTP cost amortised over many users."""
    import requests

    groups = [list(users[i : i + per_request]) for i in range(0, len(users) - per_request + 1, per_request)]
    chunks = [groups[i::concurrency] for i in range(concurrency)]

    def client(chunk: list[list[str]]) -> list[tuple[float, bool]]:
        out = []
        with requests.Session() as s:
            for group in chunk:
                t0 = time.perf_counter()
                try:
                    r = s.post(url, json={"user_ids": group, "k": K}, timeout=120)
                    ok = r.status_code == 200 and len(r.json()["results"]) == len(group)
                except Exception:
                    ok = False
                out.append((time.perf_counter() - t0, ok))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = [x for chunk in pool.map(client, chunks) for x in chunk]
        wall = time.perf_counter() - t0
    latencies = [lat for lat, ok in results if ok]
    return {"users_per_request": per_request, "concurrency": concurrency, "requests": len(results),
            "errors": sum(not ok for _, ok in results), "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "users_per_s": len(results) * per_request / wall}


def replica_counters(base: str) -> dict[str, int]:
    import requests

    return requests.get(f"{base}/model", timeout=30).json()["replica"]


def _times_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return times


def in_process(ckpt: Path, users: Sequence[str], reps: int) -> dict[str, Any]:
    """The same requests through the predictor, one torch thread like a 1-CPU replica, and where one request's and
    one 32-user batch's time goes: scoring, masking + top-k, mapping ids (fastest of several runs each, so other
    work on the machine does not blur the split)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = Recommender.from_checkpoint(ckpt)
        single = [_times_ms(lambda u=u: rec.recommend([u], k=K), 1)[0] for u in users[:reps]]
        out: dict[str, Any] = {"p50_ms": statistics.median(single), "p99_ms": percentile(single, 99)}
        n = max(10, reps // 10)
        for b in (1, 32):
            batch = list(users[:b])
            dense_np = np.array([rec._user_index[u] for u in batch])
            dense = torch.from_numpy(dense_np)
            queries = [Query(u, K, True) for u in batch]
            score = min(_times_ms(lambda: rec.score_all(dense), n))
            topk = min(_times_ms(lambda: rec._score_topk(dense_np, np.ones(b, dtype=bool), K), n))
            total = min(_times_ms(lambda: rec.recommend_queries(queries), n))
            out[f"batch{b}"] = {"total_ms": total, "score_ms": score, "mask_topk_ms": topk - score,
                                "map_ids_ms": total - topk}
        if rec._item_matrix is not None:  # what caching the item tower saves, per call
            with torch.inference_mode():
                out["uncached_score_all_batch1_ms"] = min(_times_ms(lambda: rec.model.score_all(dense[:1]), 3))
        out["parameters"] = count_parameters(rec.model)
        return out
    finally:
        torch.set_num_threads(threads)


def bench_model(cat: Catalog, spec: dict[str, Any], args: argparse.Namespace, base: str, workdir: Path,
                cfg: ServeConfig) -> dict[str, Any]:
    from ray import serve

    from kdray.serve.app import APP_NAME, build_app

    label = spec_label(spec)
    ckpt = write_checkpoint(cat, spec, workdir / f"{cat.name}-{spec['name']}-{spec['dim']}")
    rng = np.random.default_rng(0)
    users = rng.choice(cat.user_ids, size=args.requests).tolist()
    t0 = time.perf_counter()
    serve.run(build_app(ckpt, cfg), name=APP_NAME, route_prefix="/")
    deploy_s = time.perf_counter() - t0
    url = f"{base}/recommend"
    http_level(url, users[: min(100, len(users))], 8)  # warm-up: connections, first-batch allocations
    levels = []
    for c in args.concurrency:
        before, cpu_before = replica_counters(base), _proc_tree_cpu(os.getpid())
        level = http_level(url, users, c)
        after, cpu_after = replica_counters(base), _proc_tree_cpu(os.getpid())
        batches = after["batches"] - before["batches"]
        level["mean_batch_size"] = (after["batched_requests"] - before["batched_requests"]) / max(1, batches)
        level["server_cpu_ms_per_request"] = {
            role: 1000 * (cpu_after[role] - cpu_before[role]) / level["requests"] for role in cpu_after
        }
        levels.append(level)
        print(f"  {label:32s} c={c:2d}: p50 {level['p50_ms']:7.1f} ms  p99 {level['p99_ms']:7.1f} ms  "
              f"{level['throughput_rps']:6.1f} req/s  errors {level['errors']}  "
              f"batch {level['mean_batch_size']:.1f}", flush=True)
    batch_route = http_batch_level(f"{base}/recommend/batch", users, args.batch_route_users,
                                   args.batch_route_concurrency)
    print(f"  {label:32s} /recommend/batch x{args.batch_route_users} users, c={args.batch_route_concurrency}: "
          f"p50 {batch_route['p50_ms']:.1f} ms, {batch_route['users_per_s']:.0f} users/s, "
          f"errors {batch_route['errors']}", flush=True)
    serve.delete(APP_NAME)  # the next model starts on an idle machine
    local = in_process(ckpt, users, args.in_process_reps)
    print(f"  {label:32s} in-process p50 {local['p50_ms']:.2f} ms; HTTP c=1 p50 {levels[0]['p50_ms']:.2f} ms",
          flush=True)
    return {"catalog": cat.name, "model": label, "spec": spec, "deploy_s": deploy_s, "levels": levels,
            "batch_route": batch_route, "in_process": local}


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def cpu_bound_rps(level: dict[str, Any], cores: int = 2) -> float:
    """Throughput if the measured CPU per request (load generator + Serve) had the cores to itself: an estimate
    that other work on a shared machine disturbs less than the wall-clock throughput."""
    ms = level["client_cpu_ms_per_request"] + sum(level["server_cpu_ms_per_request"].values())
    return 1000 * cores / ms


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| catalog | model | params | clients | requests | p50 ms | p99 ms | req/s | errors | mean batch "
        "| CPU ms/request: client / proxy / replica / other Ray | req/s the CPU allows on 2 idle cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        for lv in r["levels"]:
            cpu = lv["server_cpu_ms_per_request"]
            lines.append(
                f"| {r['catalog']} | {r['model']} | {r['in_process']['parameters']:,} | {lv['concurrency']} "
                f"| {lv['requests']} | {lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['throughput_rps']:.0f} "
                f"| {lv['errors']} | {lv['mean_batch_size']:.1f} | {lv['client_cpu_ms_per_request']:.2f} / "
                f"{cpu['proxy']:.2f} / {cpu['replica']:.2f} / {cpu['ray other']:.2f} | {cpu_bound_rps(lv):.0f} |")
    lines += [
        "",
        "| catalog | model | HTTP p50, 1 client (ms) | in-process p50 (ms) | Serve overhead (ms) "
        "| 1 user: score / mask+top-k / ids (ms) | 32 users: score / mask+top-k / ids (ms) "
        "| two-tower score_all without the item cache, 1 user (ms) |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        ip, lv1 = r["in_process"], r["levels"][0]
        b1, b32 = ip["batch1"], ip["batch32"]
        uncached = f"{ip['uncached_score_all_batch1_ms']:.0f}" if "uncached_score_all_batch1_ms" in ip else "-"
        lines.append(
            f"| {r['catalog']} | {r['model']} | {lv1['p50_ms']:.2f} | {ip['p50_ms']:.2f} | "
            f"{lv1['p50_ms'] - ip['p50_ms']:.2f} | {b1['score_ms']:.2f} / {b1['mask_topk_ms']:.2f} / "
            f"{b1['map_ids_ms']:.2f} | {b32['score_ms']:.1f} / {b32['mask_topk_ms']:.1f} / {b32['map_ids_ms']:.1f} "
            f"| {uncached} |")
    lines += ["", "| catalog | model | /recommend/batch: users per request | clients | requests | p50 ms | p99 ms "
                  "| users/s | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b = r["batch_route"]
        lines.append(f"| {r['catalog']} | {r['model']} | {b['users_per_request']} | {b['concurrency']} | "
                     f"{b['requests']} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {b['users_per_s']:.0f} | "
                     f"{b['errors']} |")
    lines.append("")
    for cat in dict.fromkeys(r["catalog"] for r in results):
        rows = {r["model"]: r for r in results if r["catalog"] == cat}
        student = rows.get("student mf-16")
        for name, teacher in rows.items():
            if student is None or teacher is student:
                continue
            ratios = [f"{s['throughput_rps'] / t['throughput_rps']:.2f}x ({cpu_bound_rps(s) / cpu_bound_rps(t):.2f}x "
                      f"by CPU) at {s['concurrency']}" for s, t in zip(student["levels"], teacher["levels"])]
            batch = student["batch_route"]["users_per_s"] / teacher["batch_route"]["users_per_s"]
            compute = teacher["in_process"]["batch32"]["total_ms"] / student["in_process"]["batch32"]["total_ms"]
            lines.append(f"- {cat}: student / {name} throughput: {', '.join(ratios)} clients; "
                         f"{batch:.2f}x users/s on /recommend/batch; {compute:.2f}x in-process (32 users)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per concurrency level and model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--catalogs", nargs="+", default=["gowalla", "ml-100k"], choices=["gowalla", "ml-100k"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--in-process-reps", type=int, default=200)
    p.add_argument("--batch-route-users", type=int, default=32, help="users per /recommend/batch request")
    p.add_argument("--batch-route-concurrency", type=int, default=4)
    p.add_argument("--batch-wait-s", type=float, default=ServeConfig.batch_wait_timeout_s,
                   help="serve.batch_wait_timeout_s for the deployment")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "serve_load.json")
    p.add_argument("--data", type=Path, help="folder holding gowalla/ and ml-100k/ (not needed with --smoke-test)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic catalog, few requests")
    p.add_argument("--report", type=Path, help="print the tables of a saved JSON result and exit")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())["results"]), end="")
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    if args.smoke_test:
        catalogs = [synthetic()]
        args.requests, args.concurrency, args.in_process_reps, args.batch_route_users = 40, [1, 4], 20, 8
    else:
        if args.data is None:
            p.error("--data DATA is required (the folder holding gowalla/ and ml-100k/), or use --smoke-test")
        catalogs = []
        for name in args.catalogs:
            folder = args.data / name
            if not folder.is_dir():
                print(f"skipping {name}: {folder} does not exist", file=sys.stderr)
                continue
            catalogs.append(load_gowalla(folder) if name == "gowalla" else load_ml100k(folder))
    if not catalogs:
        print("no catalog to benchmark", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from kdray.serve.ingress import free_port

    port = free_port()  # outside the ephemeral range, so no client socket takes it before Serve binds it
    # One 1-CPU replica (no autoscaling) so every level measures the same thing; the second core is left to the
    # HTTP proxy and the load generator, which share this machine.
    cfg = replace(ServeConfig(), port=port, min_replicas=1, max_replicas=1, batch_wait_timeout_s=args.batch_wait_s)
    ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    started, load_before = time.perf_counter(), os.getloadavg()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="kdray-serve-bench-") as tmp:
            for cat in catalogs:
                print(f"{cat.name}: {len(cat.user_ids):,} users x {len(cat.item_ids):,} items, "
                      f"{cat.seen.nnz:,} seen ({cat.source})", flush=True)
                for label in args.models:
                    results.append(bench_model(cat, MODELS[label], args, base, Path(tmp), cfg))
    finally:
        serve.shutdown()
        ray.shutdown()
    meta = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, no GPU used",
        "torch": torch.__version__, "ray": ray.__version__, "k": K,
        "serve_config": {k: getattr(cfg, k) for k in ("max_batch_size", "batch_wait_timeout_s",
                                                      "max_ongoing_requests", "num_cpus")},
        "catalogs": {c.name: {"users": len(c.user_ids), "items": len(c.item_ids), "seen": c.seen.nnz,
                              "source": c.source} for c in catalogs},
        "wall_s": time.perf_counter() - started,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],  # others share these cores
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\n{markdown(results)}\nwall {meta['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
