"""Scale: the whole pipeline (generate, prepare, teacher, student, test evaluation) on growing synthetic data.

Users and items grow with the interactions at MovieLens-20M's proportions (20M interactions: 138,493 users,
26,744 items). A background thread samples the machine's used memory every 0.5 s, so the peak includes the Ray
workers, the object store and the driver. One epoch per model keeps the run bounded; the point is that it completes
on a 24 GB machine and how time grows, not the quality.

    python benchmarks/scale.py --interactions 2000000 5000000 20000000 --out scale.json
    python benchmarks/scale.py --config configs/default.yaml      # `kdray run` on the default data: time, memory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.cli import init_ray  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.pipeline import run_pipeline  # noqa: E402

ML20M = (20_000_263, 138_493, 26_744)


def used_bytes() -> int:
    """Memory in use on the machine (MemTotal - MemAvailable), read from /proc/meminfo (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])) * 1024


class PeakMemory:
    def __init__(self) -> None:
        self.base = used_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, used_bytes())

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, nargs="+", default=[2_000_000, 20_000_000])
    p.add_argument("--config", default=None,
                   help="measure `kdray run` with this config (e.g. configs/default.yaml) instead of the size sweep")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import ray

    init_ray("local", log_to_driver=False)
    rows = []
    if a.config:
        runs = Path(tempfile.mkdtemp(prefix="kdray-scale-"))
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            run_pipeline(load_config(a.config, [f"runs_dir={runs}"]), log=lambda s: print(s, flush=True))
        rows.append({"config": a.config, "seconds": time.perf_counter() - t0, "peak_used_gb": mem.peak / 2**30,
                     "peak_over_idle_gb": (mem.peak - mem.base) / 2**30})
    for n in ([] if a.config else a.interactions):
        users = max(100, round(ML20M[1] * n / ML20M[0]))
        items = max(100, round(ML20M[2] * (n / ML20M[0]) ** 0.5))  # catalogs grow slower than activity
        runs = Path(tempfile.mkdtemp(prefix="kdray-scale-"))
        cfg = load_config(None, [
            f"runs_dir={runs}", f"name=scale-{n}", f"data.n_users={users}", f"data.n_items={items}",
            f"data.n_interactions={n}", "teacher.name=mf", "teacher.dim=64", "teacher.hidden=[]", "student.dim=16",
            "teacher_train.epochs=1", "student_train.epochs=1", "teacher_train.batch_size=1024",
            "student_train.batch_size=1024", "distill.n_teachers=1", "ray.num_workers=1", "ray.cpus_per_worker=2",
            "ray.threads_per_worker=2"])
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            report = run_pipeline(cfg, log=lambda s: print(s, flush=True))
        row = {"interactions": n, "users": users, "items": items, "seconds": time.perf_counter() - t0,
               "peak_used_gb": mem.peak / 2**30, "peak_over_idle_gb": (mem.peak - mem.base) / 2**30,
               "teacher_train_s": report.rows[0]["train_seconds"], "student_train_s": report.rows[1]["train_seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ray.shutdown()
    text = json.dumps(rows, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
