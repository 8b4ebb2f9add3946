"""A smaller real data set from Gowalla: a seeded random share of its users, every check-in of theirs, as a CSV.

    python benchmarks/gowalla_subsample.py --data DATA/gowalla --fraction 0.3 --seed 0 --out /tmp/gowalla-u30.csv
    kdray study data.source=csv data.path=/tmp/gowalla-u30.csv data.k_core=10 study.dataset=gowalla-u30 ...

Full Gowalla takes hours per study on 2 cores, so its studies are given a teacher instead of tuning one. A share of
its users, with their train.txt and test.txt check-ins pooled and split again by kdray (``data.k_core=10``, per-user
random 8:1:1, the protocol of the MovieLens studies), is small enough for the whole protocol, the teacher's search
included, and is real interaction data of another kind than MovieLens: sparse check-ins, a long-tailed catalog. Its
numbers are not comparable with published Gowalla figures. None of kdray's defaults were chosen on it.

Users are drawn without replacement (numpy's default_rng(seed)); the CSV has a ``user,item`` header and one row per
distinct (user, item) pair, users in the order drawn. A summary (rows, users, items) goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing kdray

from kdray.config import DataConfig  # noqa: E402
from kdray.data.readers import load_raw  # noqa: E402
from kdray.errors import KdrayError  # noqa: E402


def subsample(pairs: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The distinct (user, item) pairs of ``round(fraction * users)`` users drawn at random with ``seed``."""
    pairs = pairs.drop_duplicates()
    users = pairs["user"].unique()
    n = max(1, round(fraction * len(users)))
    drawn = np.random.default_rng(seed).choice(users, size=n, replace=False)
    order = pd.Series(np.arange(n), index=drawn)
    kept = pairs[pairs["user"].isin(drawn)]
    return kept.assign(_order=order.loc[kept["user"]].to_numpy()).sort_values(
        ["_order", "item"], kind="stable").drop(columns="_order").reset_index(drop=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the Gowalla folder (train.txt, test.txt)")
    parser.add_argument("--fraction", type=float, default=0.3, help="share of the users to keep, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], not {args.fraction}")
    try:
        raw = load_raw(DataConfig(source="lightgcn", path=str(args.data)))
    except KdrayError as e:
        parser.error(str(e))
    sample = subsample(pd.DataFrame({"user": raw.users, "item": raw.items}), args.fraction, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(args.out, index=False)
    print(f"{args.out}: {len(sample):,} pairs, {sample['user'].nunique():,} users, {sample['item'].nunique():,} items "
          f"({args.fraction:g} of the users, seed {args.seed}; before any k-core filter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
