"""Fixed cost of one training on Ray Train: how kdray hands the training rows to Ray Data.

Every stage of ``kdray run`` and every Tune trial is one ``TorchTrainer.fit``. On small data its time is mostly
fixed cost (actors starting, the dataset reaching the workers), not epochs. This times tiny trainings (120 users,
1 epoch) in one warm local cluster, alternating two ways of building the Ray Dataset, so that both see the same
machine load:

* ``from_arrow`` (kdray's way, ``kdray.train.shard.training_rows``): the driver reads the prepared parquet file and
  hands the table to Ray Data in memory;
* ``read_parquet``: ``ray.data.read_parquet(path)``, whose list and read tasks are scheduled on the cluster.

    python benchmarks/train_startup.py --repeats 5 --out benchmarks/results/train-startup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kdray.train.driver as driver  # noqa: E402
from kdray.cli import init_ray  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.train.shard import training_rows  # noqa: E402

TINY = ["data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4", "teacher.dim=32",
        "teacher_train.epochs=1", "teacher_train.batch_size=32", "eval.batch_size=64", "distill.n_teachers=1"]


def read_parquet_rows(path: Path):
    import ray.data

    return ray.data.read_parquet(str(path))


WAYS = {"from_arrow": training_rows, "read_parquet": read_parquet_rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="trainings per way (after one warm-up of each)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    init_ray("local", num_cpus=2, object_store_memory=512 << 20, log_to_driver=False)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*TINY, f"runs_dir={tmp}", "name=startup"])
        data = prepare_data(cfg)
        try:
            for i in range(args.repeats + 1):  # round 0 warms the cluster's worker pool up and is not counted
                for way, rows in WAYS.items():
                    driver.training_rows = rows  # the name _ranking_setup calls
                    t0 = time.perf_counter()
                    driver.train_model(cfg, "teacher", data, out_dir=Path(tmp) / f"{way}-{i}", name=f"{way}-{i}")
                    if i:
                        seconds[way].append(time.perf_counter() - t0)
                    print(f"{way} round {i}: {time.perf_counter() - t0:.1f} s{' (warm-up)' if not i else ''}",
                          flush=True)
        finally:
            driver.training_rows = training_rows
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    result = {"seconds": seconds, "median_s": medians,
              "read_parquet_over_from_arrow": medians["read_parquet"] / medians["from_arrow"],
              "machine": f"{platform.node()}, {platform.processor() or platform.machine()}, 2-CPU local Ray",
              "command": "python benchmarks/train_startup.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"median seconds per tiny training: from_arrow {medians['from_arrow']:.1f}, read_parquet "
          f"{medians['read_parquet']:.1f} ({medians['read_parquet'] - medians['from_arrow']:+.1f} s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
