"""Explicit ratings with user and item features, as the table a pointwise model trains on.

One row per rating: the dense user and item ids, ``cat [n_cat]`` per-field categorical ids, ``num [n_num]`` numeric
features, the labels ``rating`` and ``like = rating >= like_threshold`` (default 4), and the split (0 train, 1 valid,
2 test). Two sources:

- MovieLens-100K (:func:`ml100k_rows`): ``u.data`` ratings joined with ``u.user`` and ``u.item``. Categorical fields
  gender, occupation, zip prefix, age bucket (MovieLens-1M's groups) and release decade; numeric features age,
  release year and the 19 genre flags (multi-hot).
- A CSV or Parquet file (:func:`file_rows`) with user, item and rating columns and the categorical and numeric
  feature columns the caller names.

:func:`build_table` then encodes any such rows without looking at validation or test labels or values: categorical
vocabularies come from the training rows (id 0 = unknown: missing, or not seen in training), and numeric features
are standardised with the training rows' mean and standard deviation (missing values become 0, the training mean).
:func:`to_batch` turns a block of rows into the batch dict of tensors a pointwise model takes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from kdray.data.prepare import SPLITS, ratio_counts, split_labels
from kdray.data.readers import numeric_column, ratings_table, read_text_table, require_file, unique_ids
from kdray.errors import DataError

LIKE_THRESHOLD = 4.0
AGE_GROUPS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))  # ML-1M README
ML100K_CATEGORICAL = ("gender", "occupation", "zip_prefix", "age_bucket", "decade")

__all__ = ["AGE_GROUPS", "LIKE_THRESHOLD", "ML100K_CATEGORICAL", "PointwiseTable", "age_bucket", "build_table",
           "file_rows", "ml100k_rows", "split_rows", "to_batch"]


@dataclass(frozen=True, eq=False)
class PointwiseTable:
    """Encoded pointwise rows (see the module docstring); row arrays have one entry per rating."""

    user: np.ndarray  # [N] int64 dense ids
    item: np.ndarray  # [N] int64
    cat: np.ndarray  # [N, n_cat] int64; field j holds 0 (unknown) .. len(cat_vocab[j])
    num: np.ndarray  # [N, n_num] float32, standardised with training statistics
    rating: np.ndarray  # [N] float32
    like: np.ndarray  # [N] float32 in {0, 1}
    split: np.ndarray  # [N] int8: 0 train, 1 valid, 2 test
    user_ids: np.ndarray  # [n_users] raw ids as str; index = dense id
    item_ids: np.ndarray  # [n_items]
    cat_names: tuple[str, ...]
    cat_vocab: tuple[tuple[str, ...], ...]  # per field: the value of id 1, 2, ...
    num_names: tuple[str, ...]
    num_mean: np.ndarray  # [n_num] float64, training rows
    num_std: np.ndarray  # [n_num] float64, training rows (1 where constant)
    like_threshold: float

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Ids per categorical field, the unknown id included."""
        return tuple(len(v) + 1 for v in self.cat_vocab)

    def model_shape(self) -> dict[str, object]:
        """The data-dependent arguments of ``build_pointwise_model``."""
        return {"n_users": int(self.user_ids.size), "n_items": int(self.item_ids.size),
                "cardinalities": list(self.cardinalities), "n_num": len(self.num_names)}

    def rating_mean(self) -> float:
        """Mean training rating: the natural initial bias of a rating head."""
        return float(self.rating[self.split == 0].mean())

    def columns(self, split: str) -> dict[str, np.ndarray]:
        """The rows of one split ("train", "valid", "test") as named arrays, e.g. for Ray Data or :func:`to_batch`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rows = self.split == SPLITS.index(split)
        return {"user": self.user[rows], "item": self.item[rows], "cat": self.cat[rows], "num": self.num[rows],
                "like": self.like[rows], "rating": self.rating[rows]}


def to_batch(columns: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Named arrays of a block of rows -> the batch a pointwise model and ``pointwise_objective`` take: ``user``,
    ``item`` [B] int64, ``cat`` [B, n_cat] int64, ``num`` [B, n_num] float32, ``like``, ``rating`` [B] float32.
    Keys other than these are left out; label keys are optional (inference)."""
    dtypes = {"user": torch.int64, "item": torch.int64, "cat": torch.int64, "num": torch.float32,
              "like": torch.float32, "rating": torch.float32}
    return {k: torch.as_tensor(np.asarray(columns[k]), device=device).to(dt) for k, dt in dtypes.items()
            if k in columns}


def age_bucket(age: np.ndarray) -> np.ndarray:
    """MovieLens-1M's age groups ("<18", "18-24", ..., "56+") of ages in years; NaN stays NaN (unknown)."""
    age = np.asarray(age, dtype=np.float64)
    out = np.full(age.shape, "56+", dtype=object)
    for upper, label in reversed(AGE_GROUPS):
        out[age < upper] = label
    out[np.isnan(age)] = np.nan
    return out


def split_rows(users: np.ndarray, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> np.ndarray:
    """Split label (0 train, 1 valid, 2 test) of every rating: each user's ratings shuffled (seeded) and cut by
    ``ratios``, RecBole's ratio split exactly as ``data.split: random`` does it (every user keeps a training row)."""
    if len(ratios) != 3 or any(not r >= 0 for r in ratios) or not ratios[0] > 0:
        raise DataError(f"split ratios must be three numbers >= 0 with a positive train share, got {list(ratios)}")
    total = float(sum(ratios))
    codes = pd.factorize(np.asarray(users))[0].astype(np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B17]))
    counts = ratio_counts(np.bincount(codes), [r / total for r in ratios])
    return split_labels(codes, rng.permutation(codes.size), counts)


# ----------------------------------------------------------------------------------------------------------------
# Sources


def ml100k_rows(folder: Path, zip_prefix: int = 1) -> tuple[pd.DataFrame, tuple[str, ...], tuple[str, ...]]:
    """MovieLens-100K ratings joined with their features: a frame with ``user, item, rating, timestamp`` and the
    feature columns, plus the names of the categorical and the numeric ones. ``zip_prefix`` leading characters of the
    zip code form its field (1: the US zone; non-US codes keep their letter)."""
    folder = Path(folder)
    ratings = ratings_table(folder / "u.data", "ml-100k")
    upath, ipath = folder / "u.user", folder / "u.item"
    require_file(upath, "u.user (user|age|gender|occupation|zip)")
    users = read_text_table(upath, ("user", "age", "gender", "occupation", "zip"), "user|age|gender|occupation|zip",
                             sep="|", required=("user", "age"))
    age = numeric_column(users, "age", upath, integer=False)
    user_table = pd.DataFrame({
        "gender": users["gender"].astype("string").str.strip().to_numpy(dtype=object, na_value=np.nan),
        "occupation": users["occupation"].astype("string").str.strip().to_numpy(dtype=object, na_value=np.nan),
        "zip_prefix": users["zip"].astype("string").str.strip().str[:zip_prefix].to_numpy(dtype=object,
                                                                                          na_value=np.nan),
        "age_bucket": age_bucket(age), "age": age}, index=unique_ids(users, "user", upath))

    require_file(ipath, "u.item (item|title|release date|video release date|IMDb URL|19 genre flags)")
    fields = ("item", "title", "release", "video_release", "url", *(f"g{j}" for j in range(19)))
    items = read_text_table(ipath, fields, "item|title|release date|video release date|IMDb URL|19 genre flags",
                             sep="|", required=("item", *fields[5:]))
    genres = np.column_stack([numeric_column(items, f"g{j}", ipath, integer=True) for j in range(19)])
    if not np.isin(genres, (0, 1)).all():
        raise DataError(f"{ipath} line {items.index[np.argmax(~np.isin(genres, (0, 1)).all(axis=1))]}: genre flags "
                        "must be 0 or 1")
    gpath = folder / "u.genre"
    names = [line.split("|")[0] for line in gpath.read_text(encoding="latin-1").splitlines() if line.strip()] \
        if gpath.is_file() else []
    genre_cols = [f"genre={g}" for g in names] if len(names) == 19 else [f"genre_{j}" for j in range(19)]
    # "01-Jan-1995"; one film has no date: its year is missing (NaN), its decade unknown
    year = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce").dt.year.to_numpy(dtype=np.float64)
    decade = np.array([np.nan if np.isnan(y) else f"{int(y) // 10 * 10}s" for y in year], dtype=object)
    item_table = pd.DataFrame({"decade": decade, "year": year, **dict(zip(genre_cols, genres.T.astype(np.float32)))},
                              index=unique_ids(items, "item", ipath))

    rows = pd.DataFrame({"user": ratings.users, "item": ratings.items, "rating": ratings.ratings,
                         "timestamp": ratings.timestamps})
    for table, key, path in ((user_table, "user", upath), (item_table, "item", ipath)):
        missing = ~rows[key].isin(table.index)
        if missing.any():
            raise DataError(f"{path}: no row for {key} {rows[key][missing].iloc[0]}, which has ratings in "
                            f"{folder / 'u.data'}; expected one row per {key}")
        rows = rows.join(table, on=key)
    return rows, ML100K_CATEGORICAL, ("age", "year", *genre_cols)


def file_rows(path: Path, *, user_col: str, item_col: str, rating_col: str, categorical: Sequence[str] = (),
              numeric: Sequence[str] = (), sep: str = ",") -> pd.DataFrame:
    """A CSV (with a header) or Parquet file with the named columns -> a frame with ``user, item, rating`` and the
    feature columns under their own names. Ids and ratings are required in every row; an empty feature cell is a
    missing value (unknown category, training mean)."""
    path = Path(path)
    cols = list(dict.fromkeys([user_col, item_col, rating_col, *categorical, *numeric]))
    what = f"the columns {cols} (user, item, rating, categorical and numeric features)"
    require_file(path, f"a ratings file with {what}")
    if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
        try:
            schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema
            missing = [c for c in cols if c not in schema.names]
            if missing:
                raise DataError(f"{path}: missing column {missing[0]!r}; the file has {schema.names}, expected {what}")
            df = pq.read_table(path, columns=cols).to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        df.index, where = np.arange(1, len(df) + 1), "row"
        for col in (user_col, item_col, rating_col):
            na = df[col].isna().to_numpy()
            if na.any():
                raise DataError(f"{path} row {df.index[np.argmax(na)]}: column {col!r} is missing (null)")
    else:
        df = read_text_table(path, cols, what, sep=sep, header=True, quoting=csv.QUOTE_MINIMAL,
                              required=(user_col, item_col, rating_col))
        where = "line"
    out = pd.DataFrame({"user": df[user_col].astype(str).str.strip().to_numpy(dtype=object),
                        "item": df[item_col].astype(str).str.strip().to_numpy(dtype=object),
                        "rating": numeric_column(df, rating_col, path, integer=False, where=where)}, index=df.index)
    for col in categorical:
        out[col] = df[col].astype("string").str.strip().to_numpy(dtype=object, na_value=np.nan)
    for col in numeric:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = (values.isna() & df[col].notna()).to_numpy() | ~np.isfinite(values.fillna(0).to_numpy(np.float64))
        if bad.any():
            row = df.index[np.argmax(bad)]
            raise DataError(f"{path} {where} {row}: numeric feature {col!r} is {df[col].loc[row]!r}; expected a "
                            "finite number or an empty cell")
        out[col] = values.to_numpy(dtype=np.float64)
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def build_table(rows: pd.DataFrame, split: np.ndarray, categorical: Sequence[str], numeric: Sequence[str],
                like_threshold: float = LIKE_THRESHOLD) -> PointwiseTable:
    """Encodes ``rows`` (columns ``user, item, rating`` and the named features) with the split labels ``split``
    [N] (0 train, 1 valid, 2 test); statistics and vocabularies come from the training rows only."""
    split = np.asarray(split, dtype=np.int8)
    if split.shape != (len(rows),) or not np.isin(split, (0, 1, 2)).all():
        raise DataError(f"split must hold one label in {{0, 1, 2}} per row ({len(rows)}), got shape {split.shape}")
    missing = [c for c in ("user", "item", "rating", *categorical, *numeric) if c not in rows.columns]
    if missing:
        raise DataError(f"the rows have no column {missing[0]!r}; they have {list(rows.columns)}")
    train = split == 0
    if not train.any():
        raise DataError("no training rows: the split leaves nothing to compute feature statistics from")
    rating = rows["rating"].to_numpy(dtype=np.float64)
    if not np.isfinite(rating).all():
        raise DataError(f"rating of row {int(np.argmax(~np.isfinite(rating)))} is not a finite number")
    user, user_ids = pd.factorize(rows["user"].to_numpy(), sort=True)
    item, item_ids = pd.factorize(rows["item"].to_numpy(), sort=True)

    cat = np.zeros((len(rows), len(categorical)), dtype=np.int64)
    vocab = []
    for j, col in enumerate(categorical):
        values = rows[col].to_numpy(dtype=object)
        known = pd.notna(values)
        values = np.where(known, values.astype(str), "")
        seen = tuple(sorted(set(values[train & known].tolist())))
        cat[:, j] = pd.Index(seen).get_indexer(values) + 1  # not seen in training (or missing) -> 0
        cat[~known, j] = 0
        vocab.append(seen)

    raw = rows[list(numeric)].to_numpy(dtype=np.float64).reshape(len(rows), len(numeric))
    with np.errstate(invalid="ignore"):
        train_raw = raw[train]
        counted = (~np.isnan(train_raw)).sum(axis=0)
        mean = np.where(counted > 0, np.nansum(train_raw, axis=0) / np.maximum(counted, 1), 0.0)
        var = np.where(counted > 0, np.nansum((train_raw - mean) ** 2, axis=0) / np.maximum(counted, 1), 0.0)
    std = np.where(var > 0, np.sqrt(var), 1.0)
    num = np.nan_to_num((raw - mean) / std, nan=0.0).astype(np.float32)
    return PointwiseTable(
        user=user.astype(np.int64), item=item.astype(np.int64), cat=cat, num=num, rating=rating.astype(np.float32),
        like=(rating >= like_threshold).astype(np.float32), split=split,
        user_ids=np.asarray(user_ids).astype(str), item_ids=np.asarray(item_ids).astype(str),
        cat_names=tuple(categorical), cat_vocab=tuple(vocab), num_names=tuple(numeric), num_mean=mean, num_std=std,
        like_threshold=float(like_threshold))
