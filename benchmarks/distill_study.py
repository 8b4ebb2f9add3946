"""Does distillation help? Every distillation loss against the same student trained alone, over several seeds.

For each seed: the teacher (and, for the ensemble row, ``--ensemble`` teachers with consecutive seeds) is trained
once, then the student is trained alone and with each distillation setting, all with the same student settings,
and every model is evaluated once on the test split (full ranking, train and valid items masked). The table reports
mean ± standard deviation over seeds, the gain over the student alone, and the share of the teacher-student gap
recovered: ``(distilled - alone) / (teacher - alone)``.

Everything runs through kdray's own pipeline on Ray Train (one local cluster for the whole study). Usage::

    python benchmarks/distill_study.py --config configs/default.yaml --seeds 0 1 2 --out study.json
    python benchmarks/distill_study.py --config configs/ml-100k.yaml data.path=DATA/ml-100k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.cli import init_ray  # noqa: E402
from kdray.config import load_config, replace  # noqa: E402
from kdray.evaluate import evaluate_checkpoint  # noqa: E402
from kdray.distill import without_distillation  # noqa: E402
from kdray.pipeline import prepare_data, train_stage, train_teachers  # noqa: E402

# name -> overrides of the distillation section (the student and its training settings stay the same)
SETTINGS: dict[str, dict] = {
    "teacher init only (alpha=0)": {"distill.loss": "none", "distill.alpha": 0.0, "distill.init_from_teacher": True},
    "kl (T=2, full catalog)": {"distill.loss": "kl", "distill.temperature": 2.0, "distill.mask_seen": False},
    "kl (T=2, unobserved only)": {"distill.loss": "kl", "distill.temperature": 2.0, "distill.mask_seen": True},
    "rd (top-K, unobserved)": {"distill.loss": "rd", "distill.mask_seen": True},
    "soft_bce (T=2, unobserved)": {"distill.loss": "soft_bce", "distill.temperature": 2.0, "distill.mask_seen": True},
    "mse (unobserved)": {"distill.loss": "mse", "distill.mask_seen": True},
    "rd, ensemble of teachers": {"distill.loss": "rd", "distill.mask_seen": True, "ensemble": True},
}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="rows of SETTINGS to run")
    p.add_argument("--alpha", type=float, default=None, help="distill.alpha for every setting (default: config)")
    p.add_argument("--ensemble", type=int, default=3, help="teachers in the ensemble row")
    p.add_argument("--only-control", action="store_true",
                   help="train only the student alone (e.g. beside a run that trains the teachers); a later full run "
                        "with the same settings reuses it")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    import ray

    base = load_config(a.config, a.overrides)
    metric = f"test_{base.eval.metric}@{base.eval.k}"
    recall = f"test_recall@{base.eval.k}"
    init_ray("local", log_to_driver=False)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {}

    def record(label: str, m: dict) -> None:
        row = results.setdefault(label, {metric: [], recall: []})
        row[metric].append(m[metric])
        row[recall].append(m[recall])
        row.setdefault("n_params", m["n_params"])
        print(f"  {label}: {metric} {m[metric]:.4f} {recall} {m[recall]:.4f}", flush=True)

    for seed in a.seeds:
        # one teacher for every row but the ensemble row, whatever the config's default
        cfg = replace(base, **{"name": f"{base.name}-study-s{seed}", "distill.n_teachers": 1,
                               "distill.teacher_weights": [],
                               "teacher_train.seed": seed, "student_train.seed": seed,
                               **({"distill.alpha": a.alpha} if a.alpha is not None else {})})
        print(f"[seed {seed}] run dir {cfg.run_dir}", flush=True)
        data = prepare_data(cfg)
        ks = base.eval.ks
        if not a.only_control:
            teachers = train_teachers(cfg, data)
            record("teacher", evaluate_checkpoint(teachers[0], data, ks=ks, write=False))
            ensemble = None
            for label in a.settings:
                setting = dict(SETTINGS[label])
                teachers_for = teachers
                if setting.pop("ensemble", False):
                    ens_cfg = replace(cfg, **{"distill.n_teachers": a.ensemble})
                    ensemble = ensemble or train_teachers(ens_cfg, data)
                    teachers_for = ensemble
                    setting["distill.n_teachers"] = a.ensemble
                scfg = replace(cfg, **setting)
                slug = f"{list(SETTINGS).index(label)}-{label.split(' ')[0]}"  # stable across runs: reruns reuse
                out = train_stage(scfg, "student", data, cfg.run_dir / f"student-{slug}", teachers_for)
                record(label, evaluate_checkpoint(out, data, ks=ks, write=False))
        # the control last, so that an --only-control run started beside this one has finished it by then
        control = train_stage(without_distillation(cfg), "student", data, cfg.run_dir / "student_alone", [])
        record("student alone", evaluate_checkpoint(control, data, ks=ks, write=False))

    if a.only_control:
        ray.shutdown()
        return 0
    teacher = statistics.mean(results["teacher"][metric])
    solo = results["student alone"][metric]
    lines = [f"| model | params | {metric} | {recall} | gain vs alone | gap recovered |", "|---|---|---|---|---|---|"]
    for label, row in results.items():
        mean = statistics.mean(row[metric])
        gain = mean - statistics.mean(solo)
        gap = teacher - statistics.mean(solo)
        rec = f"{gain / gap:+.0%}" if label not in ("teacher", "student alone") and gap > 0 else ""
        lines.append(f"| {label} | {row['n_params']:,} | {fmt(row[metric])} | {fmt(row[recall])} | "
                     f"{f'{gain:+.4f}' if label not in ('teacher', 'student alone') else ''} | {rec} |")
    table = "\n".join(lines)
    spread = statistics.stdev(solo) if len(solo) > 1 else float("nan")
    print(f"\n{table}\n\nseeds {a.seeds}; seed-to-seed std of the student alone: {spread:.4f}; "
          f"wall time {time.perf_counter() - t0:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"config": a.config, "overrides": a.overrides, "seeds": a.seeds,
                                           "metric": metric, "results": results, "table": table,
                                           "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
