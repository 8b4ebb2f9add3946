"""Loads the real benchmark data sets with kdray's loaders and prints their size: a check that the loaders read the
published files as they are (MovieLens-100K: 100,000 / 943 / 1,682; Gowalla, LightGCN split, train + test:
1,027,370 / 29,858 / 40,981).

    python benchmarks/dataset_counts.py --data-root DATA    # DATA: the folder holding ml-100k/ and gowalla/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from kdray.config import DataConfig
from kdray.data.readers import load_raw
from kdray.errors import DataError

DATASETS = {  # folder -> the config that reads it
    "ml-100k": dict(source="ml-100k", side_features=True),
    "gowalla": dict(source="lightgcn", split="given"),
}


def count(cfg: DataConfig) -> dict[str, float]:
    start = time.perf_counter()
    raw = load_raw(cfg)
    seconds = time.perf_counter() - start
    return {"interactions": raw.users.size, "users": np.unique(raw.users).size, "items": np.unique(raw.items).size,
            "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding ml-100k/ and gowalla/")
    args = parser.parse_args(argv)
    missing = 0
    print(f"{'data set':<10} {'interactions':>13} {'users':>8} {'items':>8} {'load s':>7}")
    for name, fields in DATASETS.items():
        folder = args.data_root / name
        if not folder.is_dir():
            print(f"{name:<10} MISSING: no folder {folder} (pass --data-root)")
            missing += 1
            continue
        try:
            c = count(DataConfig(path=str(folder), **fields))
        except DataError as e:
            print(f"{name:<10} UNREADABLE: {e}")
            missing += 1
            continue
        print(f"{name:<10} {c['interactions']:>13,} {c['users']:>8,} {c['items']:>8,} {c['seconds']:>7.2f}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
