"""BENCHMARKS.md's equal-budget tables and the compression frontier, generated from ``kdray study``'s results.

Reads every ``benchmarks/results/<dataset>-d<dim>.json`` (written by ``kdray study``) and

* replaces the block between ``<!-- study:begin -->`` and ``<!-- study:end -->`` in BENCHMARKS.md (appended at the
  end, with its markers, when the file has none) with one table per dataset: each student size against the tuned
  teacher, the student alone and the distilled student (test mean ± std over seeds), the gain, the share of the
  teacher-alone gap recovered, whether the gain exceeds 2x the larger seed std, and whether the tuned teacher beat
  the tuned student alone on validation; and, for studies run with ``study.losses``, one row per distillation loss,
  each tuned with the same budget against the same teacher and student alone;
* draws per dataset the compression frontier, test metric against parameter count for every student size and the
  teacher, tuned alone against tuned distilled: ``benchmarks/results/<dataset>-frontier.png``;
* replaces the block between ``<!-- teachers:begin -->`` and ``<!-- teachers:end -->`` (only where BENCHMARKS.md
  has those markers) with the table of trained models recorded by ``kdray eval --output`` under
  ``benchmarks/results/teachers/``: Gowalla's teachers, with what each trained on and its test metrics.

Nothing is computed here that the study did not record, except means and stds of its per-seed lists. Usage::

    python benchmarks/study_report.py [--results benchmarks/results] [--benchmarks BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdray.layout import atomic_write_text  # noqa: E402
from kdray.tune.study import compare  # noqa: E402

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
TEACHERS_BEGIN, TEACHERS_END = "<!-- teachers:begin -->", "<!-- teachers:end -->"
ROOT = Path(__file__).resolve().parent.parent


def load_results(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """dataset -> its studies, smallest student first."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*-d*.json")):
        result = json.loads(path.read_text())
        if not {"dataset", "student_dim", "arms"} <= result.keys():  # another benchmark's results
            continue
        by_dataset.setdefault(result["dataset"], []).append(result)
    return {d: sorted(rs, key=lambda r: r["student_dim"]) for d, rs in sorted(by_dataset.items())}


def main_loss(result: dict[str, Any]) -> str:
    """The loss of a study's ``distilled`` arm (studies written before ``loss`` was recorded used rd)."""
    return result.get("loss", "rd")


def given(result: dict[str, Any]) -> bool:
    """Whether the study's teacher was given (``study.teacher``) rather than tuned by the study."""
    return bool(result.get("teacher_given"))


def given_label(result: dict[str, Any]) -> str:
    """How a table names a given teacher: "given", or "given ensemble of N" for several given models."""
    n = len(result.get("teacher_members", [])) or 1
    return "given" if n == 1 else f"given ensemble of {n}"


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if not math.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def dataset_table(results: list[dict[str, Any]]) -> str:
    """One row per student size: every number from the study's per-seed lists (:func:`kdray.tune.study.compare`)."""
    metric = results[0]["metric"]
    lines = [(f"| student dim | params (student / teacher) | teacher {metric} | alone | distilled | loss | gain | "
              "gap recovered | gain > 2x seed std | teacher > alone on valid | seeds | trials per arm | ASHA grace |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = compare(r["arms"]["teacher"], r["arms"]["alone"], r["arms"]["distilled"])
        p = r["params"]
        recovered = "no gap" if c["gap_recovered"] is None else f"{c['gap_recovered']:.1%}"
        # a given teacher (study.teacher) had none of the study's trials: the student arms' budget is the one shown
        trials = sorted({n for arm, n in r["budget"]["trials"].items() if arm != "teacher" or not given(r)})
        teacher = _pm(c["mean"]["teacher"], c["std"]["teacher"]) + (f" ({given_label(r)})" if given(r) else "")
        lines.append(
            f"| {r['student_dim']} | {p['student']:,} / {p['teacher']:,} ({p['student'] / p['teacher']:.1%}) | "
            f"{teacher} | {_pm(c['mean']['alone'], c['std']['alone'])} | "
            f"{_pm(c['mean']['distilled'], c['std']['distilled'])} | {main_loss(r)} | {c['gain']:+.4f} | "
            f"{recovered} | "
            f"{'yes' if c['significant'] else 'no'} | {'yes' if r['teacher_beats_alone_on_valid'] else '**no**'} | "
            f"{len(r['arms']['alone'])} | {', '.join(map(str, trials))} | {r['budget']['scheduler']['grace_period']} |")
    return "\n".join(lines)


def losses_table(results: list[dict[str, Any]]) -> str | None:
    """The distillation losses under the protocol (studies with ``study.losses``): per student size, the main loss
    and each extra one, with its validation winner, test score, gain over the student alone and share of the gap.
    None when no study compared losses."""
    if not any(r.get("losses") for r in results):
        return None
    metric = results[0]["metric"]
    lines = [f"| student dim | distillation loss | best trial, validation | distilled {metric} | gain vs alone | "
             "gap recovered | gain > 2x seed std |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("losses"):
            continue
        main = {"arms": r["arms"]["distilled"], "winner_valid": r["valid"]["winners"]["distilled"]}
        for loss, arm in [(main_loss(r) + " (main)", main), *r["losses"].items()]:
            c = compare(r["arms"]["teacher"], r["arms"]["alone"], arm["arms"])
            recovered = "no gap" if c["gap_recovered"] is None else f"{c['gap_recovered']:.1%}"
            lines.append(f"| {r['student_dim']} | {loss} | {arm['winner_valid']:.4f} | "
                         f"{_pm(c['mean']['distilled'], c['std']['distilled'])} | {c['gain']:+.4f} | {recovered} | "
                         f"{'yes' if c['significant'] else 'no'} |")
    return "\n".join(lines)


def frontier_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frontier's points: each study's teacher, alone, and one ``distilled-<loss>`` point per distillation loss,
    the main one (``loss``) and each extra one: studies of one data set may have different main losses.

    Studies of one data set whose teachers score the same seed for seed (the shared teacher arm, one given teacher,
    or a seeded search that picked the same teacher again) show that teacher once; ``student_dims`` lists them."""
    rows = []
    teachers: dict[tuple, dict[str, Any]] = {}  # (params, per-seed scores, given, label) -> that teacher's row
    for r in results:
        arms = {"teacher": r["arms"]["teacher"], "alone": r["arms"]["alone"],
                f"distilled-{main_loss(r)}": r["arms"]["distilled"]}
        arms.update({f"distilled-{loss}": extra["arms"] for loss, extra in r.get("losses", {}).items()})
        for arm, values in arms.items():
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            row = {"arm": arm, "student_dim": r["student_dim"], "student_dims": [r["student_dim"]],
                   "given": arm == "teacher" and given(r), "label": given_label(r),
                   "params": r["params"]["teacher" if arm == "teacher" else "student"], "mean": mean, "std": std}
            if arm == "teacher":
                key = (row["params"], tuple(values), row["given"], row["label"])
                if key in teachers:
                    teachers[key]["student_dims"].append(r["student_dim"])
                    continue
                teachers[key] = row
            rows.append(row)
    return rows


def frontier_plot(dataset: str, results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frontier_rows(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    distilled = sorted({r["arm"] for r in rows} - {"teacher", "alone"})
    lines = [("alone", "s-", "student alone (tuned)"),
             *((arm, "o^vD<>"[i % 6] + "-", f"distilled, {arm.split('-', 1)[1]} (tuned)")
               for i, arm in enumerate(distilled)),
             ("teacher", "*", "teacher (given)" if all(r["given"] for r in rows if r["arm"] == "teacher")
              else "teacher (tuned)")]
    for arm, style, label in lines:
        pts = sorted((r["params"], r["mean"], r["std"]) for r in rows if r["arm"] == arm)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style, capsize=3,
                    markersize=12 if arm == "teacher" else 6, label=label)
    for r in rows:
        if r["arm"] == "alone":
            ax.annotate(f"d={r['student_dim']}", (r["params"], r["mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(results[0]["metric"] + " (mean ± std over seeds)")
    ax.set_title(f"{dataset}: compression frontier under the equal-budget protocol")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _point_label(row: dict[str, Any]) -> str:
    if row["arm"] == "teacher":
        dims = sorted(row["student_dims"])
        studies = f"study d={dims[0]}" if len(dims) == 1 else "studies d=" + ", ".join(map(str, dims))
        return f"teacher ({row['label'] + ', ' if row['given'] else ''}{studies})"
    return f"{row['arm']} d={row['student_dim']}"


def shown_command(command: str) -> str:
    """A study's recorded command as the report prints it: the data folder of the machine it ran on becomes
    ``DATA/<name>``, a given teacher ``TEACHER``, and where that machine put its runs and results (``runs_dir``,
    ``study.results_dir``, which change no number) is left out, so that the tables name no local path."""
    command = re.sub(r"data\.path=(\S*/)?([^/\s]+)/?(?=\s|$)", r"data.path=DATA/\2", command)
    command = re.sub(r"\s+(runs_dir|study\.results_dir)=\S+", "", command)
    # a list of directories (a given ensemble, quoted by shlex: 'study.teacher=[A, B]') names each member
    command = re.sub(r"'study\.teacher=\[([^]]*)\]'", lambda m: "'study.teacher=[" + ", ".join(
        f"TEACHER{i + 1}" for i in range(len(m.group(1).split(",")))) + "]'", command)
    return re.sub(r"study\.teacher=(?!\[)\S+", "study.teacher=TEACHER", command)


def block(by_dataset: dict[str, list[dict[str, Any]]], results_dir: Path) -> str:
    """The generated Markdown: per dataset its table, its frontier table and plot, and the commands."""
    parts = [BEGIN, "<!-- generated by benchmarks/study_report.py from benchmarks/results/*.json: do not edit -->"]
    for dataset, results in by_dataset.items():
        frontier = sorted(frontier_rows(results), key=lambda r: (r["params"], r["arm"]))
        table = ["| model | params | " + results[0]["metric"] + " |", "|---|---|---|"]
        table += [f"| {_point_label(r)} | {r['params']:,} | {_pm(r['mean'], r['std'] or math.nan)} |"
                  for r in frontier]
        try:
            png = (results_dir / f"{dataset}-frontier.png").resolve().relative_to(ROOT)
        except ValueError:
            png = results_dir / f"{dataset}-frontier.png"
        # the arms of one size always share a budget; sizes of one data set need not (a costly data set's studies)
        budgets = {(r["budget"]["trials"]["alone"], r["budget"].get("epochs")) for r in results}
        frontier_intro = ("\nThe compression frontier (every point tuned with the same budget):\n" if len(budgets) == 1
                          else "\nThe compression frontier (the two student arms of each size tuned with the same "
                               "budget; the sizes' budgets differ, see the table's trials per arm):\n")
        parts += [f"\n### {dataset}\n", dataset_table(results)]
        losses = losses_table(results)
        if losses:
            parts += ["\nDistillation losses, each its own distilled arm with the same budget (`study.losses`):\n",
                      losses]
        parts += [frontier_intro, "\n".join(table),
                  f"\n![{dataset} frontier]({png})\n", "Commands:\n"]
        commands = [shown_command(r["command"]) for r in results if r.get("command")]
        if any("DATA/" in c for c in commands):
            parts.append("(DATA is the folder holding the data sets.)\n")
        if any("study.teacher=TEACHER" in c or "study.teacher=[TEACHER" in c for c in commands):
            parts.append("(TEACHER is the given teacher's checkpoint directory, `RUN/teacher` of its `kdray teacher` "
                         "run, TEACHER1, TEACHER2, ... those of a given ensemble's members; the section above gives "
                         "the runs' commands.)\n")
        parts += [f"    {c}" for c in commands]
    parts.append(END)
    return "\n".join(parts) + "\n"


def load_model_records(results_dir: Path) -> list[dict[str, Any]]:
    """The ``kdray eval --output`` records under ``results_dir/teachers/``, by the pairs they trained on, then size
    (an ensemble after its members)."""
    records = [json.loads(p.read_text()) for p in sorted((results_dir / "teachers").glob("*.json"))]
    return sorted(records, key=lambda r: (max(m["pairs"]["trained_on"] for m in r.get("members", [r])),
                                          r["n_params"]))


def _model_cells(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """One trained model's cells: what it is, its training settings, what it trained on, the graph it ranked the
    test split over, its epochs."""
    m, t, p, tr = r["model"], r["train"], r["pairs"], r["trained"]
    share = p["trained_on"] / (p["train"] + p["valid"])  # of the evaluation's training + validation pairs
    seen = "train + valid" if p["trained_on"] == p["train"] + p["valid"] else "train"
    # records written since kdray eval ranks a graph model over every pair the test masks carry test_graph_pairs;
    # older ones ranked over the model's own training graph
    graph = "train + valid" if "test_graph_pairs" in r else seen if m["name"] == "lightgcn" else "none"
    cosine = f", cosine / {m['cosine_temperature']:g}" if m.get("cosine_temperature") else ""  # 0 or absent: dot
    return (f"{m['name']}-{m['dim']}{cosine} (seed {t['seed']})",
            f"{t['lr']:g} / {t['embedding_l2']:g} / {t['batch_size']:,}",
            f"{p['trained_on']:,} ({seen}, {100 * share:.0f}%)",
            graph,
            f"{tr.get('best_epoch', '?')} / {tr.get('epochs_run', '?')}")


def models_block(records: list[dict[str, Any]]) -> str:
    """The trained models' table (Gowalla's teachers): what each is, what it trained on, its validation NDCG (on its
    own split: comparable between models of one split only) and test metrics at the largest K the records share,
    and the ``kdray eval`` command of each."""
    ks = set.intersection(*({int(k.split("@")[1]) for k in r["test"] if k.startswith("test_ndcg@")} for r in records))
    k = max(ks)
    head = ["model", "lr / embedding_l2 / batch", "trained on (pairs)", "graph at test", "epochs (best / run)",
            "params", f"valid NDCG@{k}", f"test Recall@{k}", f"test NDCG@{k}"]
    lines = [TEACHERS_BEGIN, "<!-- generated by benchmarks/study_report.py from benchmarks/results/teachers/*.json "
             "(kdray eval --output): do not edit -->", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        # an ensemble (kdray eval with several --checkpoint) joins its members' cells with " + "
        cells = [_model_cells(m) for m in r.get("members", [r])]
        label = " + ".join(c[0] for c in cells)
        joined = [" + ".join(dict.fromkeys(c[i] for c in cells)) for i in (1, 2, 3, 4)]  # equal cells once
        # on the model's own validation split (none for a refit; an ensemble's as one, in records that have it)
        valid = (r.get("valid", {}) if "members" in r else r["trained"]).get(f"valid_ndcg@{k}")
        lines.append(f"| {'ensemble: ' if 'members' in r else ''}{label} | {' | '.join(joined)} | "
                     f"{r['n_params']:,} | {'—' if valid is None else f'{valid:.4f}'} | "
                     f"{r['test'][f'test_recall@{k}']:.4f} | {r['test'][f'test_ndcg@{k}']:.4f} |")
    lines += ["", "Commands (CKPT is the model's `RUN/teacher`):", ""]
    lines += [f"    {re.sub(r'--checkpoint [^ ]+', '--checkpoint CKPT', shown_command(r['command']))}"
              for r in records]
    return "\n".join([*lines, TEACHERS_END])


def splice(text: str, begin: str, end: str, new_block: str) -> str | None:
    """``text`` with the block from ``begin`` to ``end`` replaced by ``new_block``, or None without such a block."""
    start, stop = text.find(begin), text.find(end)
    if start == -1 or stop == -1 or stop < start:
        return None
    return text[:start] + new_block.rstrip("\n") + text[stop + len(end):]


def replace_block(text: str, new_block: str) -> str:
    """``text`` with the marked block replaced by ``new_block`` (or ``new_block`` appended)."""
    spliced = splice(text, BEGIN, END, new_block)
    if spliced is None:
        return text.rstrip("\n") + "\n\n## Equal-budget studies (`kdray study`)\n\n" + new_block
    return spliced


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args(argv)
    by_dataset = load_results(a.results)
    if not by_dataset:
        print(f"no study results in {a.results}; run kdray study first", file=sys.stderr)
        return 2
    for dataset, results in by_dataset.items():
        frontier_plot(dataset, results, a.results / f"{dataset}-frontier.png")
    text = replace_block(a.benchmarks.read_text() if a.benchmarks.is_file() else "", block(by_dataset, a.results))
    records = load_model_records(a.results)
    if records:  # the trained models' table sits where its markers are (Gowalla's section), and nowhere else
        text = splice(text, TEACHERS_BEGIN, TEACHERS_END, models_block(records)) or text
    atomic_write_text(a.benchmarks, text)
    print(f"{sum(map(len, by_dataset.values()))} studies of {len(by_dataset)} dataset(s)"
          f"{f' and {len(records)} trained models' if records else ''} -> {a.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
