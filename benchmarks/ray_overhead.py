"""Ray overhead: the same training epoch on Ray Train vs in a plain process, side by side in one run.

Measures, on the same prepared data and the same torch thread count:

1. plain: ``kdray.train.run_epoch`` over a ``LocalShard`` read straight from the Parquet, one process, no Ray;
2. ray-1: ``kdray.train.train_model`` with 1 Train worker (the per-epoch ``train_seconds`` it reports, and the whole
   ``fit()`` wall time, which includes worker start-up and per-epoch validation);
3. ray-2: the same with 2 workers (DDP over gloo) of 1 CPU each, on this 2-core machine;
4. the distillation step vs the student-only step (plain process): one live teacher scoring every batch.

Warm epochs only (the first is dropped). Usage::

    python benchmarks/ray_overhead.py [--users 20000 --items 8000 --interactions 1000000] [--epochs 4] [--out F.json]
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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plain_training import plain_training  # noqa: E402
from kdray.cli import init_ray  # noqa: E402
from kdray.config import load_config  # noqa: E402
from kdray.pipeline import prepare_data  # noqa: E402
from kdray.train.driver import train_model  # noqa: E402


def plain_epochs(cfg, data, role: str, epochs: int, teachers=()) -> list[float]:
    """Seconds per epoch of the shared epoch function in this process, no Ray anywhere."""
    return [seconds for _, seconds in itertools.islice(plain_training(cfg, data, role, teachers), epochs)]


def ray_epochs(cfg, data, role: str, name: str, teachers=()) -> tuple[list[float], float]:
    out = Path(tempfile.mkdtemp(prefix="kdray-bench-"))
    t0 = time.perf_counter()
    outcome = train_model(cfg, role, data, out_dir=out / name, name=f"{name}-{time.time_ns()}",
                          teachers=list(teachers), storage_path=str(out / "ray"))
    return [h["train_seconds"] for h in outcome.history], time.perf_counter() - t0


def warm_mean(times: list[float]) -> float:
    return statistics.mean(times[1:] if len(times) > 1 else times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=8000)
    p.add_argument("--interactions", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import ray

    runs = Path(tempfile.mkdtemp(prefix="kdray-overhead-"))
    common = [f"runs_dir={runs}", f"data.n_users={a.users}", f"data.n_items={a.items}",
              f"data.n_interactions={a.interactions}", "teacher.name=mf", f"teacher.dim={a.dim}", "teacher.hidden=[]",
              f"teacher_train.epochs={a.epochs}", "teacher_train.patience=0", "student.dim=16",
              f"student_train.epochs={a.epochs}", "student_train.patience=0", "ray.threads_per_worker=1"]
    cfg1 = load_config(None, [*common, "ray.num_workers=1", "ray.cpus_per_worker=1"])
    data = prepare_data(cfg1)
    torch.set_num_threads(1)  # the plain process gets the same single thread as one Ray worker
    init_ray("local", num_cpus=2, log_to_driver=False)

    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"ray {ray.__version__}",
                 "data": {"users": data.n_users, "items": data.n_items, "train": data.train.nnz},
                 "model": f"mf dim {a.dim}, batch {cfg1.teacher_train.batch_size} users, full softmax"}
    plain = plain_epochs(cfg1, data, "teacher", a.epochs)
    ray1, ray1_wall = ray_epochs(cfg1, data, "teacher", "ray1")
    cfg_stream = load_config(None, [*common, "ray.num_workers=1", "ray.cpus_per_worker=1", "ray.shard_mode=stream"])
    stream, stream_wall = ray_epochs(cfg_stream, data, "teacher", "stream")
    cfg2 = load_config(None, [*common, "ray.num_workers=2", "ray.cpus_per_worker=1"])
    ray2, ray2_wall = ray_epochs(cfg2, data, "teacher", "ray2")
    res["epoch_seconds"] = {"plain": plain, "ray_1_worker": ray1, "ray_1_worker_stream": stream,
                            "ray_2_workers": ray2}
    res["fit_wall_seconds"] = {"ray_1_worker": ray1_wall, "ray_1_worker_stream": stream_wall,
                               "ray_2_workers": ray2_wall}
    res["ratio_ray1_over_plain"] = warm_mean(ray1) / warm_mean(plain)
    res["ratio_stream_over_memory"] = warm_mean(stream) / warm_mean(ray1)
    res["ratio_ray2_over_ray1"] = warm_mean(ray2) / warm_mean(ray1)

    # the distillation step: a student with one live teacher (scoring every batch) vs the student alone
    teacher_dir = Path(tempfile.mkdtemp(prefix="kdray-teacher-")) / "teacher"
    train_model(load_config(None, [*common, "teacher_train.epochs=1"]), "teacher", data, out_dir=teacher_dir,
                name=f"t-{time.time_ns()}", storage_path=str(runs / "ray"))
    from kdray.checkpoint import load_checkpoint

    teacher = load_checkpoint(teacher_dir).model.eval().requires_grad_(False)
    cfg_alone = load_config(None, [*common, "distill.loss=none", "distill.alpha=0"])
    cfg_rd = load_config(None, [*common, "distill.loss=rd", "distill.alpha=0.5"])
    alone_t = plain_epochs(cfg_alone, data, "student", a.epochs)
    rd_t = plain_epochs(cfg_rd, data, "student", a.epochs, [teacher])
    res["student_epoch_seconds"] = {"alone": alone_t, "distill_rd_live_teacher": rd_t}
    res["ratio_distill_over_alone"] = warm_mean(rd_t) / warm_mean(alone_t)
    ray.shutdown()
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
