"""Mean ± std over seeds of pointwise `kdray run`s, from each run's metrics.json, as JSON and a Markdown table.

    for s in 0 1 2; do
      kdray run --config configs/ml-100k-pointwise.yaml data.path=/path/to/ml-100k runs_dir=RUNS \
          name=ml-100k-pointwise-s$s teacher_train.seed=$s student_train.seed=$s
    done
    python benchmarks/pointwise_seeds.py RUNS/ml-100k-pointwise-s* --out benchmarks/results/ml-100k-pointwise.json

Rows are matched by model name across the runs; a row missing from a run (an interrupted one) is left out of that
run's statistics, and the table says how many seeds each mean covers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("test_auc", "test_logloss", "test_f1@0.5", "test_f1@best", "test_accuracy@best", "test_rmse", "test_mae")


def summarise(run_dirs: list[Path]) -> dict:
    per_model: dict[str, dict[str, list[float]]] = {}
    params: dict[str, int] = {}
    for run in run_dirs:
        for row in json.loads((run / "metrics.json").read_text())["rows"]:
            values = per_model.setdefault(row["model"], {})
            params[row["model"]] = row["n_params"]
            for m in METRICS:
                if isinstance(row.get(m), (int, float)):
                    values.setdefault(m, []).append(float(row[m]))
    return {"runs": [str(r) for r in run_dirs], "params": params,
            "models": {model: {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                   "seeds": len(v), "values": v} for m, v in values.items()}
                       for model, values in per_model.items()}}


def markdown(summary: dict) -> str:
    cols = [m for m in METRICS if any(m in v for v in summary["models"].values())]
    lines = ["| model | params | seeds | " + " | ".join(c.removeprefix("test_") for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for model, values in summary["models"].items():
        seeds = max(v["seeds"] for v in values.values())
        cells = [f"{values[c]['mean']:.4f} ± {values[c]['std']:.4f}" if c in values else "-" for c in cols]
        lines.append(f"| {model} | {summary['params'][model]:,} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.json")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.json").is_file()]
    if missing:
        parser.error(f"no metrics.json in {', '.join(missing)} (an unfinished run?)")
    summary = summarise(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
