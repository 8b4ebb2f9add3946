"""Bounded loopback benchmark of the serving paths side by side: a bare FastAPI app in one uvicorn process, and
``kdray serve`` through each of Ray Serve's ingress modes, over the same ``Recommender`` and checkpoint.

    python benchmarks/serve_ingress.py                                 # built-in-size catalog, student + teacher
    python benchmarks/serve_ingress.py --catalogs builtin gowalla --requests 2000
    python benchmarks/serve_ingress.py --smoke-test                    # tiny catalog, few requests
    python benchmarks/serve_ingress.py --from-json A.json [B.json ...]  # the tables of earlier runs, again

Per catalog and model (student MF-16, teacher MF-256; untrained checkpoints of the real shapes, written by
``serve_load.py``), per path: ``POST /recommend`` for random known users, k=10, from 1 and 8 client threads
(``serve_load.http_level``), one 1-CPU replica. Paths: ``bare`` (uvicorn, a handler calling
``Recommender.recommend``), ``proxy`` (Serve's Python proxy), ``haproxy`` (HAProxy on serve.port in front of the
replica's own HTTP server) and ``direct`` (the replica's own port, which is not a stable address). Each Serve mode
runs on a fresh Serve instance (its mode is fixed when Serve starts). JSON to ``--out``; a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_load as SL  # noqa: E402

from kdray.config import ServeConfig  # noqa: E402
from kdray.serve.predictor import checkpoint_version  # noqa: E402

MODELS = {"student mf-16": SL.MODELS["student mf-16"], "teacher mf-256": SL.MODELS["teacher mf-256"]}
PATHS = ("bare", "proxy", "haproxy", "direct")


def builtin_catalog() -> Any:
    """The built-in catalogue's size (configs/default.yaml: 3,000 users x 1,998 items after filtering)."""
    return replace(SL.synthetic(n_users=3000, n_items=1998), name="builtin")


def _bare_server(ckpt: str, port: int) -> None:
    """One uvicorn process: a FastAPI handler calling ``Recommender.recommend``, one torch thread."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from kdray.serve.predictor import Recommender

    torch.set_num_threads(1)
    rec = Recommender.from_checkpoint(ckpt)
    app = FastAPI()

    @app.post("/recommend")
    def recommend(body: dict) -> dict:
        (r,) = rec.recommend([body["user_id"]], body.get("k", 10), body.get("exclude_seen", True))
        return {"user_id": r.user_id, "items": [{"item_id": i, "score": s} for i, s in zip(r.item_ids, r.scores)],
                "cold_start": r.cold_start}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def measure(url: str, users: list[str], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    SL.http_level(url, users[:200], 8)  # warm-up
    return [SL.http_level(url, users, c) for c in concurrency]


def bench_bare(ckpt: Path, users: list[str], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    import requests

    port = _port()
    proc = multiprocessing.get_context("spawn").Process(target=_bare_server, args=(str(ckpt), port), daemon=True)
    proc.start()
    try:
        for _ in range(300):
            try:
                requests.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": users[0]}, timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        return measure(f"http://127.0.0.1:{port}/recommend", users, concurrency)
    finally:
        proc.terminate()
        proc.join(10)


PORT_RANGE = 20  # direct-ingress ports the benchmark's replicas may take


def _replica_port(first: int, version: str) -> int:
    """The direct-ingress port of the replica serving ``version`` (the previous model's may still hold another)."""
    import requests

    for port in range(first, first + PORT_RANGE):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()["model"]["version"] == version:
                return port
        except (requests.RequestException, ValueError, KeyError):
            continue
    raise RuntimeError(f"no replica serving {version} on ports {first}..{first + PORT_RANGE - 1}")


def _port() -> int:
    from kdray.serve.ingress import free_port

    return free_port()


def bench_serve(mode: str, ckpts: dict[tuple[str, str], Path], users: dict[str, list[str]],
                concurrency: Sequence[int]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """One fresh Serve instance in ``mode`` (``direct`` is measured on the replica's own port)."""
    from ray import serve

    from kdray.serve.app import APP_NAME, build_app
    from kdray.serve.ingress import ingress_env

    port, replica_port = _port(), _port()
    cfg = ServeConfig(port=port, min_replicas=1, max_replicas=1, ingress="proxy" if mode == "direct" else mode)
    env = ingress_env(replace(cfg, ingress=mode))
    # the one replica takes the first port of its range, so the benchmark knows where to send direct requests
    # (a deleted replica's port is normally held back for 150 s; here the next model's replica reuses it at once)
    env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(replica_port),
               RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(replica_port + PORT_RANGE), RAY_SERVE_PORT_QUARANTINE_S="0")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options={"runtime_env": {"env_vars": env}})
    out = {}
    try:
        for (cat, model), ckpt in ckpts.items():
            serve.run(build_app(ckpt, cfg), name=APP_NAME, route_prefix="/")
            target = _replica_port(replica_port, checkpoint_version(ckpt)) if mode == "direct" else port
            out[(cat, model)] = measure(f"http://127.0.0.1:{target}/recommend", users[cat], concurrency)
            print(f"  {mode:8s} {cat} {model}: " + ", ".join(
                f"c={lv['concurrency']} {lv['throughput_rps']:.0f} req/s p50 {lv['p50_ms']:.1f} ms "
                f"errors {lv['errors']}" for lv in out[(cat, model)]), flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| catalog | model | path | 1 client: req/s, p50 ms | 8 clients: req/s, p50 / p99 ms | vs bare (8 clients) |"
             " errors |", "|---|---|---|---:|---:|---:|---:|"]
    bare = {(r["catalog"], r["model"]): r for r in rows if r["path"] == "bare"}
    for r in rows:
        one, eight = r["levels"][0], r["levels"][-1]
        base = bare.get((r["catalog"], r["model"]))
        ratio = eight["throughput_rps"] / base["levels"][-1]["throughput_rps"] if base else float("nan")
        lines.append(f"| {r['catalog']} | {r['model']} | {r['path']} | {one['throughput_rps']:.0f}, {one['p50_ms']:.2f} "
                     f"| {eight['throughput_rps']:.0f}, {eight['p50_ms']:.1f} / {eight['p99_ms']:.1f} | {ratio:.2f}x "
                     f"| {sum(lv['errors'] for lv in r['levels'])} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], default: str = "haproxy") -> list[str]:
    """The serving targets, in sentences: ``default`` against the bare app (throughput at the most clients, p50 at
    one client) per catalog and model, and the student/teacher throughput ratio per catalog and path."""
    by = {(r["catalog"], r["model"], r["path"]): r["levels"] for r in rows}
    lines = []
    for (cat, model, path), levels in by.items():
        bare = by.get((cat, model, "bare"))
        if path == default and bare:
            lines.append(f"{cat} {model}: {default} {levels[-1]['throughput_rps'] / bare[-1]['throughput_rps']:.2f}x "
                         f"the bare app's throughput at {levels[-1]['concurrency']} clients; one-client p50 "
                         f"{levels[0]['p50_ms'] - bare[0]['p50_ms']:+.2f} ms over it "
                         f"({levels[0]['p50_ms']:.2f} vs {bare[0]['p50_ms']:.2f})")
    for (cat, model, path), levels in by.items():
        teacher = by.get((cat, model.replace("student mf-16", "teacher mf-256"), path))
        if model.startswith("student") and teacher:
            ratio = levels[-1]["throughput_rps"] / teacher[-1]["throughput_rps"]
            lines.append(f"{cat} {path}: student/teacher throughput {ratio:.2f}x at "
                         f"{levels[-1]['concurrency']} clients")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1500, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--catalogs", nargs="+", default=["builtin"], choices=["builtin", "gowalla"])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "serve_ingress.json")
    p.add_argument("--data", type=Path, default=SL.DATA, help="folder holding gowalla/train.txt")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--from-json", type=Path, nargs="+", help="print the tables of earlier runs and exit")
    args = p.parse_args(argv)
    if args.from_json:
        for path in args.from_json:
            run = json.loads(path.read_text())
            print(f"{path}: {run['meta']['command']}\n\n{markdown(run['results'])}")
            print("\n".join(f"- {line}" for line in targets(run["results"])) + "\n")
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.smoke_test:
        args.requests, args.concurrency = 60, [1, 4]
        catalogs = [replace(SL.synthetic(), name="builtin")]
    else:
        catalogs = [builtin_catalog() if c == "builtin" else SL.load_gowalla(args.data / "gowalla") for c in args.catalogs]
    import ray

    started, load_before = time.perf_counter(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdray-ingress-bench-") as tmp:
        ckpts = {(c.name, m): SL.write_checkpoint(c, spec, Path(tmp) / f"{c.name}-{spec['dim']}")
                 for c in catalogs for m, spec in MODELS.items()}
        rng = np.random.default_rng(0)
        users = {c.name: rng.choice(c.user_ids, size=args.requests).tolist() for c in catalogs}
        if "bare" in args.paths:
            for (cat, model), ckpt in ckpts.items():
                levels = bench_bare(ckpt, users[cat], args.concurrency)
                rows.append({"catalog": cat, "model": model, "path": "bare", "levels": levels})
                print(f"  bare     {cat} {model}: {levels[-1]['throughput_rps']:.0f} req/s", flush=True)
        ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
                 log_to_driver=False)
        try:
            for mode in [m for m in args.paths if m != "bare"]:
                for (cat, model), levels in bench_serve(mode, ckpts, users, args.concurrency).items():
                    rows.append({"catalog": cat, "model": model, "path": mode, "levels": levels})
        finally:
            ray.shutdown()
    meta = {"command": " ".join(["python", "benchmarks/serve_ingress.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, no GPU used, shared with other work",
            "ray": ray.__version__, "wall_s": time.perf_counter() - started,
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\n{markdown(rows)}\n" + "\n".join(f"- {line}" for line in targets(rows)) + f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
