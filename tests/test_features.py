"""kdray.data.features on tiny fixture files: the ml-100k join, age and decade fields, training-only vocabularies
and statistics (hand-computed), the per-user split, CSV/Parquet with named feature columns, to_batch, and the
DataErrors that name the file, line and column."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kdray.data.features import age_bucket, build_table, file_rows, ml100k_rows, split_rows, to_batch
from kdray.errors import DataError

GENRES = "0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0"


def _ml100k(folder: Path, users: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "u.data").write_text("1\t10\t5\t100\n1\t20\t3\t101\n2\t10\t4\t102\n2\t30\t2\t103\n")
    (folder / "u.user").write_text(users or "1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    flags_a = "0|1" + GENRES[3:]  # Action
    flags_b = "0|0|0|0|0|1" + GENRES[11:]  # Comedy
    (folder / "u.item").write_text(f"10|A (1995)|01-Jan-1995||url|{flags_a}\n20|B (1977)|01-Jan-1977||url|{flags_b}\n"
                                   f"30|unknown||||{GENRES}\n")
    return folder


def test_ml100k_rows_join_the_features(tmp_path):
    rows, categorical, numeric = ml100k_rows(_ml100k(tmp_path / "ml"))
    assert categorical == ("gender", "occupation", "zip_prefix", "age_bucket", "decade")
    assert numeric[:2] == ("age", "year") and len(numeric) == 21 and numeric[2] == "genre_0"  # no u.genre file
    assert rows["user"].tolist() == [1, 1, 2, 2] and rows["rating"].tolist() == [5, 3, 4, 2]
    assert rows["zip_prefix"].tolist() == ["8", "8", "T", "T"]
    assert rows["age_bucket"].tolist() == ["18-24", "18-24", "50-55", "50-55"]
    assert rows["decade"].tolist()[:3] == ["1990s", "1970s", "1990s"] and pd.isna(rows["decade"].iloc[3])
    assert math.isnan(rows["year"].iloc[3]) and rows["year"].iloc[1] == 1977
    assert rows["genre_1"].tolist() == [1, 0, 1, 0] and rows["genre_5"].tolist() == [0, 1, 0, 0]


def test_ml100k_missing_user_row_names_the_file(tmp_path):
    folder = _ml100k(tmp_path / "ml", users="1|24|M|technician|85711\n")
    with pytest.raises(DataError, match=r"u\.user: no row for user 2"):
        ml100k_rows(folder)


def test_ml100k_bad_age_names_the_line(tmp_path):
    folder = _ml100k(tmp_path / "ml", users="1|24|M|technician|85711\n2|old|F|other|T8H1N\n")
    with pytest.raises(DataError, match=r"u\.user line 2: age 'old'"):
        ml100k_rows(folder)


def test_age_bucket_boundaries():
    ages = np.array([1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90, np.nan])
    expected = ["<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55",
                "50-55", "56+", "56+"]
    out = age_bucket(ages)
    assert out[:-1].tolist() == expected and pd.isna(out[-1])


def test_build_table_uses_training_rows_only():
    rows = pd.DataFrame({"user": ["b", "a", "a", "c"], "item": [7, 3, 7, 3], "rating": [4.0, 3.0, 5.0, 1.0],
                         "color": ["red", "blue", np.nan, "green"], "x": [1.0, 3.0, np.nan, 100.0]})
    split = np.array([0, 0, 1, 2])
    t = build_table(rows, split, ["color"], ["x"], like_threshold=4)
    assert t.user.tolist() == [1, 0, 0, 2] and t.user_ids.tolist() == ["a", "b", "c"]
    assert t.item.tolist() == [1, 0, 1, 0] and t.item_ids.tolist() == ["3", "7"]
    # vocabulary of the training rows: blue = 1, red = 2; missing and test-only "green" are unknown (0)
    assert t.cat_vocab == (("blue", "red"),) and t.cardinalities == (3,)
    assert t.cat[:, 0].tolist() == [2, 1, 0, 0]
    # training mean 2, std 1 (population): x -> (x - 2) / 1; missing -> 0; the test value 100 does not move them
    assert t.num_mean.tolist() == [2.0] and t.num_std.tolist() == [1.0]
    assert t.num[:, 0].tolist() == [-1.0, 1.0, 0.0, 98.0]
    assert t.like.tolist() == [1, 0, 1, 0] and t.rating.dtype == np.float32
    assert t.rating_mean() == pytest.approx(3.5)
    assert t.model_shape() == {"n_users": 3, "n_items": 2, "cardinalities": [3], "n_num": 1}
    assert t.columns("test")["rating"].tolist() == [1.0]


def test_constant_numeric_feature_gets_unit_std():
    rows = pd.DataFrame({"user": [1, 2], "item": [1, 1], "rating": [1.0, 2.0], "x": [5.0, 5.0]})
    t = build_table(rows, np.array([0, 0]), [], ["x"])
    assert t.num_std.tolist() == [1.0] and t.num[:, 0].tolist() == [0.0, 0.0] and t.cat.shape == (2, 0)


def test_build_table_errors():
    rows = pd.DataFrame({"user": [1, 2], "item": [1, 1], "rating": [1.0, 2.0]})
    with pytest.raises(DataError, match="no training rows"):
        build_table(rows, np.array([1, 2]), [], [])
    with pytest.raises(DataError, match="no column 'age'"):
        build_table(rows, np.array([0, 0]), [], ["age"])
    with pytest.raises(DataError, match="one label"):
        build_table(rows, np.array([0, 3]), [], [])


def test_split_rows_keeps_a_training_row_per_user_and_is_seeded():
    users = np.repeat(np.arange(50), np.arange(1, 51))
    labels = split_rows(users, (0.8, 0.1, 0.1), seed=3)
    assert all((labels[users == u] == 0).any() for u in range(50))
    n = np.bincount(users)
    assert (np.bincount(users[labels == 2], minlength=50)[n >= 10] == np.floor(0.1 * n[n >= 10])).all()
    assert np.array_equal(labels, split_rows(users, (0.8, 0.1, 0.1), seed=3))
    assert not np.array_equal(labels, split_rows(users, (0.8, 0.1, 0.1), seed=4))
    with pytest.raises(DataError, match="split ratios"):
        split_rows(users, (0.0, 0.5, 0.5))


CSV = "uid,mid,stars,city,income\n1,a,5,paris,10\n1,b,2,,20\n2,a,4,rome,\n"


def test_file_rows_csv_and_parquet_with_named_columns(tmp_path):
    (tmp_path / "r.csv").write_text(CSV)
    names = dict(user_col="uid", item_col="mid", rating_col="stars", categorical=["city"], numeric=["income"])
    rows = file_rows(tmp_path / "r.csv", **names)
    assert rows.columns.tolist() == ["user", "item", "rating", "city", "income"]
    assert rows["city"].iloc[0] == "paris" and pd.isna(rows["city"].iloc[1])
    assert math.isnan(rows["income"].iloc[2]) and rows["rating"].tolist() == [5.0, 2.0, 4.0]
    pd.read_csv(tmp_path / "r.csv").to_parquet(tmp_path / "r.parquet")
    again = file_rows(tmp_path / "r.parquet", **names)
    assert again["user"].tolist() == rows["user"].tolist() and again["income"].tolist()[:2] == [10.0, 20.0]
    t = build_table(rows, np.array([0, 0, 1]), ["city"], ["income"])
    assert t.cat[:, 0].tolist() == [1, 0, 0]  # paris; missing; rome (not in training)


def test_file_rows_errors_name_the_line_and_column(tmp_path):
    names = dict(user_col="uid", item_col="mid", rating_col="stars", categorical=["city"], numeric=["income"])
    (tmp_path / "bad.csv").write_text(CSV.replace("rome,", "rome,lots"))
    with pytest.raises(DataError, match=r"bad\.csv line 4: numeric feature 'income' is 'lots'"):
        file_rows(tmp_path / "bad.csv", **names)
    (tmp_path / "r.csv").write_text(CSV)
    with pytest.raises(DataError, match="missing column 'zip'"):
        file_rows(tmp_path / "r.csv", **{**names, "categorical": ["zip"]})
    pd.DataFrame({"uid": [1, 2], "mid": ["a", "b"], "stars": [4.0, None], "city": ["x", "y"],
                  "income": [1.0, 2.0]}).to_parquet(tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"row 2: column 'stars' is missing"):
        file_rows(tmp_path / "null.parquet", **names)


def test_to_batch_types_and_optional_labels():
    cols = {"user": np.array([0, 1]), "item": np.array([2, 3]), "cat": np.zeros((2, 3), dtype=np.int32),
            "num": np.ones((2, 4)), "like": np.array([1, 0]), "extra": np.array([9, 9])}
    batch = to_batch(cols)
    assert set(batch) == {"user", "item", "cat", "num", "like"}
    assert batch["cat"].dtype == torch.int64 and batch["num"].dtype == torch.float32
    assert batch["like"].dtype == torch.float32 and batch["cat"].shape == (2, 3)
