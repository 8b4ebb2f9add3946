"""What one Ray Train run costs before its first epoch: an empty ``TorchTrainer.fit`` (Ray Train's own floor) against
kdray's tiny training, side by side in one warm local cluster.

    python benchmarks/fit_floor.py --repeats 4 --out benchmarks/results/fit-floor.json   # ~4 min on 2 cores
    python benchmarks/fit_floor.py --repeats 4 --preload torch,ray.train.torch,ray.data,kdray.train.driver \
        --out benchmarks/results/fit-floor-preload.json

Every stage of ``kdray run``, every Tune trial and every seed of ``kdray study`` is one ``TorchTrainer.fit``, and so is
every training in the test suite. Two ways, alternating so that the machine's load falls on both alike:

* ``empty``: a ``TorchTrainer`` with one worker, the tiny training rows as its ``train`` dataset, and a training
  function that reads its shard once and reports one metric: what Ray Train costs whatever the loop does;
* ``kdray``: ``kdray.train.driver.train_model`` on the same rows (120 users, MF-32, 1 epoch): the model, the payload
  through the object store, the epoch, full-ranking validation, the epoch checkpoint and the exported checkpoint.

For each run: the wall seconds, the CPU seconds the whole machine spent (``/proc/stat``, so anything else running
counts too), and how many Ray worker processes started during it (``ray::`` process titles seen in ``/proc``, polled
every 50 ms). Results to ``--out`` as JSON; a summary on stdout. Linux only (``/proc``).

``--preload`` starts the local cluster with the raylet's internal ``preload_python_modules`` setting (not public
API): every worker process Ray starts imports those modules first. Whether that shortens the floor is what the
option measures; the setting is per cluster, so compare two runs of this script, one with it and one without.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from benchmarks.alternating import alternate  # noqa: E402

TINY = ["data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4", "teacher.name=mf",
        "teacher.dim=32", "teacher.hidden=[]", "teacher_train.epochs=1", "teacher_train.batch_size=32",
        "eval.batch_size=64", "distill.n_teachers=1", "teacher_search.enabled=false"]


def busy_cpu_seconds() -> float:
    """CPU seconds the machine has spent on anything but idle and I/O wait since boot (the first line of
    /proc/stat, in clock ticks)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def ray_processes() -> dict[int, str]:
    """pid -> title of every running process whose title Ray set to ``ray::...`` (its workers and actors)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            title = Path(entry.path, "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if title.startswith("ray::"):
            found[int(entry.name)] = title.split()[0]
    return found


class Measured:
    """Runs ``fn`` and records its wall seconds, the machine's busy CPU seconds, and the Ray processes that started
    while it ran (their titles)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, fn: Callable[[], None]) -> float:
        before, seen, stop = set(ray_processes()), {}, threading.Event()

        def poll() -> None:
            while not stop.is_set():
                seen.update({p: t for p, t in ray_processes().items() if p not in before})
                stop.wait(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
        watcher.start()
        try:
            fn()
        finally:
            seconds, cpu = time.perf_counter() - t0, busy_cpu_seconds() - cpu0
            stop.set()
            watcher.join()
        self.records.append({"seconds": seconds, "cpu_seconds": cpu, "processes": sorted(seen.values())})
        return seconds


def empty_train_fn(config: dict) -> None:
    import ray.train

    rows = sum(len(b["user"]) for b in ray.train.get_dataset_shard("train").iter_batches(batch_size=4096))
    ray.train.report({"rows": rows})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4, help="timed runs per way (after one warm-up of each)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preload", default="", help="comma-separated modules every new Ray worker imports first")
    args = ap.parse_args(argv)
    preload = args.preload.split(",") if args.preload else []

    import ray.train
    from ray.train.torch import TorchTrainer

    from kdray.cli import init_ray
    from kdray.config import load_config
    from kdray.data.prepare import TRAIN_BY_USER
    from kdray.pipeline import prepare_data
    from kdray.train.driver import train_model
    from kdray.train.shard import training_rows

    init_ray("local", num_cpus=2, object_store_memory=512 << 20, log_to_driver=False,
             system_config={"preload_python_modules": preload} if preload else None)
    measured = {"empty": Measured(), "kdray": Measured()}
    runs, warmup = itertools.count(), 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*TINY, f"runs_dir={tmp}", "name=floor"])
        data = prepare_data(cfg)

        def empty() -> None:
            TorchTrainer(empty_train_fn, datasets={"train": training_rows(data.path / TRAIN_BY_USER).materialize()},
                         scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=ray.train.RunConfig(name=f"empty-{next(runs)}", storage_path=f"{tmp}/ray")).fit()

        def kdray() -> None:
            name = f"kdray-{next(runs)}"
            train_model(cfg, "teacher", data, out_dir=Path(tmp) / name, name=name)

        alternate({"empty": lambda: measured["empty"](empty), "kdray": lambda: measured["kdray"](kdray)},
                  repeats=args.repeats, warmup=warmup)

    result: dict[str, Any] = {"ways": {}, "machine": f"{platform.node()}, {os.cpu_count()} CPUs, "
                              f"{platform.processor() or platform.machine()}, local Ray with 2 CPUs",
                              "preload": preload,
                              "command": "python benchmarks/fit_floor.py " + " ".join(
                                  argv if argv is not None else sys.argv[1:])}
    for way, m in measured.items():
        timed = m.records[warmup:]
        result["ways"][way] = {
            "seconds": [r["seconds"] for r in timed], "cpu_seconds": [r["cpu_seconds"] for r in timed],
            "median_seconds": statistics.median(r["seconds"] for r in timed),
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in timed),
            "processes_started": [r["processes"] for r in timed]}
    e, k = result["ways"]["empty"], result["ways"]["kdray"]
    result["kdray_over_empty"] = k["median_seconds"] / e["median_seconds"]
    for way, w in result["ways"].items():
        print(f"{way}: median {w['median_seconds']:.1f} s wall, {w['median_cpu_seconds']:.1f} CPU s; "
              f"processes started per run: {[len(p) for p in w['processes_started']]}")
    print(f"kdray's tiny training / empty fit: {result['kdray_over_empty']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
