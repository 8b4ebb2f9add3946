"""What a search leaves behind: leaderboard rows, the winner rule, the Markdown report and the Pareto plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdray.checkpoint import is_complete
from kdray.config import Config
from kdray.distill import CONTROL
from kdray.layout import RunLayout
from kdray.tune.asha import grace_period
from kdray.tune.space import ARMS, plain_value, role_of, trial_config

STOPPED = ".stopped"  # RUN/tune/trials/ARM/TRIAL.stopped: the trial ended because ASHA stopped it


def trial_status(result: Any, export_root: Path) -> str:
    """How a trial ended, from what it left: ``completed`` (its export), ``stopped early`` (by ASHA: the marker
    :func:`_trial` writes), ``error``, or ``unfinished`` (the search was interrupted; Tune's own status cannot
    tell: it marks trials it stopped on Ctrl+C as terminated)."""
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    if result.error is not None:
        return "error"
    if is_complete(export_root / trial_id):
        return "completed"
    if (export_root / f"{trial_id}{STOPPED}").is_file():
        return "stopped early"
    return "unfinished"


def _architecture_stats(cfg: Config, data: Any, cache: dict, role: str = "student") -> tuple[int, float]:
    """Parameters and scoring latency (ms per 1000 users, whole catalog) of a trial's model architecture."""
    from kdray.evaluate import scoring_latency_ms
    from kdray.models import count_parameters, model_from_config

    m = cfg.teacher if role == "teacher" else cfg.student
    key = (m.name, m.dim, tuple(m.hidden))
    if key not in cache:
        student = model_from_config(m, data)
        cache[key] = (count_parameters(student), scoring_latency_ms(student))
    return cache[key]


def leaderboard_rows(grid: Any, arm: str, cfg: Config, data: Any, teacher_n: int, cache: dict,
          distill_keys: list[str]) -> list[dict[str, Any]]:
    """One leaderboard row per trial; status as :func:`trial_status` (``completed`` covers the training loop's own
    early stop on ``patience``)."""
    from kdray.train.loop import FAILURE_KEY

    metric = cfg.select_metric
    export_root = RunLayout(cfg.run_dir.expanduser().resolve()).tune_trials(arm)
    rows = []
    for result in grid:
        params = {k: plain_value(v) for k, v in (result.config or {}).items()}
        n_params, latency = _architecture_stats(trial_config(cfg, params, arm), data, cache, role_of(arm))
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        export = export_root / trial_id
        status = trial_status(result, export_root)
        exported = status == "completed"
        if arm == "alone":  # the control's distillation settings, for the columns the distilled arm fills
            params.update({k: CONTROL.get(k, "-") for k in distill_keys})
        rows.append({
            "arm": arm, "trial": trial_id, "status": status, "epochs": int(m.get("epoch", 0)),
            # a trial whose loss became non-finite last reported FAILED_SCORE, a marker and no validation result
            f"valid_{metric}": float("nan") if FAILURE_KEY in m else float(m.get("best", m.get(metric, float("nan")))),
            f"test_{metric}": float("nan"),
            "n_params": n_params, "params_ratio": n_params / teacher_n, "latency_ms_per_1000_users": latency,
            **{k: params[k] for k in sorted(params)},
            "checkpoint": str(export) if exported else "",
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
        })
    return rows


def choose_winner(rows: list[dict[str, Any]], metric: str, max_params_ratio: float) -> dict[str, Any] | None:
    """The rule: the highest validation ``metric`` (the best epoch's) among trials that completed with an exported
    checkpoint and have at most ``max_params_ratio`` of the teacher's parameters; ties go to the smaller model.
    Trials ASHA stopped are not candidates (they lagged at a rung); the test split plays no part."""
    eligible = [r for r in rows if r["checkpoint"] and r["params_ratio"] <= max_params_ratio + 1e-12
                and math.isfinite(r[f"valid_{metric}"])]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r[f"valid_{metric}"], -r["n_params"]))


def write_leaderboard(rows: list[dict[str, Any]], out_dir: Path, metric: str) -> None:
    """``leaderboard.csv`` (every column) and ``leaderboard.md`` (without paths), best validation first."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows).sort_values(f"valid_{metric}", ascending=False, na_position="last")
    frame.to_csv(out_dir / "leaderboard.csv", index=False)
    shown = frame.drop(columns=["checkpoint"]).rename(columns={"latency_ms_per_1000_users": "ms/1k users"})
    (out_dir / "leaderboard.md").write_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n")


def pareto_plot(rows: list[dict[str, Any]], teachers: list[dict[str, Any]], path: Path, metric: str,
                winner: dict[str, Any] | None = None) -> None:
    """Validation metric against parameter count: every trial by arm and status, the teacher(s), the winner, and the
    Pareto front (the best validation metric reachable at each size or below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"valid_{metric}"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, marker, color, label in (("distilled", "o", "tab:blue", "student, distilled"),
                                      ("alone", "s", "tab:orange", "student alone (no distillation)")):
        for stopped in (False, True):
            pts = [(r["n_params"], r[key]) for r in rows if r["arm"] == arm and math.isfinite(r[key])
                   and (r["status"] == "stopped early") == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=36, alpha=0.85 if not stopped else 0.6,
                           facecolors=color if not stopped else "none", edgecolors=color,
                           label=label + (" (stopped early by ASHA)" if stopped else ""))
    front, best = [], -math.inf
    for r in sorted((r for r in rows if math.isfinite(r[key])), key=lambda r: r["n_params"]):
        if r[key] > best:
            best = r[key]
            front.append((r["n_params"], r[key]))
    if front:
        ax.step(*zip(*front), where="post", color="gray", linestyle="--", linewidth=1, label="Pareto front (trials)")
    ax.scatter([t["n_params"] for t in teachers], [t[key] for t in teachers], marker="*", s=260, color="tab:red",
               label="teacher" if len(teachers) == 1 else f"teachers (ensemble of {len(teachers)})")
    if winner is not None:
        ax.scatter([winner["n_params"]], [winner[key]], marker="o", s=180, facecolors="none", edgecolors="black",
                   linewidths=1.5, label=f"winner ({winner['arm']})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"validation {metric.upper()}")
    ax.set_title("kdray search: validation quality against size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(cfg: Config, data: Any, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    metric = summary["metric"]
    lines = ["| model | trial | params | size vs teacher | valid " + metric + " | test " + metric
             + " | test recall@10 | ms / 1k users |", "|---|---|---|---|---|---|---|---|"]
    for t in summary["teachers"]:
        lines.append(f"| {t['model']} | - | {t['n_params']:,} | {100 * t['n_params'] / summary['teachers'][0]['n_params']:.0f}% | "
                     f"{t[f'valid_{metric}']:.4f} | {t[f'test_{metric}']:.4f} | "
                     f"{t.get('test_recall@10', float('nan')):.4f} | {t['latency_ms_per_1000_users']:.1f} |")
    for arm in ARMS:
        r = summary["best"][arm]
        if r is None:
            lines.append(f"| best {arm} | none completed within the budget | | | | | | |")
            continue
        lines.append(f"| best {arm}{' (winner)' if r['trial'] == summary['winner']['trial'] else ''} | {r['trial']} | "
                     f"{r['n_params']:,} | {100 * r['params_ratio']:.1f}% | {r[f'valid_{metric}']:.4f} | "
                     f"{r[f'test_{metric}']:.4f} | {r['test'].get('test_recall@10', float('nan')):.4f} | "
                     f"{r['latency_ms_per_1000_users']:.1f} |")
    per_arm = ", ".join(f"{arm} {summary['trials'][arm]} trials ({summary['stopped_early'][arm]} stopped early by "
                        f"ASHA, {summary['errored'][arm]} failed)" for arm in ARMS)
    n_teachers = len(summary["teachers"])
    return (
        f"# kdray search `{cfg.name}`\n\n"
        f"Data: `{cfg.data.source}` ({data.n_users:,} users, {data.n_items:,} items). Teacher: `{cfg.teacher.name}` "
        f"dim {cfg.teacher.dim}{f' x {n_teachers} (an ensemble, distilled as one)' if n_teachers > 1 else ''}, "
        f"trained once before the search. Student: `{cfg.student.name}`; sizes are relative to one teacher.\n\n"
        f"Search: {per_arm}; ASHA on validation {metric} per epoch (grace "
        f"{grace_period(cfg, cfg.student_train.epochs)}, reduction {cfg.tune.reduction_factor}, at most "
        f"{cfg.student_train.epochs} epochs), {cfg.tune.searcher} search, "
        f"at most {cfg.tune.max_concurrent_trials} trial(s) at a time, {cfg.ray.num_workers} worker(s) x "
        f"{cfg.ray.cpus_per_worker:g} CPU per trial. The control arm searches the same space without the "
        "`distill.*` dimensions, with the same number of trials.\n\n"
        f"Winner rule: the best validation {metric} among completed trials with at most "
        f"{summary['max_params_ratio']} of the teacher's parameters; only each arm's best is evaluated on the test "
        f"split, once.\n\n" + "\n".join(lines) + "\n\n"
        f"Every trial: `leaderboard.md` / `leaderboard.csv`; plot: `pareto.png`. Wall time {summary['seconds']:.0f} s"
        f"{' (this session, resumed)' if summary['resumed'] else ''}.\n")
