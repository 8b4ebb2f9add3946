"""Interactions in, train/valid/test splits out: filtering, id vocabularies, splits, the prepared Parquet.

``prepare(cfg, out_dir)`` is the one entry point the pipeline needs:

1. **Load** (:func:`kdray.data.readers.load_raw`) the source named by ``DataConfig.source``: MovieLens 100K (``u.data``, with ``u.item``
   genres and ``u.user`` demographics as side features), 1M/10M (``ratings.dat``, ``::``), 20M/25M
   (``ratings.csv``), the LightGCN layout (``train.txt``/``test.txt``, ``user item item ...`` per line, its own
   split), a CSV/Parquet file with a column map, or the built-in generator (:mod:`kdray.synthetic`; the default).
   Side features exist for ml-100k only: users [age min-max scaled, gender one-hot, occupation one-hot], items the
   19 genre flags, float32, row = dense id. Files are read with the pandas C parser / pyarrow (1M interactions in
   under a second, 20M in seconds); any malformed input raises :class:`~kdray.errors.DataError` naming the file,
   the line (1-based) or column, and what was expected.
2. **Filter**, in this order: keep ``rating >= min_rating`` (implicit feedback); de-duplicate (user, item) pairs
   keeping the latest (by timestamp, else the later line; in a given split the test copy); k-core: repeatedly drop
   users and items with fewer than ``k_core`` interactions until none is left (the k-core is unique, so the order
   of removal does not matter).
3. **Vocabulary**: dense ids 0..n-1 in the order of the raw ids (numeric order for numeric ids), saved so every
   dense id maps back to its raw id. Only users and items with a surviving interaction get an id (a LightGCN user
   line without items adds no user).
4. **Split** per user (no (user, item) pair is in two splits; their union is the filtered data):
   ``random``: RecBole's ratio split: each user's interactions shuffled (seeded) and cut by ``split_ratios``
   (valid and test get floor(ratio * n), or one when 0 < ratio * n < 1 while the user keeps > 1 train item: every
   user keeps at least one training item); ``loo`` (ignores ``split_ratios``): the latest interaction is test, the
   second latest valid (a user with 2 interactions: train + test; with 1: train only);
   ``given``: the file's own test set; valid is carved out of each user's training items with the share
   ``valid / (train + valid)`` of ``split_ratios``, like ``random``.
5. **Write** Parquet under ``out_dir`` atomically (a temporary folder renamed into place) with ``meta.json``
   holding ``config.fingerprint(cfg)``: a later ``prepare`` with the same config (and unchanged input files)
   reuses it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.config import DataConfig, fingerprint, to_dict
from kdray.data.readers import Features, RawData, load_raw
from kdray.errors import DataError
from kdray.layout import atomic_replace_dir
from kdray.sparse import Csr

FORMAT_VERSION = 1


META = "meta.json"


SPLITS = ("train", "valid", "test")


# The report warns when the test pairs' items are this much more (or less) popular in training than the validation
# pairs' items, relative to validation, and the difference is this many standard errors (so that a few hundred pairs
# of a small data set do not raise it by chance). ml-100k's random split differs by under 1%, Gowalla's by 23%.
POPULARITY_SHIFT, POPULARITY_SHIFT_Z = 0.10, 3.0

TRAIN_BY_USER = "train_by_user.parquet"  # user:int64, items:list<int64> -- the Ray Data training input


USERS, ITEMS = "users.parquet", "items.parquet"


USER_FEATURES, ITEM_FEATURES = "user_features.npy", "item_features.npy"


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Filtered, re-indexed and split interactions; ``train/valid/test`` are user x item CSR indexes."""

    path: Path
    n_users: int
    n_items: int
    train: Csr
    valid: Csr
    test: Csr
    user_ids: np.ndarray  # [n_users] raw ids as str; index = dense id
    item_ids: np.ndarray  # [n_items]
    user_features: np.ndarray | None  # [n_users, Fu] float32
    item_features: np.ndarray | None  # [n_items, Fi] float32
    meta: dict[str, Any]

    def item_popularity(self) -> np.ndarray:
        """[n_items] int64: training interactions per item."""
        return np.bincount(self.train.indices, minlength=self.n_items).astype(np.int64)

    def popularity_shift(self) -> dict[str, float] | None:
        """How much more popular, in training, the items of the test pairs are than those of the validation pairs.

        Models and settings are picked on validation and reported on test, so the two should be alike. A split that
        carves validation at random out of the training pool while the test set comes from elsewhere (a given test
        file, a later time) can break that: on Gowalla's NGCF/LightGCN split the test pairs' items have about 23%
        more training interactions than the validation pairs' do. Regularisation shrinks rare items' rows most, so
        it can lose on validation and win on test. Returns the mean training popularity of each split's items, their
        relative difference ``(test - valid) / valid`` and its z-score ``(test - valid) / se`` (Welch), or None
        without two pairs in each split.
        """
        popularity = self.item_popularity()
        valid, test = popularity[self.valid.indices], popularity[self.test.indices]
        if valid.size < 2 or test.size < 2 or valid.mean() == 0:
            return None
        diff = float(test.mean() - valid.mean())
        se = float(np.sqrt(valid.var(ddof=1) / valid.size + test.var(ddof=1) / test.size))
        z = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
        return {"valid_mean": float(valid.mean()), "test_mean": float(test.mean()),
                "relative": diff / float(valid.mean()), "z": z}

    @functools.cached_property
    def _user_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.user_ids.tolist())}

    @functools.cached_property
    def _item_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids.tolist())}

    def raw_to_user(self, raw: str | int) -> int | None:
        """The dense id of a raw user id (``"196"`` or ``196``), None when the user is unknown (cold start)."""
        return self._user_index.get(str(raw))

    def raw_to_item(self, raw: str | int) -> int | None:
        return self._item_index.get(str(raw))


def popularity_note(shift: dict[str, float] | None) -> str | None:
    """The report's warning when validation and test differ in item popularity (:meth:`PreparedData.
    popularity_shift`) by more than ``POPULARITY_SHIFT`` and ``POPULARITY_SHIFT_Z`` standard errors, or None."""
    if shift is None or abs(shift["relative"]) <= POPULARITY_SHIFT or abs(shift["z"]) <= POPULARITY_SHIFT_Z:
        return None
    return (f"**Validation and test differ in item popularity**: the items of the test pairs have "
            f"{shift['test_mean']:.1f} training interactions on average, those of the validation pairs "
            f"{shift['valid_mean']:.1f} ({shift['relative']:+.0%}). Models are picked on validation, so settings that "
            "favour popular or rare items (regularisation most of all) can rank differently on test: compare close "
            "results on both splits before trusting the order.")


# ----------------------------------------------------------------------------------------------------------------
# Reading text tables with line-accurate errors.


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions in the k-core: the largest subset in which every user and every item has at least
    ``k`` interactions (dense non-negative ids in, [N] bool out)."""
    keep = np.ones(users.size, dtype=bool)
    if k <= 1:
        return keep
    while True:
        u, i = users[keep], items[keep]
        ok = (np.bincount(u)[u] >= k) & (np.bincount(i)[i] >= k)
        if ok.all():
            return keep
        keep[np.flatnonzero(keep)[~ok]] = False


def ratio_counts(n: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """RecBole's ``_calcu_split_ids`` for every user at once: [len(n), len(ratios)] counts that sum to n. Parts
    after the first get floor(ratio * n); one that would get less than one item gets one while the first part keeps
    more than one, taking from the last part backwards."""
    n = np.asarray(n, dtype=np.int64)
    cnt = np.stack([np.floor(r * n).astype(np.int64) for r in ratios], axis=1)
    cnt[:, 0] = n - cnt[:, 1:].sum(axis=1)
    for j in range(len(ratios) - 1, 0, -1):
        frac = ratios[j] * n
        bump = (cnt[:, 0] > 1) & (frac > 0) & (frac < 1)
        cnt[:, j] += bump
        cnt[:, 0] -= bump
    return cnt


def split_labels(users: np.ndarray, order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Split label (0 train, 1 valid, 2 test) of every interaction: within each user, the interactions taken in the
    order of ``order`` (distinct integers, e.g. a permutation) get ``counts[u, 0]`` zeros, then ``counts[u, 1]``
    ones, then twos. ``users`` are dense ids."""
    n = users.size
    by_user = np.argsort(users * np.int64(n) + order)  # one int64 sort, not a lexsort: 20M rows in ~2 s
    n_per_user = np.bincount(users, minlength=counts.shape[0])
    first = np.cumsum(n_per_user) - n_per_user
    rank = np.empty(n, dtype=np.int64)
    rank[by_user] = np.arange(n) - first[users[by_user]]  # position within the user's interactions
    bounds = np.cumsum(counts, axis=1)  # [n_users, 3]: end of train, of valid, of test
    return ((rank >= bounds[users, 0]).astype(np.int8) + (rank >= bounds[users, 1])).astype(np.int8)


def _split(cfg: DataConfig, users: np.ndarray, when: np.ndarray | None, is_test: np.ndarray | None,
           n_users: int) -> np.ndarray:
    """Split label of every interaction (dense user ids) for ``cfg.split``; see the module docstring."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5B17]))
    n = np.bincount(users, minlength=n_users)
    if cfg.split == "random":
        return split_labels(users, rng.permutation(users.size), ratio_counts(n, cfg.split_ratios))
    if cfg.split == "loo":
        if when is None:
            raise DataError(f"data.split='loo' orders interactions by time, but source {cfg.source!r} has no "
                            "timestamps (set data.timestamp_col, or use split='random')")
        valid, test = (n >= 3).astype(np.int64), (n >= 2).astype(np.int64)
        counts = np.stack([n - valid - test, valid, test], axis=1)
        # order by time; ties keep the file order (the later line is the later interaction)
        rank = np.empty(users.size, dtype=np.int64)
        rank[np.argsort(when, kind="stable")] = np.arange(users.size)
        return split_labels(users, rank, counts)
    if is_test is None:
        raise DataError(f"data.split='given' needs a source with its own test set (lightgcn), not {cfg.source!r}")
    labels = np.full(users.size, 2, dtype=np.int8)
    tr = ~is_test
    share = cfg.split_ratios[1] / (cfg.split_ratios[0] + cfg.split_ratios[1])
    n_train = np.bincount(users[tr], minlength=n_users)
    labels[tr] = split_labels(users[tr], rng.permutation(int(tr.sum())),
                              ratio_counts(n_train, (1 - share, share, 0.0)))
    return labels


def _filter(cfg: DataConfig, raw: RawData) -> tuple[np.ndarray, dict[str, int]]:
    """Indices into ``raw`` of the interactions that survive min_rating, de-duplication and the k-core."""
    n_read = raw.users.size
    idx = np.arange(n_read)
    if cfg.min_rating is not None:
        if raw.ratings is None:
            raise DataError(f"data.min_rating={cfg.min_rating} keeps ratings >= it, but source {cfg.source!r} has no "
                            "ratings (set data.rating_col, or data.min_rating=null)")
        idx = idx[raw.ratings >= cfg.min_rating]
    n_rated = idx.size
    ucode = pd.factorize(raw.users[idx])[0].astype(np.int64)
    icode = pd.factorize(raw.items[idx])[0].astype(np.int64)
    key = ucode * (int(icode.max(initial=0)) + 1) + icode
    if pd.Series(key).duplicated().any():
        # latest copy wins: order by pair, then time (a given split's test copy counts as later), then file order
        when = raw.is_test[idx] if raw.is_test is not None else raw.timestamps[idx] if raw.timestamps is not None \
            else np.zeros(idx.size)
        order = np.argsort(when, kind="stable")  # stable sorts: ties keep the file order
        order = order[np.argsort(key[order], kind="stable")]
        last = np.r_[key[order][1:] != key[order][:-1], True]
        keep = np.sort(order[last])
        idx, ucode, icode = idx[keep], ucode[keep], icode[keep]
    n_unique = idx.size
    idx = idx[k_core(ucode, icode, cfg.k_core)]
    stats = {"read": n_read, "after_min_rating": n_rated, "after_dedup": n_unique, "after_k_core": idx.size}
    if idx.size == 0:
        raise DataError(f"no interactions left after filtering ({stats}): data.min_rating={cfg.min_rating}, "
                        f"data.k_core={cfg.k_core} remove everything from {_describe(cfg, raw)}")
    return idx, stats


def _describe(cfg: DataConfig, raw: RawData) -> str:
    return ", ".join(map(str, raw.files)) if raw.files else f"the {cfg.source} data"


def _vocab(raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense codes, sorted unique raw ids): numeric ids in numeric order, string ids in text order."""
    codes, uniques = pd.factorize(raw_ids, sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


def _aligned(features: Features | None, raw_ids: np.ndarray, kind: str) -> np.ndarray | None:
    """Feature rows in dense-id order; an id without a row is an error (a truncated features file)."""
    if features is None:
        return None
    rows = pd.Index(features.ids).get_indexer(raw_ids)
    if (rows < 0).any():
        raise DataError(f"{features.source}: no row for {kind} {str(raw_ids[np.argmax(rows < 0)])!r}, which has "
                        f"interactions; expected one row per {kind}")
    return features.values[rows]


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, source: Path | None = None) -> Csr:
    """A Csr of distinct (user, item) pairs. Sorts unless already sorted (the prepared files are); pairs out of
    range or repeated mean a corrupt ``source``. Faster than Csr.from_pairs, whose np.unique dominates 20M rows."""
    keys = users.astype(np.int64) * np.int64(n_items) + items
    if keys.size and not (np.diff(keys) > 0).all():
        keys = np.sort(keys)
    bad = keys.size and ((np.diff(keys) <= 0).any() or keys[0] < 0 or keys[-1] >= n_users * n_items
                         or items.min() < 0 or items.max() >= n_items)
    if bad:
        raise DataError(f"{source}: user/item ids out of range or repeated pairs; delete the folder and prepare again")
    indptr = np.searchsorted(keys, np.arange(n_users + 1, dtype=np.int64) * n_items).astype(np.int64)
    return Csr(indptr=indptr, indices=keys % n_items, n_rows=n_users, n_cols=n_items)


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write(out: Path, data: dict[str, Any]) -> None:
    """Writes every file of a prepared data set into the (fresh) folder ``out``; meta.json last."""
    for name in SPLITS:
        csr: Csr = data[name]
        pq.write_table(pa.table({"user": csr.rows_of(), "item": csr.indices}), out / f"{name}.parquet")
    train: Csr = data["train"]
    has = np.flatnonzero(train.row_lengths())
    offsets = np.concatenate([[0], np.cumsum(train.row_lengths()[has])]).astype(np.int32)
    pq.write_table(pa.table({"user": pa.array(has, pa.int64()),
                             "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(train.indices))}),
                   out / TRAIN_BY_USER)
    for name, col, ids in ((USERS, "user", data["user_ids"]), (ITEMS, "item", data["item_ids"])):
        pq.write_table(pa.table({col: np.arange(ids.size, dtype=np.int64), "raw_id": pa.array(ids, pa.string())}),
                       out / name)
    for name, key in ((USER_FEATURES, "user_features"), (ITEM_FEATURES, "item_features")):
        if data[key] is not None:
            np.save(out / name, data[key], allow_pickle=False)
    (out / META).write_text(json.dumps(data["meta"], indent=2, sort_keys=True))


def _meta_fingerprint(out_dir: Path) -> str | None:
    try:
        meta = json.loads((out_dir / META).read_text())
        return meta["fingerprint"] if meta.get("format_version") == FORMAT_VERSION else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reusable(out_dir: Path, fp: str) -> PreparedData | None:
    """The prepared data in ``out_dir`` when it was made from the same config and unchanged input files."""
    if _meta_fingerprint(out_dir) != fp:
        return None
    try:
        data = load_prepared(out_dir)
    except DataError:
        return None  # incomplete or corrupt: prepare again
    for stamp in data.meta.get("inputs", []):
        path = Path(stamp["path"])
        # a missing input is fine (the prepared folder is self-contained); a changed one is not
        if path.exists() and _file_stamp(path) != stamp:
            return None
    return data


def prepare(cfg: DataConfig, out_dir: Path) -> PreparedData:
    """Loads, filters, re-indexes and splits the data named by ``cfg`` into ``out_dir`` (see the module docstring);
    reuses ``out_dir`` when its meta.json has this config's fingerprint and the input files are unchanged."""
    out_dir = Path(out_dir)
    fp = fingerprint(cfg)
    existing = _reusable(out_dir, fp)
    if existing is not None:
        return existing
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise DataError(f"{out_dir} exists and is not a prepared-data folder (no {META}); refusing to replace it")
    raw = load_raw(cfg)
    idx, stats = _filter(cfg, raw)
    users, user_ids = _vocab(raw.users[idx])
    items, item_ids = _vocab(raw.items[idx])
    n_users, n_items = user_ids.size, item_ids.size
    labels = _split(cfg, users, raw.timestamps[idx] if raw.timestamps is not None else None,
                    raw.is_test[idx] if raw.is_test is not None else None, n_users)
    splits = {name: _csr(users[labels == s], items[labels == s], n_users, n_items) for s, name in enumerate(SPLITS)}
    stats.update({name: splits[name].nnz for name in SPLITS})
    meta = {
        "format_version": FORMAT_VERSION, "fingerprint": fp, "source": cfg.source, "split": cfg.split,
        "config": to_dict(cfg), "n_users": n_users, "n_items": n_items, "counts": stats,
        "inputs": [_file_stamp(f) for f in raw.files],
        "user_feature_names": list(raw.user_features.names) if raw.user_features else None,
        "item_feature_names": list(raw.item_features.names) if raw.item_features else None,
    }
    data = {**splits, "user_ids": user_ids.astype(str), "item_ids": item_ids.astype(str), "meta": meta,
            "user_features": _aligned(raw.user_features, user_ids, "user"),
            "item_features": _aligned(raw.item_features, item_ids, "item")}
    atomic_replace_dir(out_dir, lambda tmp: _write(tmp, data))
    return load_prepared(out_dir)


def write_prepared(data: PreparedData, out_dir: Path) -> PreparedData:
    """Writes ``data`` (built in memory, e.g. grown by :mod:`kdray.train.update`) as a prepared-data folder in
    ``out_dir``, atomically; returns it as read back from there."""
    fields = {name: getattr(data, name) for name in (*SPLITS, "user_ids", "item_ids", "user_features",
                                                     "item_features", "meta")}
    atomic_replace_dir(Path(out_dir), lambda tmp: _write(tmp, fields))
    return load_prepared(out_dir)


def load_prepared(out_dir: Path) -> PreparedData:
    """Reads a folder written by :func:`prepare`; DataError when it is missing, incomplete or corrupt."""
    out_dir = Path(out_dir)
    hint = "run `kdray data` (or prepare()) to create it"
    if not (out_dir / META).is_file():
        raise DataError(f"{out_dir}: no prepared data ({META} is missing); {hint}")
    try:
        meta = json.loads((out_dir / META).read_text())
        n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{out_dir / META}: format version {meta.get('format_version')}, this kdray reads "
                            f"{FORMAT_VERSION}; delete the folder and prepare again")
        splits = {}
        for name in SPLITS:
            t = pq.read_table(out_dir / f"{name}.parquet", columns=["user", "item"])
            path = out_dir / f"{name}.parquet"
            splits[name] = _csr(t["user"].to_numpy(), t["item"].to_numpy(), n_users, n_items, path)
        user_ids = pq.read_table(out_dir / USERS)["raw_id"].to_numpy(zero_copy_only=False).astype(str)
        item_ids = pq.read_table(out_dir / ITEMS)["raw_id"].to_numpy(zero_copy_only=False).astype(str)
        if not (out_dir / TRAIN_BY_USER).is_file():
            raise FileNotFoundError(out_dir / TRAIN_BY_USER)
        features = {}
        for name, key in ((USER_FEATURES, "user_feature_names"), (ITEM_FEATURES, "item_feature_names")):
            features[name] = np.load(out_dir / name, allow_pickle=False) if meta.get(key) else None
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise DataError(f"{out_dir}: prepared data is incomplete or corrupt ({type(e).__name__}: {e}); "
                        "delete the folder and prepare again") from None
    if user_ids.size != n_users or item_ids.size != n_items:
        raise DataError(f"{out_dir}: {USERS}/{ITEMS} list {user_ids.size}/{item_ids.size} ids, {META} says "
                        f"{n_users}/{n_items}; delete the folder and prepare again")
    return PreparedData(path=out_dir, n_users=n_users, n_items=n_items, **splits, user_ids=user_ids,
                        item_ids=item_ids, user_features=features[USER_FEATURES],
                        item_features=features[ITEM_FEATURES], meta=meta)
