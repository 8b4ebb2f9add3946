"""How popular, in the training split, are the items a model is picked on (validation) and scored on (test)?

    python benchmarks/split_popularity.py --data-root DATA --out benchmarks/results/split-popularity.json

Each data set is prepared exactly as its config prepares it (configs/gowalla.yaml, configs/ml-100k.yaml: the same
filters, splits and seed), into a temporary folder. For the validation and test pairs it prints the training
popularity of their items (interactions in the training split): mean, median, and the share of pairs whose item is
among the 1% and 10% most popular items. When validation is carved at random from the same pool as training (as
kdray does for Gowalla's train.txt) while the test set comes from elsewhere (Gowalla's test.txt), the two can
differ, and a setting that favours popular items (more regularisation) can then rank lower on validation than on
test. It also prints what ``kdray run`` and ``kdray study`` report: the relative difference of the means, its z-score,
and whether that is past the reports' threshold (``PreparedData.popularity_shift``). Results to ``--out`` as JSON; a
table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.config import load_config  # noqa: E402
from kdray.data.prepare import popularity_note, prepare  # noqa: E402
from kdray.sparse import Csr  # noqa: E402

DATASETS = {"gowalla": "configs/gowalla.yaml", "ml-100k": "configs/ml-100k.yaml"}  # folder -> config


def popularity_stats(items: np.ndarray, popularity: np.ndarray) -> dict[str, float]:
    """Training popularity of ``items`` (item ids, one per pair or recommendation): mean, median, and the share
    among the 1% and 10% most popular items of the catalog."""
    pop = popularity[items]
    order = np.sort(popularity)[::-1]
    top1, top10 = (order[max(int(len(order) * share), 1) - 1] for share in (0.01, 0.10))
    return {"mean": float(pop.mean()), "median": float(np.median(pop)),
            "share_top1pct": float((pop >= top1).mean()), "share_top10pct": float((pop >= top10).mean())}


def popularity_of(pairs: Csr, popularity: np.ndarray) -> dict[str, float]:
    """Training popularity of the items of ``pairs`` (one value per pair)."""
    return {"pairs": int(pairs.indices.size), **popularity_stats(pairs.indices, popularity)}


def measure(config: Path, folder: Path) -> dict[str, Any]:
    cfg = load_config(config, [f"data.path={folder}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(cfg.data, Path(tmp))
    popularity, shift = data.item_popularity(), data.popularity_shift()
    return {"config": str(config.relative_to(REPO)), "split": cfg.data.split,
            "split_ratios": list(cfg.data.split_ratios), "seed": cfg.data.seed,
            "valid": popularity_of(data.valid, popularity), "test": popularity_of(data.test, popularity),
            # what kdray run / kdray study report (PreparedData.popularity_shift, popularity_note)
            "shift": shift, "flagged": popularity_note(shift) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding ml-100k/ and gowalla/")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"command": "python benchmarks/split_popularity.py --data-root DATA"
                               + (f" --out {args.out}" if args.out else ""), "datasets": {}}
    print(f"{'data set':<9} {'split':<6} {'pairs':>8} {'mean pop':>9} {'median':>7} {'top 1%':>7} {'top 10%':>8}")
    for name, config in DATASETS.items():
        folder = args.data_root / name
        if not folder.is_dir():
            print(f"{name:<9} MISSING: no folder {folder} (pass --data-root)")
            continue
        r = results["datasets"][name] = measure(REPO / config, folder)
        for split in ("valid", "test"):
            s = r[split]
            print(f"{name:<9} {split:<6} {s['pairs']:>8,} {s['mean']:>9.1f} {s['median']:>7.0f} "
                  f"{s['share_top1pct']:>7.1%} {s['share_top10pct']:>8.1%}")
        print(f"{name:<9} test against valid: {r['shift']['relative']:+.1%}, z {r['shift']['z']:.1f}; "
              f"{'flagged' if r['flagged'] else 'not flagged'} by kdray's reports")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results["datasets"] else 1


if __name__ == "__main__":
    sys.exit(main())
