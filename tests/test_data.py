"""kdray.data: loaders on tiny fixture files, bad-data messages, filtering, splits, vocab and the prepared folder.

Every fixture is written by the test into tmp_path; nothing here needs the real data sets, the network or Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdray.config import DataConfig, fingerprint, load_config
from kdray.data.prepare import (ITEMS, META, TRAIN_BY_USER, USERS, PreparedData, k_core, load_prepared,
                                popularity_note, prepare, ratio_counts)
from kdray.sparse import Csr
from kdray.data.readers import load_raw
from kdray.errors import ConfigError, DataError

OCCUPATIONS = ["artist", "doctor", "engineer", "student"]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("latin-1"))
    return path


def ratings_rows(n_users: int = 6, n_items: int = 8, seed: int = 0, per_user: int = 5) -> list[tuple[int, ...]]:
    """Distinct (user, item, rating, timestamp) rows with raw ids starting at 1 (user ids up to 2 digits, so numeric
    and text order differ), each user rating ``per_user`` items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for i in rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False):
            rows.append((u * 3 if u > 3 else u, int(i), int(rng.integers(1, 6)), int(rng.integers(8e8, 9e8))))
    return rows


def ml100k(folder: Path, rows=None, *, features: bool = True) -> Path:
    rows = rows if rows is not None else ratings_rows()
    write(folder / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    if features:
        users = sorted({r[0] for r in rows})
        write(folder / "u.user", "".join(
            f"{u}|{20 + 5 * k}|{'MF'[k % 2]}|{OCCUPATIONS[k % len(OCCUPATIONS)]}|{10000 + u}\n"
            for k, u in enumerate(users)))
        items = sorted({r[1] for r in rows})
        # a latin-1 title (Les Mis\xe9rables) and an empty release date, as in the real u.item
        lines = [f"{i}|Les Mis\xe9rables ({1990 + i})|{'' if i == 2 else '01-Jan-1995'}||http://x/{i}|"
                 + "|".join("1" if g == i % 19 else "0" for g in range(19)) + "\n" for i in items]
        write(folder / "u.item", "".join(lines).encode("latin-1"))
        write(folder / "u.genre", "".join(f"g{j}|{j}\n" for j in range(19)))
    return folder


def cfg_for(source: str, path: Path | None, **kw) -> DataConfig:
    return DataConfig(source=source, path=None if path is None else str(path), **kw)


def pairs(data: PreparedData, split: str) -> set[tuple[str, str]]:
    """The (raw user, raw item) pairs of a split: compares prepared data with the raw rows regardless of ids."""
    csr = getattr(data, split)
    return set(zip(data.user_ids[csr.rows_of()].tolist(), data.item_ids[csr.indices].tolist()))


# ----------------------------------------------------------------------------------------------------------------
# Loaders


def test_ml100k_loads_ratings_and_side_features(tmp_path):
    rows = ratings_rows()
    raw = load_raw(cfg_for("ml-100k", ml100k(tmp_path / "ml-100k", rows)))
    assert raw.users.tolist() == [r[0] for r in rows] and raw.items.tolist() == [r[1] for r in rows]
    assert raw.ratings.tolist() == [r[2] for r in rows] and raw.timestamps.tolist() == [r[3] for r in rows]
    uf = raw.user_features
    assert uf.values.dtype == np.float32 and uf.names[:3] == ("age", "gender=F", "gender=M")
    assert uf.names[3:] == tuple(f"occupation={o}" for o in OCCUPATIONS)
    assert uf.values[:, 0].min() == 0.0 and uf.values[:, 0].max() == 1.0  # age min-max scaled
    np.testing.assert_array_equal(uf.values[:, 1:3].sum(axis=1), 1)  # gender one-hot
    np.testing.assert_array_equal(uf.values[:, 3:].sum(axis=1), 1)  # occupation one-hot
    assert uf.values[0, 2] == 1 and uf.values[1, 1] == 1  # first user M, second F
    itf = raw.item_features
    assert itf.values.shape == (len(set(raw.items.tolist())), 19) and itf.names[0] == "genre=g0"
    for item_id, row in zip(itf.ids, itf.values):
        assert row.argmax() == item_id % 19 and row.sum() == 1


def test_ml100k_without_side_features_needs_only_u_data(tmp_path):
    raw = load_raw(cfg_for("ml-100k", ml100k(tmp_path, features=False), side_features=False))
    assert raw.user_features is None and raw.item_features is None and raw.users.size == 30


def test_ml1m_double_colon_and_ml20m_csv(tmp_path):
    rows = ratings_rows()
    write(tmp_path / "ml-1m" / "ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    write(tmp_path / "ml-20m" / "ratings.csv",
          "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in rows))
    for source in ("ml-1m", "ml-10m"):
        raw = load_raw(cfg_for(source, tmp_path / "ml-1m"))
        assert raw.users.tolist() == [r[0] for r in rows] and raw.timestamps.tolist() == [r[3] for r in rows]
    for source in ("ml-20m", "ml-25m"):
        raw = load_raw(cfg_for(source, tmp_path / "ml-20m"))
        assert raw.items.tolist() == [r[1] for r in rows] and raw.ratings.tolist() == [r[2] - 0.5 for r in rows]


def test_lightgcn_layout_with_empty_user_line(tmp_path):
    write(tmp_path / "train.txt", "0 1 2 3\n1 0  2 \n2\n3 4\n")  # user 2 has no train items; stray spaces
    write(tmp_path / "test.txt", "0 4\n1 3\n2 1 0\n")
    raw = load_raw(cfg_for("lightgcn", tmp_path, split="given"))
    assert list(zip(raw.users.tolist(), raw.items.tolist(), raw.is_test.tolist())) == [
        (0, 1, False), (0, 2, False), (0, 3, False), (1, 0, False), (1, 2, False), (3, 4, False),
        (0, 4, True), (1, 3, True), (2, 1, True), (2, 0, True)]
    data = prepare(cfg_for("lightgcn", tmp_path, split="given", split_ratios=(0.9, 0.1, 0.0)), tmp_path / "out")
    assert pairs(data, "test") == {("0", "4"), ("1", "3"), ("2", "1"), ("2", "0")}
    assert data.train.row(int(data.raw_to_user(2))).size == 0  # a user with test items only


def test_csv_and_parquet_with_column_map(tmp_path):
    df = pd.DataFrame({"who": ["u10", "u9", "u10", "u2"], "what": [5, 7, 7, 5], "stars": [4.0, 2.0, 5.0, 3.5],
                       "when": ["2021-01-02", "2021-01-01", "2021-01-03T08:00:00", "2020-12-31"]})
    write(tmp_path / "x.csv", df.to_csv(sep=";", index=False))
    df.to_parquet(tmp_path / "x.parquet")
    kw = dict(user_col="who", item_col="what", rating_col="stars", timestamp_col="when")
    for source, name, extra in (("csv", "x.csv", {"sep": ";"}), ("parquet", "x.parquet", {})):
        raw = load_raw(cfg_for(source, tmp_path / name, **kw, **extra))
        assert raw.users.tolist() == ["u10", "u9", "u10", "u2"] and raw.items.tolist() == [5, 7, 7, 5]
        assert raw.ratings.tolist() == [4.0, 2.0, 5.0, 3.5]
        assert np.argsort(raw.timestamps).tolist() == [3, 1, 0, 2]
    data = prepare(cfg_for("csv", tmp_path / "x.csv", **kw, sep=";", split="loo"), tmp_path / "out")
    assert data.user_ids.tolist() == ["u10", "u2", "u9"]  # string ids in text order
    assert pairs(data, "test") == {("u10", "7")} and pairs(data, "train") == {("u10", "5"), ("u9", "7"), ("u2", "5")}


@pytest.mark.parametrize("sep", ["tab", "\\t", "TAB", "\t"])
def test_tsv_by_name_or_character(tmp_path, sep):
    write(tmp_path / "x.tsv", "who\twhat\tstars\nu1\t5\t4.5\nu2\t7\t1\n")
    cfg = load_config(None, ["data.source=csv", f"data.path={tmp_path / 'x.tsv'}", f"data.sep={sep}",
                             "data.user_col=who", "data.item_col=what", "data.rating_col=stars"]).data
    raw = load_raw(cfg)
    assert raw.users.tolist() == ["u1", "u2"] and raw.items.tolist() == [5, 7] and raw.ratings.tolist() == [4.5, 1.0]


@pytest.mark.parametrize("sep", ["", "'::'", "a", "'7'", "'\"'", "\n"])
def test_unusable_separators_are_refused_when_the_config_loads(sep):
    with pytest.raises(ConfigError, match=r"data.sep: .* is not a usable separator.*data.sep=tab"):
        load_config(None, [f"data.sep={sep}"])


def test_headerless_csv_reads_columns_by_position(tmp_path):
    # u.data-like: user, item, rating, timestamp; no header row
    write(tmp_path / "u.tsv", "1\t10\t5\t300\n2\t10\t3\t100\n2\t11\t4\t200\n")
    base = dict(path=tmp_path / "u.tsv", sep="tab")
    raw = load_raw(cfg_for("csv", **base, header=False))  # only user and item: the trailing columns are not read
    assert raw.users.tolist() == [1, 2, 2] and raw.items.tolist() == [10, 10, 11]
    assert raw.ratings is None and raw.timestamps is None
    raw = load_raw(cfg_for("csv", **base, header=False, rating_col="r", timestamp_col="t"))
    assert raw.ratings.tolist() == [5.0, 3.0, 4.0] and raw.timestamps.tolist() == [300, 100, 200]
    # the first row is data, not a header: a header-mode read of the same file loses it
    assert load_raw(cfg_for("csv", **base, user_col="1", item_col="10", header=True)).users.tolist() == [2, 2]


def test_headerless_csv_with_too_few_columns_says_which_order(tmp_path):
    write(tmp_path / "two.csv", "1,10\n2,11\n")
    with pytest.raises(DataError, match=r"two.csv line 1: expected 3 fields separated by ','.*without a header row, "
                                        r"in this order: user, item, stars.*found 2"):
        load_raw(cfg_for("csv", tmp_path / "two.csv", header=False, rating_col="stars"))


# ----------------------------------------------------------------------------------------------------------------
# Bad data: every message names the file and the line / row / column, and what was expected.

U_DATA_OK = "1\t1\t5\t881250949\n2\t2\t3\t881250950\n"


@pytest.mark.parametrize("text, expected", [
    (U_DATA_OK + "3\t3\t4\n", ["u.data line 3", "found 3 fields", "expected 4", "user item rating timestamp"]),
    (U_DATA_OK + "3\t3\t4\t5\t6\n", ["u.data line 3", "found 5", "expected 4 fields"]),
    ("1\t1\t5\t881250949\t9\n" + U_DATA_OK, ["u.data line 1", "found 5", "expected 4 fields"]),
    (U_DATA_OK + "abc\t3\t4\t881250951\n", ["u.data line 3", "user 'abc' is not a number", "integer id"]),
    (U_DATA_OK + "3\t3.5\t4\t881250951\n", ["u.data line 3", "item 3.5 is not an integer id"]),
    (U_DATA_OK + "3\t3\tnan\t881250951\n", ["u.data line 3", "column 'rating' is empty"]),
    (U_DATA_OK + "3\t3\t\t881250951\n", ["u.data line 3", "column 'rating' is empty"]),
    ("", ["u.data is empty", "user item rating timestamp"]),
    ("\n\n", ["u.data is empty"]),
])
def test_bad_u_data(tmp_path, text, expected):
    write(tmp_path / "u.data", text)
    with pytest.raises(DataError) as e:
        load_raw(cfg_for("ml-100k", tmp_path, side_features=False))
    for fragment in expected:
        assert fragment in str(e.value), str(e.value)
    assert str(tmp_path / "u.data") in str(e.value)


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    write(tmp_path / "u.data", U_DATA_OK + "\n3\t3\t4\t1\n\n4\tx\t4\t1\n")
    with pytest.raises(DataError, match=r"u.data line 6: item 'x'"):
        load_raw(cfg_for("ml-100k", tmp_path, side_features=False))


@pytest.mark.parametrize("source, name, text, expected", [
    ("ml-1m", "ratings.dat", "1::1::5::9\n2::2::3\n",
     ["ratings.dat line 2", "found 3 fields; expected 4 separated by '::'"]),
    ("ml-20m", "ratings.csv", "user,movieId,rating,timestamp\n1,1,5,9\n", ["missing column 'userId'", "header"]),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n1,1,5,9\n2,2,x,9\n",
     ["ratings.csv line 3", "rating 'x' is not a number"]),
    ("ml-20m", "ratings.csv", "userId,movieId,rating,timestamp\n", ["ratings.csv has no data rows"]),
    ("lightgcn", "train.txt", "0 1 2\n1 2 x3\n", ["train.txt line 2", "integer ids", "'1 2 x3'"]),
])
def test_bad_other_formats(tmp_path, source, name, text, expected):
    write(tmp_path / name, text)
    write(tmp_path / "test.txt", "0 1\n")
    with pytest.raises(DataError) as e:
        load_raw(cfg_for(source, tmp_path))
    for fragment in expected:
        assert fragment in str(e.value), str(e.value)


def test_bad_csv_and_parquet_columns(tmp_path):
    write(tmp_path / "a.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match=r"a.csv: missing column 'stars'.*\['user', 'item'\]"):
        load_raw(cfg_for("csv", tmp_path / "a.csv", rating_col="stars"))
    write(tmp_path / "b.csv", "user,item\n1,2\n,3\n")
    with pytest.raises(DataError, match=r"b.csv line 3: column 'user' is empty"):
        load_raw(cfg_for("csv", tmp_path / "b.csv"))
    pq.write_table(pa.table({"user": pa.array([1, None, 3]), "item": [1, 2, 3]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet row 2: column 'user' is missing"):
        load_raw(cfg_for("parquet", tmp_path / "c.parquet"))
    pq.write_table(pa.table({"user": [1, 2], "item": [1, 2]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: missing column 'when'"):
        load_raw(cfg_for("parquet", tmp_path / "d.parquet", timestamp_col="when"))
    write(tmp_path / "e.parquet", b"not parquet")
    with pytest.raises(DataError, match=r"e.parquet: not a readable Parquet file"):
        load_raw(cfg_for("parquet", tmp_path / "e.parquet"))
    write(tmp_path / "f.csv", "user,item,when\n1,2,2021-01-01\n1,3,yesterday\n")
    with pytest.raises(DataError, match=r"f.csv line 3: when 'yesterday' is neither a number nor a date"):
        load_raw(cfg_for("csv", tmp_path / "f.csv", timestamp_col="when"))


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DataError, match=r"data.path .*nowhere does not exist \(or set data.download=true\)"):
        load_raw(cfg_for("ml-100k", tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/u.data does not exist; expected the ml-100k ratings file"):
        load_raw(cfg_for("ml-100k", tmp_path / "empty"))
    with pytest.raises(DataError, match=r"empty/train.txt does not exist"):
        load_raw(cfg_for("lightgcn", tmp_path / "empty"))
    folder = ml100k(tmp_path / "ml", features=False)
    with pytest.raises(DataError, match=r"u.user does not exist.*data.side_features=false"):
        load_raw(cfg_for("ml-100k", folder))


def test_bad_side_feature_files(tmp_path):
    folder = ml100k(tmp_path)
    lines = (folder / "u.user").read_text().splitlines()
    write(folder / "u.user", "\n".join(lines[:-1]) + "\n")  # the last user lost its row
    with pytest.raises(DataError, match=r"u.user: no row for user '18', which has interactions"):
        prepare(cfg_for("ml-100k", folder), tmp_path / "out")
    write(folder / "u.user", "1|x|M|artist|1\n")
    with pytest.raises(DataError, match=r"u.user line 1: age 'x' is not a number"):
        load_raw(cfg_for("ml-100k", folder))
    write(folder / "u.user", "1|20|M|artist|1\n")
    write(folder / "u.item", "1|t|d||u|0|1\n")
    with pytest.raises(DataError, match=r"u.item line 1: expected 24 fields separated by '\|'.*found 7"):
        load_raw(cfg_for("ml-100k", folder))


def test_filters_that_remove_everything(tmp_path):
    folder = ml100k(tmp_path, features=False)
    with pytest.raises(DataError, match=r"no interactions left.*min_rating=6"):
        prepare(cfg_for("ml-100k", folder, side_features=False, min_rating=6.0), tmp_path / "a")
    with pytest.raises(DataError, match=r"no interactions left.*k_core=50.*u.data"):
        prepare(cfg_for("ml-100k", folder, side_features=False, k_core=50), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    write(tmp_path / "t.csv", "user,item\n1,2\n")
    with pytest.raises(DataError, match=r"min_rating=4.0 .* no ratings \(set data.rating_col"):
        prepare(cfg_for("csv", tmp_path / "t.csv", min_rating=4.0), tmp_path / "c")
    with pytest.raises(DataError, match=r"split='loo'.*no timestamps"):
        prepare(cfg_for("csv", tmp_path / "t.csv", split="loo"), tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------------
# Filtering, vocabulary and splits


def test_k_core_hand_example():
    # users 0..3, items 0..3. 2-core: user 3 has one item -> dropped; then item 3 (only user 3 and user 2) has one
    # -> dropped; then user 2 has one item left -> dropped; what remains is users 0,1 x items 0,1 plus (0,2),(1,2).
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
    items = np.array([0, 1, 2, 0, 1, 2, 2, 3, 3])
    keep = k_core(users, items, 2)
    assert keep.tolist() == [True, True, True, True, True, True, False, False, False]
    assert k_core(users, items, 3).tolist() == [False] * 9  # items 0, 1 have only 2 users each: nothing survives
    assert k_core(users, items, 0).all() and k_core(users, items, 1).all()


def test_ratio_counts_match_recbole():
    # RecBole's _calcu_split_ids with [0.8, 0.1, 0.1]: floor for valid/test, one each while train keeps > 1
    got = ratio_counts(np.array([1, 2, 3, 4, 10, 25]), (0.8, 0.1, 0.1)).tolist()
    assert got == [[1, 0, 0], [1, 0, 1], [1, 1, 1], [2, 1, 1], [8, 1, 1], [21, 2, 2]]
    assert ratio_counts(np.array([5, 1]), (0.5, 0.5, 0.0)).tolist() == [[3, 2, 0], [1, 0, 0]]


def test_min_rating_then_dedup_keeps_latest_then_vocab(tmp_path):
    rows = [(1, 10, 5, 100), (1, 10, 2, 300),  # the later copy has rating 2: dropped by min_rating first
            (1, 11, 4, 300), (1, 11, 5, 20),  # both kept by min_rating: the later one (t=300) wins
            (1, 12, 5, 50), (2, 10, 4, 10), (2, 9, 5, 20), (10, 12, 5, 30)]
    folder = ml100k(tmp_path, rows, features=False)
    data = prepare(cfg_for("ml-100k", folder, side_features=False, min_rating=4.0), tmp_path / "out")
    everything = pairs(data, "train") | pairs(data, "valid") | pairs(data, "test")
    assert everything == {("1", "10"), ("1", "11"), ("1", "12"), ("2", "10"), ("2", "9"), ("10", "12")}
    assert data.meta["counts"] == {"read": 8, "after_min_rating": 7, "after_dedup": 6, "after_k_core": 6,
                                   "train": data.train.nnz, "valid": data.valid.nnz, "test": data.test.nnz}
    assert data.user_ids.tolist() == ["1", "2", "10"]  # numeric order, not text order
    assert data.item_ids.tolist() == ["9", "10", "11", "12"]
    assert data.raw_to_user(10) == 2 and data.raw_to_user("2") == 1 and data.raw_to_user(99) is None
    assert data.raw_to_item("9") == 0 and data.raw_to_item(13) is None
    loo = prepare(cfg_for("ml-100k", folder, side_features=False, min_rating=4.0, split="loo"), tmp_path / "loo")
    assert ("1", "11") in pairs(loo, "test")  # the kept copy of (1, 11) is the latest (t=300), not t=20


def test_loo_holds_out_the_latest(tmp_path):
    rows = [(1, 1, 5, 30), (1, 2, 5, 10), (1, 3, 5, 20), (1, 4, 5, 5),  # latest: item 1 (test), item 3 (valid)
            (2, 1, 5, 7), (2, 2, 5, 7),  # a tie: the later line is the later interaction
            (3, 4, 5, 1)]
    folder = ml100k(tmp_path, rows, features=False)
    data = prepare(cfg_for("ml-100k", folder, side_features=False, split="loo"), tmp_path / "out")
    assert pairs(data, "test") == {("1", "1"), ("2", "2")}
    assert pairs(data, "valid") == {("1", "3")}
    assert pairs(data, "train") == {("1", "2"), ("1", "4"), ("2", "1"), ("3", "4")}


def split_config(tmp_path, **kw) -> DataConfig:
    rows = ratings_rows(n_users=40, n_items=30, per_user=12, seed=3)
    folder = ml100k(tmp_path / "src", rows, features=False)
    return cfg_for("ml-100k", folder, side_features=False, **kw)


@pytest.mark.parametrize("split", ["random", "loo"])
def test_splits_partition_the_data_without_leakage(tmp_path, split):
    cfg = split_config(tmp_path, split=split)
    data = prepare(cfg, tmp_path / "out")
    raw = load_raw(cfg)
    tr, va, te = (pairs(data, s) for s in ("train", "valid", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == {(str(u), str(i)) for u, i in zip(raw.users.tolist(), raw.items.tolist())}
    assert len(tr) + len(va) + len(te) == raw.users.size
    assert (data.train.row_lengths() >= 1).all()  # every user keeps a training item
    if split == "random":  # 12 per user -> RecBole counts 10 / 1 / 1
        assert (data.train.row_lengths() == 10).all() and (data.test.row_lengths() == 1).all()
    again = prepare(cfg, tmp_path / "out2")
    assert pairs(again, "test") == te and pairs(again, "valid") == va  # deterministic under the seed
    other = prepare(DataConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "out3")
    assert (pairs(other, "test") != te) == (split == "random")  # loo does not depend on the seed


def test_given_split_carves_valid_out_of_train(tmp_path):
    rng = np.random.default_rng(0)
    train = {u: sorted(rng.choice(50, 20, replace=False).tolist()) for u in range(30)}
    test = {u: [i for i in range(50, 53)] for u in range(30)}
    write(tmp_path / "train.txt", "".join(f"{u} {' '.join(map(str, it))}\n" for u, it in train.items()))
    write(tmp_path / "test.txt", "".join(f"{u} {' '.join(map(str, it))}\n" for u, it in test.items()))
    data = prepare(cfg_for("lightgcn", tmp_path, split="given", split_ratios=(0.9, 0.1, 0.0)), tmp_path / "out")
    assert pairs(data, "test") == {(str(u), str(i)) for u, it in test.items() for i in it}
    file_train = {(str(u), str(i)) for u, it in train.items() for i in it}
    assert pairs(data, "train") | pairs(data, "valid") == file_train
    assert not pairs(data, "train") & pairs(data, "valid")
    assert (data.valid.row_lengths() == 2).all() and (data.train.row_lengths() == 18).all()  # 10% of 20


def test_given_split_test_copy_wins_over_a_train_duplicate(tmp_path):
    write(tmp_path / "train.txt", "0 1 2 3\n1 1 2\n")
    write(tmp_path / "test.txt", "0 3\n1 4\n")
    data = prepare(cfg_for("lightgcn", tmp_path, split="given", split_ratios=(1.0, 0.0, 0.0)), tmp_path / "out")
    assert pairs(data, "test") == {("0", "3"), ("1", "4")} and ("0", "3") not in pairs(data, "train")
    assert data.valid.nnz == 0


def test_k_core_applies_in_prepare(tmp_path):
    rows = [(1, 1, 5, 1), (1, 2, 5, 2), (2, 1, 5, 3), (2, 2, 5, 4), (3, 3, 5, 5), (3, 1, 5, 6)]
    data = prepare(cfg_for("ml-100k", ml100k(tmp_path, rows, features=False), side_features=False, k_core=2,
                           split_ratios=(0.8, 0.1, 0.1)), tmp_path / "out")
    assert data.user_ids.tolist() == ["1", "2"] and data.item_ids.tolist() == ["1", "2"]


# ----------------------------------------------------------------------------------------------------------------
# The prepared folder


def test_prepared_files_and_features(tmp_path):
    folder = ml100k(tmp_path / "src")
    data = prepare(cfg_for("ml-100k", folder), tmp_path / "run" / "data")
    out = tmp_path / "run" / "data"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [META, "train.parquet", "valid.parquet", "test.parquet", TRAIN_BY_USER, USERS, ITEMS, "user_features.npy",
         "item_features.npy"])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["data"]  # no temporary folder left behind
    t = pq.read_table(out / "train.parquet")
    assert t.schema.field("user").type == pa.int64() and t.schema.field("item").type == pa.int64()
    keys = t["user"].to_numpy() * data.n_items + t["item"].to_numpy()
    assert (np.diff(keys) > 0).all()  # sorted by user, then item
    by_user = pq.read_table(out / TRAIN_BY_USER)
    assert by_user.schema.field("items").type == pa.list_(pa.int64())
    for u, its in zip(by_user["user"].to_pylist(), by_user["items"].to_pylist()):
        assert its == data.train.row(u).tolist()
    assert pq.read_table(out / USERS).schema.field("raw_id").type == pa.string()
    # features are aligned with the dense ids
    raw = load_raw(cfg_for("ml-100k", folder))
    for dense, raw_id in enumerate(data.item_ids):
        row = np.flatnonzero(raw.item_features.ids == int(raw_id))[0]
        np.testing.assert_array_equal(data.item_features[dense], raw.item_features.values[row])
    assert data.user_features.shape == (data.n_users, 3 + len(OCCUPATIONS))
    assert data.meta["user_feature_names"][0] == "age" and data.meta["fingerprint"] == fingerprint(
        cfg_for("ml-100k", folder))
    assert data.item_popularity().sum() == data.train.nnz


def test_prepare_reuses_and_refreshes(tmp_path):
    folder = ml100k(tmp_path / "src", features=False)
    cfg = cfg_for("ml-100k", folder, side_features=False)
    out = tmp_path / "data"
    first = prepare(cfg, out)
    marker = out / "marker"
    marker.write_text("still here")
    second = prepare(cfg, out)  # same fingerprint, same inputs: reused as is
    assert marker.exists() and pairs(second, "test") == pairs(first, "test")
    prepare(DataConfig(**{**cfg.__dict__, "seed": 7}), out)  # another config: prepared afresh, atomically
    assert not marker.exists() and json.loads((out / META).read_text())["config"]["seed"] == 7
    marker.write_text("x")
    with (folder / "u.data").open("a") as f:  # the input changed: prepared afresh
        f.write("99\t1\t5\t1\n")
    os.utime(folder / "u.data", ns=(1, 1))
    assert prepare(DataConfig(**{**cfg.__dict__, "seed": 7}), out).raw_to_user(99) is not None
    assert not marker.exists()
    (out / "test.parquet").write_bytes(b"garbage")  # corrupt: prepared afresh
    assert prepare(DataConfig(**{**cfg.__dict__, "seed": 7}), out).test.nnz > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]


def test_prepare_never_replaces_a_foreign_folder(tmp_path):
    write(tmp_path / "mine" / "notes.txt", "precious")
    with pytest.raises(DataError, match=r"mine exists and is not a prepared-data folder"):
        prepare(DataConfig(n_users=20, n_items=10, n_interactions=100), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_load_prepared_errors(tmp_path):
    with pytest.raises(DataError, match=r"nothing: no prepared data \(meta.json is missing\)"):
        load_prepared(tmp_path / "nothing")
    folder = ml100k(tmp_path / "src", features=False)
    prepare(cfg_for("ml-100k", folder, side_features=False), tmp_path / "data")
    pq.write_table(pa.table({"user": [0, 0], "item": [1, 1]}), tmp_path / "data" / "test.parquet")
    with pytest.raises(DataError, match=r"test.parquet: user/item ids out of range or repeated pairs"):
        load_prepared(tmp_path / "data")
    (tmp_path / "data" / "valid.parquet").unlink()
    with pytest.raises(DataError, match=r"data: prepared data is incomplete or corrupt.*valid.parquet"):
        load_prepared(tmp_path / "data")
    (tmp_path / "data" / META).write_text("{not json")
    with pytest.raises(DataError, match=r"incomplete or corrupt"):
        load_prepared(tmp_path / "data")


def test_synthetic_default_prepares(tmp_path):
    cfg = DataConfig(n_users=200, n_items=100, n_interactions=4000)
    data = prepare(cfg, tmp_path / "data")
    assert data.train.nnz + data.valid.nnz + data.test.nnz == 4000
    assert data.n_users == 200 and data.user_features is None
    loo = prepare(DataConfig(**{**cfg.__dict__, "split": "loo"}), tmp_path / "loo")
    n = loo.train.row_lengths() + loo.valid.row_lengths() + loo.test.row_lengths()
    assert ((loo.test.row_lengths() == 1) == (n >= 2)).all() and ((loo.valid.row_lengths() == 1) == (n >= 3)).all()


# ----------------------------------------------------------------------------------------------------------------
# Validation against test: are the pairs a model is picked on like the pairs it is scored on?


def split_data(train_items, valid_items, test_items, n_items: int = 4) -> PreparedData:
    """One pair per user in each listed split (user k gets the k-th item), so each list is its split's items."""
    def csr(items):
        return Csr.from_pairs(np.arange(len(items)), np.asarray(items), 8, n_items)

    return PreparedData(path=Path("."), n_users=8, n_items=n_items, train=csr(train_items), valid=csr(valid_items),
                        test=csr(test_items), user_ids=np.arange(8).astype(str),
                        item_ids=np.arange(n_items).astype(str), user_features=None, item_features=None, meta={})


def test_popularity_shift_matches_hand_computed_values_and_welchs_t():
    from scipy.stats import ttest_ind

    # training popularity: item 0 -> 4, item 1 -> 2, items 2 and 3 -> 1
    data = split_data([0, 0, 0, 0, 1, 1, 2, 3], valid_items=[2, 3, 1, 1], test_items=[0, 0, 1, 0])
    shift = data.popularity_shift()
    # valid popularities 1, 1, 2, 2: mean 1.5, sample variance 1/3; test 4, 4, 2, 4: mean 3.5, variance 1
    # se = sqrt(1/3 / 4 + 1 / 4) = sqrt(1/3); z = 2 / sqrt(1/3)
    assert shift == pytest.approx({"valid_mean": 1.5, "test_mean": 3.5, "relative": 2 / 1.5, "z": 2 * 3 ** 0.5})
    assert shift["z"] == pytest.approx(ttest_ind([4, 4, 2, 4], [1, 1, 2, 2], equal_var=False).statistic)
    assert split_data([0, 1, 2, 3], valid_items=[2], test_items=[0, 1]).popularity_shift() is None  # one valid pair


def test_popularity_note_needs_a_large_and_a_clear_difference():
    note = popularity_note({"valid_mean": 67.3, "test_mean": 83.0, "relative": 0.233, "z": 40.0})  # Gowalla-like
    assert "differ in item popularity" in note and "83.0" in note and "67.3" in note and "+23%" in note
    assert popularity_note({"valid_mean": 134.8, "test_mean": 133.7, "relative": -0.008, "z": -0.9}) is None
    assert popularity_note({"valid_mean": 10, "test_mean": 13, "relative": 0.3, "z": 2.0}) is None  # too few pairs
    assert popularity_note({"valid_mean": 10, "test_mean": 9.8, "relative": -0.02, "z": -9.0}) is None  # too small
    assert "-30%" in popularity_note({"valid_mean": 10, "test_mean": 7, "relative": -0.3, "z": -5.0})
    assert popularity_note(None) is None


def test_a_given_test_file_of_popular_items_is_flagged_and_a_random_split_is_not(tmp_path):
    rng = np.random.default_rng(0)
    # 200 users; training items drawn with a long tail; the given test file holds only the 5 most popular items
    weights = 1.0 / np.arange(1, 101)
    train = {u: sorted(rng.choice(100, 20, replace=False, p=weights / weights.sum()).tolist()) for u in range(200)}
    test = {u: sorted(set(range(5)) - set(train[u]))[:1] for u in range(200)}  # a popular item the user has not had
    write(tmp_path / "train.txt", "".join(f"{u} {' '.join(map(str, it))}\n" for u, it in train.items()))
    write(tmp_path / "test.txt", "".join(f"{u} {' '.join(map(str, it))}\n" for u, it in test.items() if it))
    given = prepare(cfg_for("lightgcn", tmp_path, split="given", split_ratios=(0.9, 0.1, 0.0)), tmp_path / "given")
    shift = given.popularity_shift()
    assert shift["relative"] > 0.1 and shift["z"] > 3 and "differ in item popularity" in popularity_note(shift)
    shuffled = prepare(DataConfig(n_users=300, n_items=200, n_interactions=9000), tmp_path / "random")
    assert popularity_note(shuffled.popularity_shift()) is None
